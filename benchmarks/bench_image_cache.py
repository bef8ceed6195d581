"""Seconds to prepare an episode's images with and without the image cache, side by side in one run.

    .venv/bin/python benchmarks/bench_image_cache.py [--model ViT-B-16] [--dataset synthetic-crops]
        [--shots 1 5] [--episodes 32] [--json PATH]

For each shot setting, the same ``--episodes`` episodes are prepared twice
(:func:`cdfsl_core.episode_loop.prepare_episode`: the method reset, the support and query images
on the device): once with the protocol transform (every image decoded, resized and converted for
every episode that shows it) and once through one :class:`cdfsl_core.preprocess.ImageCache` for
the run (each image decoded and resized once; the conversion batched on the device). Reports the
seconds per episode of each, the ratio, the images the cache holds and whether both gave the same
tensors (they must: tests/test_image_cache.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from benchmark_report import finish

from cdfsl_core import protocol
from cdfsl_core.config import run_config
from cdfsl_core.data import load_dataset
from cdfsl_core.episode_loop import prepare_episode
from cdfsl_core.episodes import generate_episodes
from cdfsl_core.models import load_clip
from cdfsl_core.preprocess import ImageCache, protocol_transform


def measure(model: str, dataset_name: str, shots: int, episodes: int, device: str) -> dict:
    options = {"images_per_class": 60} if dataset_name.startswith("synthetic") else {}
    config = run_config(dataset_name, shots, "coop+lora", "none", episodes=episodes, model=model, pretrained=None,
                        device=device, data_options=options)
    dataset = load_dataset(dataset_name, **options)
    drawn = generate_episodes(dataset, config.episodes)
    torch.manual_seed(0)
    bundle = load_clip(model, None, device=torch.device(device))
    plain = protocol_transform(bundle, config.train.resize_ratio)
    cache = ImageCache(dataset, plain, device)
    seconds, tensors = {}, {}
    for name, transform in (("plain", plain), ("cached", cache)):
        method = None
        start = time.perf_counter()
        out = []
        for i in range(episodes):
            method, *images = prepare_episode(config, bundle, dataset, drawn, i, method, transform)
            if i < 4:  # the first episodes' tensors, compared below (keeping all would time the allocator)
                out.append(images)
        seconds[name] = (time.perf_counter() - start) / episodes
        tensors[name] = out
    same = all(torch.equal(a, b) for x, y in zip(tensors["plain"], tensors["cached"]) for a, b in zip(x, y))
    return {"shots": shots, "episodes": episodes, "augment": config.train.augment,
            "seconds_per_episode_plain": round(seconds["plain"], 4),
            "seconds_per_episode_cached": round(seconds["cached"], 4),
            "speedup": round(seconds["plain"] / seconds["cached"], 3),
            "images_kept": len(cache), "mib_kept": round(cache.bytes / 2**20, 1), "same_tensors": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--dataset", default="synthetic-crops")
    parser.add_argument("--shots", type=int, nargs="+", default=list(protocol.SHOTS))
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"model": args.model, "dataset": args.dataset, "device": args.device,
              "settings": [measure(args.model, args.dataset, shots, args.episodes, args.device) for shots in args.shots]}
    return finish(result, "bench_image_cache.py", argv, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
