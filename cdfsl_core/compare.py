"""Paired comparison of two runs on the same episode file: ``python -m cdfsl_core.compare A B``.

Prints the mean of (accuracy of A - accuracy of B) over the episodes both finished, with its 95%
CI (1.96 std / sqrt(n), the project's one convention). Runs on different episode files cannot be
paired and are refused, and so is a run whose lines disagree among themselves (lines from two
episode files, or one episode recorded twice with different results).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from cdfsl_core.cli import command, parser
from cdfsl_core.errors import RunFolderError
from cdfsl_core.run_folder import RunFolder, short_identity
from cdfsl_core.stats import format_mean_ci, mean_ci95


def _load_run(folder: Path) -> tuple[str, dict[int, float]]:
    """The episode file's sha256 and the accuracy of every finished episode of a run folder."""
    run = RunFolder(folder)
    if not run.is_run():
        raise RunFolderError(f"{folder} is not a run folder (needs manifest.json and episodes.jsonl). Pass the --out "
                             "folder of python -m cdfsl_core.finetune.")
    sha = run.manifest()["episode_file_sha256"]
    rows = run.lines()[0]  # a torn last line of a killed run is skipped: the runner drops it on resume
    shas = {row.get("episode_file_sha256", sha) for row in rows}
    if shas - {sha}:
        raise RunFolderError(
            f"{folder}: its lines come from episode files {sorted(s[:12] for s in shas | {sha})} (manifest: {sha[:12]}); "
            "a run mixing episode files pairs with nothing. Rerun it into a new --out folder.")
    accuracies: dict[int, float] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        index = row["episode"]
        if index in accuracies and accuracies[index] != row["accuracy"]:
            raise RunFolderError(f"{folder}: episode {index} is recorded twice with different accuracies "
                                 f"({accuracies[index]} and {row['accuracy']}); rerun it into a new --out folder.")
        accuracies[index] = row["accuracy"]
    return sha, accuracies


def _same_model(run_a: Path, run_b: Path) -> None:
    """Paired runs start from the same model: both weights recorded and equal (older run folders
    that recorded none are let through)."""
    weights_a, weights_b = RunFolder(run_a).recorded_weights(), RunFolder(run_b).recorded_weights()
    if weights_a is not None and weights_b is not None and weights_a != weights_b:
        raise RunFolderError(
            f"{run_a} and {run_b} were computed with different models (weights {short_identity(weights_a)} vs "
            f"{short_identity(weights_b)}); their difference would mix a change of model with the change of method. Rerun "
            "one of them with the other's --model and --pretrained.")


def paired_difference(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    """Mean and 95% CI of accuracy(A) - accuracy(B) over the episodes both runs finished."""
    sha_a, acc_a = _load_run(Path(run_a))
    sha_b, acc_b = _load_run(Path(run_b))
    if sha_a != sha_b:
        raise RunFolderError(
            f"{run_a} and {run_b} used different episode files ({sha_a[:12]} vs {sha_b[:12]}); "
            "paired differences need the same one. Rerun one of them with --episode-file of the other."
        )
    _same_model(Path(run_a), Path(run_b))
    common = sorted(set(acc_a) & set(acc_b))
    if not common:
        raise RunFolderError(f"{run_a} and {run_b} have no finished episode in common.")
    mean, ci = mean_ci95([acc_a[i] - acc_b[i] for i in common])
    return {"mean_difference": mean, "ci95": ci, "episodes": len(common), "episode_file_sha256": sha_a}


def accuracy_table(runs: Mapping[tuple[str, int, str], Sequence[str | Path]], baseline: str) -> Any:
    """Mean accuracy and 95% CI per (domain, shots, method) over the episodes of its run folders
    (one per episode seed), and the paired difference against ``baseline``'s runs on the same
    episode files, with its CI; a pandas DataFrame with columns ``domain, shots, method, mean,
    episodes, ci95, diff_vs_baseline, diff_ci95``."""
    import pandas as pd

    rows = []
    for (domain, shots, method), folders in runs.items():
        accuracies = [a for folder in folders for a in _load_run(Path(folder))[1].values()]
        mean, ci = mean_ci95(accuracies)
        partners = runs.get((domain, shots, baseline))
        if method == baseline or partners is None:
            difference, difference_ci = (0.0, 0.0) if method == baseline else (float("nan"), float("nan"))
        else:
            differences = []
            for folder, partner in zip(folders, partners):  # the same seed, so the same episode file
                sha, mine = _load_run(Path(folder))
                other_sha, theirs = _load_run(Path(partner))
                if sha != other_sha:
                    raise RunFolderError(f"{folder} and {partner} used different episode files; they cannot be paired.")
                _same_model(Path(folder), Path(partner))
                differences += [mine[i] - theirs[i] for i in sorted(set(mine) & set(theirs))]
            difference, difference_ci = mean_ci95(differences)
        rows.append({"domain": domain, "shots": shots, "method": method, "mean": mean, "episodes": len(accuracies),
                     "ci95": ci, "diff_vs_baseline": difference, "diff_ci95": difference_ci})
    return pd.DataFrame(rows)


def build_parser():
    result = parser("python -m cdfsl_core.compare", __doc__)
    result.add_argument("run_a", help="a run folder")
    result.add_argument("run_b", help="another run folder on the same episode file (the baseline)")
    return result


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = paired_difference(args.run_a, args.run_b)
    print(f"{args.run_a} - {args.run_b}: {format_mean_ci(result['mean_difference'], result['ci95'], digits=2, signed=True)} "
          f"points over {result['episodes']} paired episodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
