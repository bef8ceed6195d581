"""Where the time of one batched training step goes: a torch.profiler summary.

    .venv/bin/python benchmarks/profile_step.py [--model ViT-B-16] [--pretrained none] [--episodes 4]
        [--shots 1] [--method coop+lora/tir] [--device cpu] [--precision fp32] [--steps 2] [--json PATH]

E = ``--episodes`` episodes of ``--shots``-shot 5-way training are built as the runner builds
them and trained together (:func:`cdfsl_core.episode_batch.train_batch`) for ``--steps`` steps,
once to warm up and once under ``torch.profiler``. The summary groups every operator's self time
into kinds (matrix products, attention, normalisation, element-wise, the optimiser, copies and
layout, the rest) and lists the 20 most expensive operators; the JSON keeps both, with the
settings and the machine. The first committed summary is the CPU baseline of the GPU path
(batched evaluation, data on the device): a GPU profile, before and after each change, goes
beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cdfsl_core.config import TrainConfig, run_config
from cdfsl_core.data import load_dataset
from cdfsl_core.episode_batch import generator_like_global, train_batch
from cdfsl_core.episode_loop import prepare_episode
from cdfsl_core.episodes import generate_episodes
from cdfsl_core.models import load_clip
from cdfsl_core.preprocess import protocol_transform

RESULTS = Path(__file__).parent / "results"

KINDS = (  # (kind, substrings of operator names), the first that matches wins
    ("attention", ("attention", "softmax", "baddbmm", "bmm")),
    ("matrix products", ("addmm", "mm", "matmul", "linear", "conv")),
    ("normalisation", ("layer_norm", "native_layer_norm", "norm")),
    ("optimiser", ("sgd", "adam", "foreach", "_fused")),
    ("copies and layout", ("copy", "clone", "contiguous", "cat", "stack", "view", "reshape", "permute", "transpose",
                           "expand", "index", "slice", "select", "to", "empty", "zero", "fill")),
    ("element-wise", ("add", "mul", "sub", "div", "gelu", "exp", "sum", "mean", "max", "min", "where", "pow",
                      "sqrt", "neg", "abs", "sigmoid", "relu", "dropout")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, parts in KINDS:
        if any(part in lowered for part in parts):
            return kind
    return "other"


def build(args: argparse.Namespace):
    adaptation, _, intervention = args.method.partition("/")
    options = {"images_per_class": 40}
    config = run_config("synthetic-crops", args.shots, adaptation, intervention, episodes=args.episodes,
                        steps=args.steps, model=args.model, pretrained=args.pretrained, device=args.device,
                        precision=args.precision, data_options=options)
    dataset = load_dataset("synthetic-crops", **options)
    torch.manual_seed(0)
    bundle = load_clip(args.model, args.pretrained, device=torch.device(args.device))
    episodes = generate_episodes(dataset, config.episodes)
    transform = protocol_transform(bundle, config.train.resize_ratio)
    parts = [prepare_episode(config, bundle, dataset, episodes, i, None, transform) for i in range(args.episodes)]
    return config, [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default=None, help="a tag or weights file (default: random weights)")
    parser.add_argument("--episodes", type=int, default=4, help="episodes trained together (E)")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--method", default="coop+lora/tir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config, methods, supports, labels = build(args)
    train = TrainConfig(steps=args.steps)

    def step() -> float:
        started = time.perf_counter()
        train_batch(methods, supports, labels, train, args.precision,
                    generators=[generator_like_global(supports[0].device) for _ in methods])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    warm = step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        profiled = step()
    events = prof.key_averages()
    device_time = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    rows = [{"name": e.key, "calls": e.count, "self_ms": getattr(e, device_time) / 1000.0} for e in events]
    total = sum(r["self_ms"] for r in rows)
    kinds: dict[str, float] = {}
    for r in rows:
        kinds[kind_of(r["name"])] = kinds.get(kind_of(r["name"]), 0.0) + r["self_ms"]
    top = sorted(rows, key=lambda r: -r["self_ms"])[:20]
    result = {
        "settings": {**vars(args), "json": None, "images_per_step": sum(len(s) for s in supports),
                     "threads": torch.get_num_threads()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "processor": platform.processor(),
                    "cpus": torch.get_num_threads()},
        "seconds": {"warm_up": round(warm, 3), "profiled": round(profiled, 3),
                    "per_step_profiled": round(profiled / args.steps, 3)},
        "self_ms_by_kind": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "share_by_kind": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_operators": [{**r, "self_ms": round(r["self_ms"], 1)} for r in top],
    }
    print(f"{args.model}, E = {args.episodes}, {args.shots}-shot, {args.method}, {args.device}/{args.precision}: "
          f"{result['seconds']['per_step_profiled']} s per step under the profiler")
    for kind, share in result["share_by_kind"].items():
        print(f"  {kind:18s} {share:6.1%}  {result['self_ms_by_kind'][kind]:10.1f} ms")
    for r in top[:10]:
        print(f"  {r['name'][:40]:40s} {r['calls']:6d} calls {r['self_ms']:10.1f} ms")
    out = args.json or RESULTS / f"profile_step_{args.model}_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
