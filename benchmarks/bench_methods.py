"""Cost of a training step with each intervention against the baseline, measured side by side.

    .venv/bin/python benchmarks/bench_methods.py                                  # embedded CLIP, 5-shot
    .venv/bin/python benchmarks/bench_methods.py --model ViT-B-16 --pretrained none --shots 1 --rounds 3 --steps 1

Every round runs ``--steps`` full-batch training steps of ``coop+lora`` with each intervention
(``none``, ``atha``, ``tir``) on the same support images through the runner's own
``train_episode``, one method after the other; rounds interleave the methods so that a busy
machine slows them alike. Reported: seconds per step (median over rounds) and, per intervention,
the median over rounds of its time divided by the baseline's in the same round. ViT-B/16 with
random weights (``--pretrained none``) runs at real size (224 px, 196 patch tokens, 12 blocks);
the cost of a step does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from benchmark_report import finish

from cdfsl_core import protocol
from cdfsl_core.config import TrainConfig
from cdfsl_core.episode_loop import train_episode
from cdfsl_core.methods import create_method
from cdfsl_core.models import load_clip, resolve_device

INTERVENTIONS = ("none", "atha", "tir")
NAMES = ["striped red shape", "dotted blue shape", "plain green shape", "wavy pink shape", "checked black shape"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cdfsl-synth-vit", help="open_clip architecture (default: the embedded CLIP)")
    parser.add_argument("--pretrained", default="synthetic", help="tag or weights file; 'none': random weights")
    parser.add_argument("--shots", type=int, default=5, help="support images per class (5 classes)")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (default 11)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per method and round (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda, as the runner)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    bundle = load_clip(args.model, None if args.pretrained == "none" else args.pretrained, device=device)
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(protocol.WAYS * args.shots, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.arange(protocol.WAYS, device=device).repeat_interleave(args.shots)
    methods = {name: create_method(bundle, NAMES, "coop+lora", name) for name in INTERVENTIONS}
    config = TrainConfig(steps=args.steps)
    for method in methods.values():  # warm-up: first calls allocate and cache
        train_episode(method, images, labels, TrainConfig(steps=1))
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_episode(method, images, labels, config)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)
    report = {
        "model": args.model, "pretrained": args.pretrained, "image_size": size,
        "blocks": len(bundle.model.visual.transformer.resblocks), "support_images": len(images),
        "device": str(device), "device_name": platform.processor() or platform.machine() if device.type == "cpu"
        else torch.cuda.get_device_name(device), "threads": args.threads, "rounds": args.rounds,
        "steps_per_round": args.steps,
        "seconds_per_step": {name: statistics.median(t) for name, t in times.items()},
        "ratio_to_baseline": {name: statistics.median(a / b for a, b in zip(t, times["none"]))
                              for name, t in times.items() if name != "none"},
    }
    return finish(report, "bench_methods.py", argv, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
