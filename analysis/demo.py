"""The main job on the embedded default: ``make demo`` (``python -m analysis.demo``).

For each synthetic target and for 1 and 5 shots it evaluates, on one shared episode file:
zero-shot CLIP, the baseline ``coop+lora`` and the papers' ``coop+lora`` with ATHA and with TIR,
all through the episodic runner (each run is a resumable run folder that keeps its trained
states). Then every diagnostic (token norms, sinks, head/tail, attention, rollout, attribution,
CKA between domains and between pretrained and fine-tuned models, ATHA's strengths) and every
figure, and it prints the accuracy table and where everything is. Rerunning resumes: finished
runs and tables are not repeated. ``make figures`` is the same with ``--figures figures``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from cdfsl_core import protocol
from cdfsl_core.cli import command, non_negative_int, parser, positive_int
from cdfsl_core.paths import check_writable_folder
from cdfsl_core.stats import format_mean_ci


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m analysis.demo", __doc__)
    result.add_argument("--out", type=Path, default=Path("outputs/demo"), help="the study folder")
    result.add_argument("--figures", type=Path, default=None, help="where the figures go (None: OUT/figures)")
    result.add_argument("--episodes", type=positive_int, default=protocol.DEMO_EPISODES,
                        help="episodes per target, shot setting and method")
    result.add_argument("--steps", type=positive_int, default=protocol.DEMO_STEPS,
                        help=f"training steps per episode (fewer than the protocol's {protocol.STEPS}, to finish within 15 min)")
    result.add_argument("--seed", type=non_negative_int, default=0, help="episode seed")
    return result


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import pandas as pd
    import torch

    from analysis.study import Study

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    check_writable_folder(args.out, "--out")
    if args.figures is not None:
        check_writable_folder(args.figures, "--figures")
    args.out.mkdir(parents=True, exist_ok=True)
    study = Study.create(args.out, episodes=args.episodes, steps=args.steps, seed=args.seed)
    baseline = study.grid.baseline
    paths = study.figures(args.figures)
    summary = pd.read_csv(args.out / "accuracy_table.csv")  # written by study.figures

    view = summary.assign(
        accuracy=[format_mean_ci(m, c) for m, c in zip(summary["mean"], summary["ci95"])],
        vs_baseline=[format_mean_ci(d, c, signed=True) if m != baseline else "-"
                     for d, c, m in zip(summary["diff_vs_baseline"], summary["diff_ci95"], summary["method"])],
    )
    print(view.pivot_table(index=["domain", "shots"], columns="method", values="accuracy", aggfunc="first", sort=False)
          .to_string())
    print(f"\npaired differences against {baseline} (points, 95% CI):")
    print(view[view["method"] != baseline].pivot_table(index=["domain", "shots"], columns="method",
                                                      values="vs_baseline", aggfunc="first", sort=False).to_string())
    print("\nsimilarity to the source (1 - MMD^2/2): " + ", ".join(f"{d} {s:.3f}" for d, s in study.similarity().items()))
    print(f"\n{args.episodes} episodes per cell, {args.steps} steps each; finished in "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    print(f"accuracy table: {args.out / 'accuracy_table.csv'}")
    print(f"per-episode results: {args.out / 'episodes.csv'} and the run folders in {args.out / 'runs'}/")
    print(f"diagnostics: {args.out / 'diagnostics'}/, {args.out / 'domain_similarity.csv'}, {args.out / 'cka_finetuned.csv'}, "
          f"{args.out / 'intervention_stats.csv'}")
    folder = paths[next(iter(paths))][0].parent
    print(f"figures: {folder}/ ({', '.join(paths)}; .png and .pdf)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
