"""What measuring a fine-tuning trajectory costs: episodes with and without ``trajectory_steps``.

    .venv/bin/python benchmarks/bench_trajectory.py [--episodes 3] [--steps 100] [--points 5] [--json PATH]

The same episodes of ``coop+lora/tir`` run through :func:`cdfsl_core.episode_loop.run_episode` in
one process, alternating plain and measured (each measured point: the queries' accuracy, the
intervention's statistics and the token diagnostics of every block), so both see the same machine
load. Reports seconds per episode of each and their ratio, and checks that the accuracies agree.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from benchmark_report import finish

from cdfsl_core import protocol
from cdfsl_core.config import run_config
from cdfsl_core.data import load_dataset
from cdfsl_core.episode_loop import run_episode
from cdfsl_core.episodes import generate_episodes
from cdfsl_core.models import load_clip
from cdfsl_core.preprocess import protocol_transform


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cdfsl-synth-vit")
    parser.add_argument("--pretrained", default="synthetic")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=protocol.STEPS)
    parser.add_argument("--points", type=int, default=5, help="trajectory points, evenly spaced from 0 to --steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    options = {"images_per_class": 40}
    dataset = load_dataset("synthetic-crops", **options)
    pretrained = None if args.pretrained == "none" else args.pretrained
    plain = run_config("synthetic-crops", args.shots, "coop+lora", "tir", episodes=args.episodes, steps=args.steps,
                       model=args.model, pretrained=pretrained, device="cpu", data_options=options)
    steps = tuple(sorted({round(i * args.steps / (args.points - 1)) for i in range(args.points)}))
    measured = replace(plain, train=replace(plain.train, trajectory_steps=steps))
    episodes = generate_episodes(dataset, plain.episodes)
    bundle = load_clip(args.model, pretrained)
    transform = protocol_transform(bundle)
    seconds = {"plain": [], "measured": []}
    accuracy = {"plain": [], "measured": []}
    method = None
    for index in range(args.episodes):
        for name, config in (("plain", plain), ("measured", measured)):
            start = time.perf_counter()
            method, row = run_episode(config, bundle, dataset, episodes, index, method, transform, "fp32")
            seconds[name].append(time.perf_counter() - start)
            accuracy[name].append(row["accuracy"])
    per_episode = {name: sum(values) / len(values) for name, values in seconds.items()}
    result = {
        "model": args.model, "shots": args.shots, "steps": args.steps, "trajectory_steps": list(steps),
        "episodes": args.episodes, "seconds_per_episode": {k: round(v, 3) for k, v in per_episode.items()},
        "ratio_measured_over_plain": round(per_episode["measured"] / per_episode["plain"], 3),
        "seconds_per_point": round((per_episode["measured"] - per_episode["plain"]) / len(steps), 3),
        "same_accuracy": accuracy["plain"] == accuracy["measured"],
    }
    return finish(result, "bench_trajectory.py", argv, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
