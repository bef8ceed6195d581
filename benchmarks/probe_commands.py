"""Probe the commands as a new user would: about 100 bad inputs through the real entry points.

    python benchmarks/probe_commands.py [--out benchmarks/results/probe_commands.json]

Each case runs ``python -m <command> ...`` in a fresh process (60 s at most) inside a scratch
folder that holds a finished tiny run, a corrupt run, a corrupt study, a corrupt JSON and TOML
file and a plain file. A case is

- ``traceback``: stderr holds a Python traceback;
- ``silent``: exit 0 on a bad input, or no answer within the time limit (work on a bad input);
- ``unclear``: a failure without exactly one ``error:`` line (argparse's ``usage`` + ``error``
  counts as one);
- ``changed``: a file of the scratch folder was created, changed or removed by the failed command;
- ``ok``: otherwise.

The JSON records every case with its verdict and message; the summary counts the verdicts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
RANDOM = ["--model", "cdfsl-test-vit", "--pretrained", "none"]
TINY = [*RANDOM, "--dataset", "synthetic-crops", "--ways", "3", "--shots", "1", "--queries", "2", "--steps", "1",
        "--device", "cpu"]


def cases() -> list[tuple[str, list[str]]]:
    """(command, arguments); ``{x}`` names a prepared thing of the scratch folder."""
    finetune = [
        ["--episodes", "0"], ["--episodes", "-3"], ["--episodes", "abc"], ["--episodes", "100000000"],
        ["--steps", "-1"], ["--steps", "0"], ["--ways", "1"], ["--shots", "0"], ["--queries", "0"],
        ["--lora-rank", "0"], ["--lora-rank", "100000"], ["--logit-scale", "0"], ["--logit-scale", "-2"],
        ["--episode-batch", "0"], ["--device", "gpu"], ["--device", "cuda"], ["--precision", "fp16"],
        ["--adaptation", "foo"], ["--intervention", "foo"], ["--trajectory-steps", "-1"],
        ["--export-merged-episode", "5"], ["--episode-file", "{json}"],
    ]
    rows = [("cdfsl_core.finetune", [*TINY, *extra, "--out", "{new}/run"]) for extra in finetune]
    rows += [
        ("cdfsl_core.finetune", [*RANDOM, "--dataset", "nosuch", "--out", "{new}/run"]),
        ("cdfsl_core.finetune", [*RANDOM, "--dataset", "eurosat", "--data-root", "{missing}", "--out", "{new}/run"]),
        ("cdfsl_core.finetune", ["--model", "cdfsl-test-vit", "--pretrained", "{missing}", "--out", "{new}/run"]),
        ("cdfsl_core.finetune", ["--model", "ViT-XYZ", "--pretrained", "none", "--out", "{new}/run"]),
        ("cdfsl_core.finetune", [*TINY, "--out", "{file}"]),
        ("cdfsl_core.finetune", [*TINY, "--episodes", "3", "--out", "{run}"]),  # another config than the run's
        ("cdfsl_core.episodes", ["--dataset", "synthetic-crops", "--out", "{folder}"]),
        ("cdfsl_core.episodes", ["--dataset", "synthetic-crops", "--ways", "0", "--out", "{new}/e.json"]),
        ("cdfsl_core.episodes", ["--dataset", "nosuch", "--out", "{new}/e.json"]),
        ("cdfsl_core.episodes", ["--dataset", "synthetic-crops", "--episodes", "0", "--out", "{new}/e.json"]),
        ("cdfsl_core.episodes", ["--dataset", "synthetic-crops", "--shots", "100000", "--out", "{new}/e.json"]),
        ("cdfsl_core.episodes", ["--dataset", "synthetic-crops", "--short-class-policy", "bad", "--out",
                                 "{new}/e.json"]),
        ("cdfsl_core.compare", ["{missing}", "{run}"]),
        ("cdfsl_core.compare", ["{file}", "{run}"]),
        ("cdfsl_core.compare", ["{broken_run}", "{run}"]),
        ("cdfsl_core.compare", ["{folder}", "{run}"]),
        ("cdfsl_core.sweep", ["--grid", "{missing}"]),
        ("cdfsl_core.sweep", ["--grid", "{toml}"]),
        ("cdfsl_core.sweep", ["--shots", "0"]),
        ("cdfsl_core.sweep", ["--methods", "foo/bar", "--datasets", "synthetic-crops", "--out", "{new}/sweep"]),
        ("cdfsl_core.sweep", ["--datasets", "nosuch", "--out", "{new}/sweep"]),
        ("cdfsl_core.sweep", ["--episodes", "-1"]),
        ("cdfsl_core.pretrain", ["--steps", "0", "--out", "{new}/p"]),
        ("cdfsl_core.pretrain", ["--lr", "0", "--out", "{new}/p"]),
        ("cdfsl_core.pretrain", ["--lr", "-1", "--out", "{new}/p"]),
        ("cdfsl_core.pretrain", ["--batch-size", "0", "--out", "{new}/p"]),
        ("cdfsl_core.pretrain", ["--weight-decay", "-1", "--out", "{new}/p"]),
        ("cdfsl_core.pretrain", ["--beta2", "2", "--out", "{new}/p"]),
        ("cdfsl_core.pretrain", ["--caption-swap", "1.5", "--out", "{new}/p"]),
        ("cdfsl_core.pretrain", ["--arch", "nosuch", "--out", "{new}/p"]),
        ("cdfsl_core.pretrain", ["--out", "{file}"]),
        ("cdfsl_core.pretrain", ["--objective", "foo", "--out", "{new}/p"]),
        ("cdfsl_core.pretrain", ["--seed", "-1", "--out", "{new}/p"]),
        ("cdfsl_core.world_report", ["--episodes", "0"]),
        ("cdfsl_core.world_report", ["--model", "nosuch"]),
        ("cdfsl_core.world_report", ["--pretrained", "{missing}"]),
        ("cdfsl_core.world_report", ["--json", "{folder}"]),
        ("cdfsl_core.models", ["download", "nosuch", "tag"]),
        ("cdfsl_core.models", ["list", "--bogus"]),
        ("cdfsl_core.models", []),
        ("cdfsl_core.data", ["check", "nosuch"]),
        ("cdfsl_core.data", ["check", "eurosat", "--root", "{missing}"]),
        ("cdfsl_core.data", []),
        ("analysis.cka", ["--target", "synthetic-crops", "--images", "0"]),
        ("analysis.cka", ["--target", "synthetic-crops", "--layers", "99", "--images", "4"]),
        ("analysis.cka", ["--target", "synthetic-crops", "--layers", "-1"]),
        ("analysis.cka", ["--target", "nosuch"]),
        ("analysis.cka", ["--target", "synthetic-crops", "--estimator", "foo"]),
        ("analysis.cka", ["--target", "synthetic-crops", "--pool", "foo"]),
        ("analysis.cka", ["--target", "synthetic-crops", "--out", "{folder}"]),
        ("analysis.cka", ["--target", "synthetic-crops", "--pairings", "0"]),
        ("analysis.run_diagnostics", ["{missing}"]),
        ("analysis.run_diagnostics", ["{file}"]),
        ("analysis.run_diagnostics", ["{broken_run}"]),
        ("analysis.run_diagnostics", ["{run}", "--episodes", "99"]),
        ("analysis.run_diagnostics", ["{run}", "--rho", "0"]),
        ("analysis.run_diagnostics", ["{run}", "--rho", "1"]),
        ("analysis.run_diagnostics", ["{run}", "--high-norm-tau", "0"]),
        ("analysis.run_diagnostics", ["{run}", "--bins", "0"]),
        ("analysis.run_diagnostics", ["{run}", "--attention-source", "foo"]),
        ("analysis.run_causal", ["{missing}"]),
        ("analysis.run_causal", ["{run}", "--episodes", "99"]),
        ("analysis.run_causal", ["{run}", "--block", "99"]),
        ("analysis.run_causal", ["{run}", "--sets", "bucket:9"]),
        ("analysis.run_causal", ["{run}", "--sets", "nosuch"]),
        ("analysis.run_causal", ["{run}", "--ablation", "foo"]),
        ("analysis.run_causal", ["{run}", "--queries", "-1"]),
        ("analysis.run_vision", ["RN50", "--out", "{new}/v"]),
        ("analysis.run_vision", ["cdfsl-test-vit", "--pretrained", "none", "--image-size", "15", "--out", "{new}/v"]),
        ("analysis.run_vision", ["cdfsl-test-vit", "--images", "0", "--out", "{new}/v"]),
        ("analysis.run_vision", ["cdfsl-test-vit", "--pretrained", "none", "--out", "{file}"]),
        ("analysis.run_vision", ["nosuch-model", "--out", "{new}/v"]),
        ("analysis.trajectory", ["{missing}"]),
        ("analysis.trajectory", ["{run}", "--block", "99"]),
        ("analysis.trajectory", ["{run}", "--block", "-1"]),
        ("analysis.trajectory", ["{run}", "--out", "{file}"]),
        ("analysis.organism", ["{missing}", "--out", "{new}/o"]),
        ("analysis.organism", ["cdfsl-synth-vit=synthetic", "--high-norm-tau", "-1", "--out", "{new}/o"]),
        ("analysis.organism", ["cdfsl-synth-vit=synthetic", "--seed", "-1", "--out", "{new}/o"]),
        ("analysis.organism", ["cdfsl-synth-vit=synthetic", "--subsets", "0", "--out", "{new}/o"]),
        ("analysis.organism", ["--domains", "nosuch", "cdfsl-synth-vit=synthetic", "--out", "{new}/o"]),
        ("analysis.organism", ["cdfsl-test-vit={missing}", "--out", "{new}/o"]),
        ("analysis.organism", ["--finetune", "{broken_run}", "--out", "{new}/o"]),
        ("analysis.report", ["{missing}"]),
        ("analysis.report", ["{broken_study}"]),
        ("analysis.report", ["{broken_study}", "--timeout", "0"]),
        ("analysis.report", ["{folder}", "--notebooks", "nosuch"]),
        ("analysis.demo", ["--episodes", "0", "--out", "{new}/d"]),
        ("analysis.demo", ["--seed", "-1", "--out", "{new}/d"]),
        ("analysis.demo", ["--out", "{file}"]),
        ("analysis.demo", ["--out", "{broken_study}"]),
    ]
    return rows


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def prepare(scratch: Path) -> dict[str, str]:
    run = scratch / "run"
    subprocess.run([PY, "-m", "cdfsl_core.finetune", *TINY, "--episodes", "2", "--trajectory-steps", "0", "1",
                    "--save-states", "--out", str(run)], check=True, capture_output=True, cwd=scratch)
    (scratch / "a-file.txt").write_text("not a folder\n")
    (scratch / "broken.json").write_text('{"episodes": [1, 2,')
    (scratch / "broken.toml").write_text("datasets = [\n")
    broken = scratch / "broken-run"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "manifest.json").write_text("garbage")
    (broken / "episodes.jsonl").write_text('{"foreign": true}\n')
    study = scratch / "broken-study"
    study.mkdir()
    (study / "study.json").write_text("[1, 2")
    (scratch / "a-folder").mkdir()
    return {"run": str(run), "file": str(scratch / "a-file.txt"), "json": str(scratch / "broken.json"),
            "toml": str(scratch / "broken.toml"), "broken_run": str(broken), "broken_study": str(study),
            "folder": str(scratch / "a-folder"), "missing": str(scratch / "no-such-thing"), "new": str(scratch / "new")}


def verdict(returncode: int | None, err: str, changed: bool) -> str:
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if returncode is None or returncode == 0:
        return "silent"
    if changed:
        return "changed"
    errors = [line for line in err.splitlines() if "error:" in line]
    return "ok" if len(errors) == 1 else "unclear"


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--out", type=Path, default=Path("benchmarks/results/probe_commands.json"))
    args.add_argument("--timeout", type=float, default=60.0)
    options = args.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        scratch = Path(tmp)
        things = prepare(scratch)
        env = {**os.environ, "CDFSL_DATA_ROOT": ""}
        for command, argv in cases():
            argv = [a.format(**things) for a in argv]
            before = _snapshot(scratch)
            started = time.perf_counter()
            try:
                done = subprocess.run([PY, "-m", command, *argv], capture_output=True, text=True, cwd=scratch,
                                      timeout=options.timeout, env=env)
                code, err = done.returncode, done.stderr
            except subprocess.TimeoutExpired as timeout:
                code, err = None, (timeout.stderr or b"").decode() if isinstance(timeout.stderr, bytes) else ""
            changed = _snapshot(scratch) != before
            shown = [a.replace(tmp, "SCRATCH") for a in argv]
            message = next((line for line in err.splitlines() if "error:" in line), err.strip().splitlines()[-1:] or [""])
            message = message if isinstance(message, str) else message[0]
            results.append({"command": command, "argv": shown, "exit": code, "seconds": round(time.perf_counter() - started, 1),
                            "verdict": verdict(code, err, changed), "message": message.replace(tmp, "SCRATCH")[:300]})
            print(f"{results[-1]['verdict']:9s} {command} {' '.join(shown)}", flush=True)
            if changed:  # leave the next case the same scratch folder
                for path in sorted(scratch.rglob("*"), reverse=True):
                    if str(path.relative_to(scratch)) not in before and path.is_file():
                        path.unlink()
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("ok", "traceback", "silent", "unclear", "changed")}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps({"cases": len(results), "verdicts": counts, "results": results}, indent=1) + "\n")
    print(f"{len(results)} cases: {counts}")
    return 0 if counts["ok"] == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
