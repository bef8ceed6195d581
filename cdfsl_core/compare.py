"""Paired comparison of two runs on the same episode file: ``python -m cdfsl_core.compare A B``.

Prints the mean of (accuracy of A - accuracy of B) over the episodes both finished, with its 95%
CI (1.96 std / sqrt(n)). Runs on different episode files cannot be paired and are refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cdfsl_core.stats import mean_ci95


def _load_run(folder: Path) -> tuple[str, dict[int, float]]:
    manifest = folder / "manifest.json"
    results = folder / "episodes.jsonl"
    if not manifest.exists() or not results.exists():
        raise FileNotFoundError(f"{folder} is not a run folder (needs manifest.json and episodes.jsonl).")
    sha = json.loads(manifest.read_text())["episode_file_sha256"]
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return sha, {r["episode"]: r["accuracy"] for r in rows if r.get("status") == "ok"}


def paired_difference(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    sha_a, acc_a = _load_run(Path(run_a))
    sha_b, acc_b = _load_run(Path(run_b))
    if sha_a != sha_b:
        raise ValueError(
            f"{run_a} and {run_b} used different episode files ({sha_a[:12]} vs {sha_b[:12]}); "
            "paired differences need the same one. Rerun one of them with --episode-file of the other."
        )
    common = sorted(set(acc_a) & set(acc_b))
    if not common:
        raise ValueError(f"{run_a} and {run_b} have no finished episode in common.")
    mean, ci = mean_ci95([acc_a[i] - acc_b[i] for i in common])
    return {"mean_difference": mean, "ci95": ci, "episodes": len(common), "episode_file_sha256": sha_a}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdfsl_core.compare", description=__doc__.split("\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    args = parser.parse_args(argv)
    result = paired_difference(args.run_a, args.run_b)
    print(f"{args.run_a} - {args.run_b}: {100 * result['mean_difference']:+.2f} +- {100 * result['ci95']:.2f} "
          f"points over {result['episodes']} paired episodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
