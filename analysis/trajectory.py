"""Fine-tuning trajectories: the token diagnostics on an episode's queries at chosen training steps.

``finetune --trajectory-steps 0 10 25 50 100`` (or ``trajectory_steps`` of a study) makes the episode
loop measure, at each step, the query accuracy, the intervention's own statistics (ATHA: alpha,
beta, edit sizes per block) and this module's probe: per block, sink tokens per image under
every registered definition, mean norm and count per Sum bucket, and ATHA's head and tail cut
points, measured exactly as :func:`analysis.run_diagnostics.diagnose_model` measures them (default
:class:`~analysis.config.AnalysisConfig`, the method's ``text_norm``). They are stored in the episode
line (``trajectory``), so a resumed run keeps them.

:func:`trajectory_table` reads them back as a tidy table (``episode``, ``step``, ``statistic``,
``block``, ``value``), :func:`analysis.figures.trajectories` draws them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from analysis.config import AnalysisConfig
from analysis.diagnostics import measure_tokens
from cdfsl_core.probes import register_probe
from cdfsl_core.run_folder import RunFolder

__all__ = ["PROBE", "TokenProbe", "register", "trajectory_table"]

PROBE = "token-diagnostics"


def _number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(f"{value:.7g}")


class TokenProbe:
    """Measures the token diagnostics of one episode's method on its queries at each call."""

    def __init__(self, method: Any, query: Any, query_labels: Any, config: Any,
                 analysis: AnalysisConfig = AnalysisConfig()) -> None:
        self.method, self.query, self.analysis = method, query, analysis

    def __call__(self, step: int) -> dict[str, Any]:
        tables = measure_tokens(self.method, self.query, self.analysis).tables()
        return compact(tables)


def compact(tables: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    """The diagnostics' tables as a small JSON dict: per block, sink counts per definition, norm
    mean and count per Sum bucket, head and tail cut points."""
    norms, sinks = tables["norms"], tables["sinks"]
    blocks = sorted(int(b) for b in norms["layer"].unique())
    result: dict[str, Any] = {"blocks": blocks, "sinks": {}, "norm_mean": [], "norm_count": []}
    for definition in dict.fromkeys(sinks["definition"]):
        part = sinks[sinks["definition"] == definition].set_index("layer")["mean_count"]
        result["sinks"][definition] = [_number(part[b]) for b in blocks]
    for b in blocks:
        part = norms[norms["layer"] == b].sort_values("bucket")
        result["norm_mean"].append([_number(v) for v in part["mean"]])
        result["norm_count"].append([int(v) for v in part["count"]])
    if "head_tail" in tables:
        cuts = tables["head_tail"].drop_duplicates("layer").set_index("layer")
        result["head_cut"] = [_number(cuts.loc[b, "head_cut"]) for b in blocks]
        result["tail_cut"] = [_number(cuts.loc[b, "tail_cut"]) for b in blocks]
    return result


def register() -> None:
    """The entry point (``cdfsl.probes``) that makes every trajectory measure the token diagnostics."""
    register_probe(PROBE, TokenProbe)


def _lines(source: Any) -> list[dict[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        return RunFolder(source).lines()[0]
    return list(source)


def trajectory_table(source: str | os.PathLike[str] | Iterable[dict[str, Any]], **labels: Any) -> pd.DataFrame:
    """Every trajectory of a run folder (or of episode lines) as tidy rows: ``episode``, ``step``,
    ``statistic``, ``block`` (None for the accuracy), ``value``, plus ``labels``. Statistics:
    ``accuracy``; ``sinks:<definition>`` (tokens per image); ``norm:m=<m>`` and ``tokens:m=<m>``
    (mean norm and share of tokens in Sum bucket m); ``head_cut``, ``tail_cut``; and each statistic
    the intervention reports (ATHA: ``alpha``, ``beta``, ``head_edit``, ``tail_edit``)."""
    rows: list[dict[str, Any]] = []
    for line in _lines(source):
        for point in line.get("trajectory", []):
            base = {**labels, "episode": line["episode"], "step": point["step"]}
            rows.append({**base, "statistic": "accuracy", "block": None, "value": point["accuracy"]})
            for block, stats in point.get("intervention", {}).items():
                for name, value in stats.items():
                    rows.append({**base, "statistic": name, "block": int(block), "value": value})
            probe = point.get(PROBE)
            if not probe:
                continue
            for i, block in enumerate(probe["blocks"]):
                for definition, values in probe["sinks"].items():
                    rows.append({**base, "statistic": f"sinks:{definition}", "block": block, "value": values[i]})
                counts = probe["norm_count"][i]
                total = sum(counts) or 1
                for m, (mean, count) in enumerate(zip(probe["norm_mean"][i], counts)):
                    rows.append({**base, "statistic": f"norm:m={m}", "block": block, "value": mean})
                    rows.append({**base, "statistic": f"tokens:m={m}", "block": block, "value": count / total})
                for cut in ("head_cut", "tail_cut"):
                    if cut in probe:
                        rows.append({**base, "statistic": cut, "block": block, "value": probe[cut][i]})
    columns = [*labels, "episode", "step", "statistic", "block", "value"]
    return pd.DataFrame(rows, columns=columns).astype({"value": float})


def build_parser():
    from cdfsl_core.cli import non_negative_int, parser

    result = parser("python -m analysis.trajectory",
                    "The trajectory table and figure of runs: python -m analysis.trajectory RUN [RUN ...] [--out FOLDER].")
    result.add_argument("runs", nargs="+", help="run folders of finetune --trajectory-steps")
    result.add_argument("--out", type=Path, default=None, help="folder for trajectory.csv and the figure "
                        "(default: the first run's diagnostics/)")
    result.add_argument("--block", type=non_negative_int, default=None,
                        help="the vision block of the token statistics (default: the figure's choice)")
    return result


def _main(argv: list[str] | None = None) -> int:
    """``python -m analysis.trajectory RUN [RUN ...] [--out FOLDER]``: the trajectory table and figure of runs."""
    import matplotlib.pyplot as plt

    from analysis import figures as fig
    from cdfsl_core.atomic import write_json, write_table
    from cdfsl_core.config import RunConfig
    from cdfsl_core.errors import ConfigError
    from cdfsl_core.paths import check_settings, check_writable_folder

    args = build_parser().parse_args(argv)
    out = args.out or RunFolder(args.runs[0]).diagnostics
    check_writable_folder(out, "--out" if args.out else "the run's diagnostics folder (pass --out elsewhere)")
    parts = []
    for run in args.runs:
        if not Path(run).is_dir():
            raise ConfigError(f"{run} is not a folder; pass run folders of python -m cdfsl_core.finetune.")
        config = RunConfig.from_dict(RunFolder(run).config_dict())
        label = f"{config.method.adaptation}/{config.method.intervention}"
        parts.append(trajectory_table(run, method=label, domain=config.data.dataset, shots=config.episodes.k_shot))
    table = pd.concat(parts, ignore_index=True)
    if table.empty:
        raise ConfigError(f"{', '.join(args.runs)}: no episode has a trajectory; run finetune with --trajectory-steps.")
    blocks = sorted(int(b) for b in table["block"].dropna().unique())
    if args.block is not None and args.block not in blocks:
        raise ConfigError(f"--block {args.block}: the trajectories have blocks {blocks[0]}..{blocks[-1]}.")
    settings = {"runs": [str(Path(run).resolve()) for run in args.runs]}
    check_settings(out / "trajectory_settings.json", settings, "trajectory table")  # never replace other runs' table
    write_table(table, out / "trajectory.csv")
    figure = fig.trajectories(table, block=args.block)
    paths = fig.save_figure(figure, out, "trajectories")
    plt.close(figure)
    write_json(out / "trajectory_settings.json", settings)  # last: the table and figure beside it are complete
    print(f"{out / 'trajectory.csv'}; {', '.join(str(p) for p in paths)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from cdfsl_core.cli import command

    return command(_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
