"""The main job on the embedded default: ``make demo`` (``python -m analysis.demo``).

For each synthetic target and for 1 and 5 shots it evaluates, on one shared episode file:
zero-shot CLIP, the baseline ``coop+lora`` and the papers' ``coop+lora`` with ATHA and with TIR,
all through the episodic runner (each run is a resumable run folder). It then writes the
accuracy table with 95% CIs and paired differences against the baseline, the figures, and
prints where everything is. Rerunning resumes: finished runs are not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from analysis.figures import accuracy_by_domain, save_figure, world_samples
from cdfsl_core.compare import paired_difference
from cdfsl_core.data import load_dataset
from cdfsl_core.data.synthetic import SYNTHETIC_TARGETS
from cdfsl_core.episodes import EpisodeConfig
from cdfsl_core.methods import MethodConfig
from cdfsl_core.models import EMBEDDED_MODEL, load_clip
from cdfsl_core.runner import DataConfig, ModelConfig, RunConfig, TrainConfig, run
from cdfsl_core.world_report import domain_similarity
from cdfsl_core.zeroshot import image_features

# (label, adaptation, intervention); zero-shot first: the others add LoRA to the shared model.
DEMO_METHODS = (
    ("zero-shot", "zeroshot", "none"),
    ("coop+lora", "coop+lora", "none"),
    ("coop+lora+atha", "coop+lora", "atha"),
    ("coop+lora+tir", "coop+lora", "tir"),
)
BASELINE = "coop+lora"


def run_folder(out: Path, target: str, shots: int, episodes: int, label: str) -> Path:
    """One folder per cell; the episode count is in the name, so another --episodes never meets
    a run folder of a different config."""
    return out / "runs" / target / f"{shots}shot_{episodes}ep" / label


def run_all(
    out: Path, episodes: int, steps: int, shots: tuple[int, ...] = (1, 5), seed: int = 0,
    targets: tuple[str, ...] = SYNTHETIC_TARGETS, methods=DEMO_METHODS,
) -> pd.DataFrame:
    """Every (target, shots, method) run; returns one row per finished episode."""
    bundle = load_clip(*EMBEDDED_MODEL)
    rows = []
    for label, adaptation, intervention in methods:
        for target in targets:
            for k in shots:
                config = RunConfig(
                    model=ModelConfig(*EMBEDDED_MODEL, "cpu"),
                    data=DataConfig(target, None, {"images_per_class": 60, "seed": seed},
                                    str(out / "episodes" / f"{target}_5w{k}s15q_{episodes}ep_seed{seed}.json")),
                    episodes=EpisodeConfig(5, k, 15, episodes, seed),
                    method=MethodConfig(adaptation, intervention, logit_scale=2.0 if k == 1 else 4.0),
                    train=replace(TrainConfig(), steps=steps),
                )
                folder = run_folder(out, target, k, episodes, label)
                run(config, folder, bundle=bundle, progress=True)
                for line in (folder / "episodes.jsonl").read_text().splitlines():
                    row = json.loads(line)
                    rows.append({"domain": target, "shots": k, "method": label, "episode": row["episode"],
                                 "accuracy": row["accuracy"], "status": row["status"]})
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame, out: Path, episodes: int) -> pd.DataFrame:
    ok = table[table["status"] == "ok"]
    summary = ok.groupby(["domain", "shots", "method"], sort=False)["accuracy"].agg(
        mean="mean", std="std", episodes="count").reset_index()
    summary["ci95"] = 1.96 * summary["std"].fillna(0) / summary["episodes"] ** 0.5
    diffs = []
    for _, row in summary.iterrows():
        if row["method"] == BASELINE:
            diffs.append((0.0, 0.0))
            continue
        result = paired_difference(run_folder(out, row["domain"], row["shots"], episodes, row["method"]),
                                   run_folder(out, row["domain"], row["shots"], episodes, BASELINE))
        diffs.append((result["mean_difference"], result["ci95"]))
    summary["diff_vs_baseline"] = [d for d, _ in diffs]
    summary["diff_ci95"] = [c for _, c in diffs]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--episodes", type=int, default=3, help="episodes per target, shot setting and method")
    parser.add_argument("--steps", type=int, default=100, help="training steps per episode (protocol: 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    table = run_all(args.out, args.episodes, args.steps, seed=args.seed)
    table.to_csv(args.out / "episodes.csv", index=False)
    summary = summarise(table, args.out, args.episodes)
    summary.to_csv(args.out / "accuracy_table.csv", index=False)

    bundle = load_clip(*EMBEDDED_MODEL)
    source = load_dataset("synthetic", split="test", images_per_class=8, seed=args.seed)
    source_features = image_features(bundle, source)
    samples = {"synthetic (source)": [(source.array(i), source.classes[source.targets[i]]) for i in range(0, 8 * 64, 64)]}
    similarity = {}
    for target in SYNTHETIC_TARGETS:
        dataset = load_dataset(target, images_per_class=60, seed=args.seed)
        stride = len(dataset) // 8
        samples[target] = [(dataset.array(i), dataset.classes[dataset.targets[i]]) for i in range(0, 8 * stride, stride)]
        similarity[target] = domain_similarity(source_features, image_features(bundle, dataset, range(0, len(dataset), 2)))
    figures = args.out / "figures"
    save_figure(world_samples(samples), figures, "world_samples")
    save_figure(accuracy_by_domain(table[table["status"] == "ok"], similarity), figures, "accuracy_by_domain")

    view = summary.assign(
        accuracy=[f"{100 * m:.1f} +- {100 * c:.1f}" for m, c in zip(summary["mean"], summary["ci95"])],
        vs_baseline=[f"{100 * d:+.1f} +- {100 * c:.1f}" if m != BASELINE else "-"
                     for d, c, m in zip(summary["diff_vs_baseline"], summary["diff_ci95"], summary["method"])],
    )
    print(view.pivot_table(index=["domain", "shots"], columns="method", values="accuracy", aggfunc="first", sort=False)
          .to_string())
    print(f"\npaired differences against {BASELINE} (points, 95% CI):")
    print(view[view["method"] != BASELINE].pivot_table(index=["domain", "shots"], columns="method",
                                                      values="vs_baseline", aggfunc="first", sort=False).to_string())
    print("\nsimilarity to the source (1 - MMD^2/2): " + ", ".join(f"{d} {s:.3f}" for d, s in similarity.items()))
    print(f"\n{args.episodes} episodes per cell, {args.steps} steps each; finished in {(time.perf_counter() - start) / 60:.1f} min")
    print(f"accuracy table: {args.out / 'accuracy_table.csv'}")
    print(f"per-episode results: {args.out / 'episodes.csv'} and the run folders in {args.out / 'runs'}/")
    print(f"figures: {figures}/ (world_samples, accuracy_by_domain; .png and .pdf)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
