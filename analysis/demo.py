"""The main job on the embedded default: ``make demo`` (``python -m analysis.demo``).

For each synthetic target and each shot setting it writes a fixed episode file, evaluates the
shipped CLIP zero-shot on every episode (one line per episode, appended as it finishes), then
writes the accuracy table, the figures, and prints where everything is.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd
import torch

from analysis.figures import save_figure, world_samples, zero_shot_by_domain
from cdfsl_core.data import load_dataset
from cdfsl_core.data.synthetic import SYNTHETIC_TARGETS
from cdfsl_core.episodes import EpisodeConfig, generate_episodes, load_episodes, save_episodes
from cdfsl_core.models import EMBEDDED_MODEL, load_clip
from cdfsl_core.world_report import domain_similarity
from cdfsl_core.zeroshot import image_features, zero_shot_episodes


def _episode_file(out: Path, dataset, shots: int, episodes: int, seed: int):
    path = out / "episodes" / f"{dataset.name}_5w{shots}s_{episodes}ep_seed{seed}.json"
    if path.exists():
        return load_episodes(path, dataset)
    episode_file = generate_episodes(dataset, EpisodeConfig(5, shots, 15, episodes, seed))
    save_episodes(episode_file, path)
    return episode_file


def run(out: Path, episodes: int = 20, shots: tuple[int, ...] = (1, 5), seed: int = 0) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_clip(*EMBEDDED_MODEL)
    results_path = out / "zero_shot_episodes.jsonl"
    done = set()
    if results_path.exists():  # resume: keep every finished (domain, shots) block
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done.add((row["domain"], row["shots"]))
    source = load_dataset("synthetic", split="test", images_per_class=8, seed=seed)
    source_features = image_features(bundle, source)
    similarity = {}
    samples = {"synthetic (source)": [(source.array(i), source.classes[source.targets[i]]) for i in range(0, 64, 8)]}
    for target in SYNTHETIC_TARGETS:
        dataset = load_dataset(target, images_per_class=60, seed=seed)
        stride = len(dataset) // 8
        samples[target] = [(dataset.array(i), dataset.classes[dataset.targets[i]]) for i in range(0, 8 * stride, stride)]
        similarity[target] = domain_similarity(source_features, image_features(bundle, dataset, range(0, len(dataset), 2)))
        for k in shots:
            if (target, k) in done:
                continue
            episode_file = _episode_file(out, dataset, k, episodes, seed)
            accuracies = zero_shot_episodes(bundle, dataset, episode_file)
            with results_path.open("a") as handle:
                for index, acc in enumerate(accuracies):
                    handle.write(json.dumps({"domain": target, "shots": k, "episode": index, "method": "zeroshot",
                                             "accuracy": acc, "episode_file_sha256": episode_file.sha256}) + "\n")
                handle.flush()
    table = pd.read_json(results_path, lines=True)
    summary = (
        table.groupby(["domain", "shots"], sort=False)["accuracy"]
        .agg(mean="mean", std="std", episodes="count")
        .reset_index()
    )
    summary["ci95"] = 1.96 * summary["std"] / summary["episodes"] ** 0.5
    summary["similarity"] = summary["domain"].map(similarity)
    summary.to_csv(out / "accuracy_table.csv", index=False)
    figures = out / "figures"
    save_figure(world_samples(samples), figures, "world_samples")
    save_figure(zero_shot_by_domain(table, similarity), figures, "zero_shot_by_domain")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--episodes", type=int, default=20, help="episodes per target and shot setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    summary = run(args.out, args.episodes, seed=args.seed)
    view = summary.assign(accuracy=lambda t: [f"{100 * m:.1f} +- {100 * c:.1f}" for m, c in zip(t["mean"], t["ci95"])])
    print(view[["domain", "shots", "episodes", "accuracy", "similarity"]].to_string(index=False))
    print(f"\naccuracy table: {args.out / 'accuracy_table.csv'}")
    print(f"per-episode results: {args.out / 'zero_shot_episodes.jsonl'}")
    print(f"figures: {args.out / 'figures'}/ (world_samples, zero_shot_by_domain; .png and .pdf)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
