"""Per-episode time of the episodic runner, and loading the model once vs. every episode.

    .venv/bin/python benchmarks/bench_runner.py [--episodes 3] [--steps 100] [--model ...]

Both variants run the same method on the same episodes in one process, side by side:
- once:   the runner's way: load the model once, reset adapters between episodes;
- reload: the authors' code's way: load the model (and rebuild the method) for every episode.
The ratio reload/once is what loading once saves. On CUDA it also reports peak GPU memory, with
bf16 autocast. For ViT-B/16 at real size without the OpenAI weights: --model ViT-B-16 --pretrained none
(random weights; the time per episode does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from benchmark_report import finish

from cdfsl_core import protocol
from cdfsl_core.config import run_config
from cdfsl_core.data import load_dataset
from cdfsl_core.episode_loop import evaluate, prepare_episode, train_episode
from cdfsl_core.episodes import generate_episodes
from cdfsl_core.models import load_clip, resolve_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cdfsl-synth-vit")
    parser.add_argument("--pretrained", default="synthetic")
    parser.add_argument("--dataset", default="synthetic-crops")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=protocol.STEPS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    pretrained = None if args.pretrained == "none" else args.pretrained
    options = {"images_per_class": 40} if args.dataset.startswith("synthetic") else {}
    dataset = load_dataset(args.dataset, **options)
    config = run_config(args.dataset, args.shots, "coop+lora", "tir", episodes=args.episodes,
                                 steps=args.steps, model=args.model, pretrained=pretrained, device=str(device),
                                 data_options=options)
    episodes = generate_episodes(dataset, config.episodes)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    for variant in ("once", "reload"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        start_all = time.perf_counter()
        bundle = load_clip(args.model, pretrained, device=device) if variant == "once" else None
        method = None
        for index in range(len(episodes)):
            start = time.perf_counter()
            if variant == "reload":
                bundle, method = load_clip(args.model, pretrained, device=device), None
            method, support, support_labels, query, query_labels = prepare_episode(
                config, bundle, dataset, episodes, index, method)
            train_episode(method, support, support_labels, config.train)
            evaluate(method, query, query_labels, config.train.eval_batch_size)
            sync()
            times.append(time.perf_counter() - start)
        results[variant] = {
            "seconds_per_episode": sum(times) / len(times),
            "total_seconds": time.perf_counter() - start_all,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
    report = {
        "model": args.model, "pretrained": args.pretrained, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "autocast": "bf16" if device.type == "cuda" else "none (fp32)",
        "threads": torch.get_num_threads(), "method": "coop+lora/tir", "shots": args.shots,
        "steps": args.steps, "episodes": args.episodes, **results,
        "reload_over_once": results["reload"]["total_seconds"] / results["once"]["total_seconds"],
    }
    return finish(report, "bench_runner.py", argv, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
