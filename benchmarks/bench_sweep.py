"""Episodes per hour: a sweep on a local Ray of 2 workers against the sequential runner, side by
side in one run; and the FLOPs of one episode of ViT-B/16 (PyTorch's FLOP counter).

    .venv/bin/python benchmarks/bench_sweep.py throughput [--episodes 8] [--steps 30]
    .venv/bin/python benchmarks/bench_sweep.py flops

throughput: the same grid (the embedded CLIP, coop+lora/tir, 5-shot, on synthetic-crops) run twice
into fresh folders: by the sequential runner with every core's threads, then by the sweep with
2 workers of 1 CPU each (episodes in shards of 2). Ray's start-up is timed apart; both timings
include loading the model (once per process or worker).
flops: counted on ViT-B/16 with random weights (the count does not depend on the weights) by
running the method on 1 and on 2 images: the difference is the cost per image, the rest the cost
per step that does not depend on the images (the text tower for 5 prompts). A 1-shot episode is
100 steps on 5 images plus a forward of 75 queries; a 5-shot one 100 steps on 25 images.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from cdfsl_core import protocol

RESULTS = Path(__file__).parent / "results"


def throughput(episodes: int = 8, steps: int = 30) -> dict:
    import ray

    from cdfsl_core.runner import run
    from cdfsl_core.sweep import SweepGrid, plan_sweep, sweep

    grid = SweepGrid(datasets=("synthetic-crops",), shots=(5,), methods=("coop+lora/tir",), episodes=episodes,
                     steps=steps, shard=2, cpus_per_task=1)
    with tempfile.TemporaryDirectory() as folder:
        cell = plan_sweep(replace(grid, out=f"{folder}/episode-files"))[0]  # the episode file both use
        config = json.loads((cell.folder / "config.json").read_text())
        from cdfsl_core.config import RunConfig

        torch.set_num_threads(2)
        start = time.perf_counter()
        run(RunConfig.from_dict(config), Path(folder) / "sequential", progress=False)
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
        start = time.perf_counter()
        sweep(replace(grid, out=f"{folder}/sweep"), progress=False)
        swept = time.perf_counter() - start
        ray.shutdown()
    per_hour = lambda seconds: episodes * 3600 / seconds  # noqa: E731
    return {"grid": "synthetic-crops, 5-shot, coop+lora/tir, embedded CLIP", "episodes": episodes, "steps": steps,
            "sequential_seconds": sequential, "sweep_seconds": swept, "ray_start_seconds": ray_start,
            "sequential_episodes_per_hour": per_hour(sequential), "sweep_episodes_per_hour": per_hour(swept),
            "sweep_over_sequential": sequential / swept}


def flops() -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from cdfsl_core.methods import create_method
    from cdfsl_core.models import load_clip

    torch.manual_seed(0)
    bundle = load_clip("ViT-B-16")
    names = [f"class {i}" for i in range(protocol.WAYS)]
    # the baseline: the interventions add a few percent (bench_methods.py); FlopCounterMode cannot follow
    # their selection, which runs without autograd
    method = create_method(bundle, names, "coop+lora", "none", logit_scale=protocol.LOGIT_SCALE)

    def count(images: int, train: bool) -> int:
        batch = torch.randn(images, 3, 224, 224)
        counter = FlopCounterMode(display=False)
        with counter:
            if train:
                method.train()
                loss = torch.nn.functional.cross_entropy(method(batch), torch.zeros(images, dtype=torch.long))
                loss.backward()
            else:
                method.eval()
                with torch.no_grad():
                    method(batch)
        return counter.get_total_flops()

    step_1, step_2 = count(1, True), count(2, True)
    eval_1, eval_2 = count(1, False), count(2, False)
    per_image_step, fixed_step = step_2 - step_1, 2 * step_1 - step_2
    per_image_eval, fixed_eval = eval_2 - eval_1, 2 * eval_1 - eval_2
    queries = protocol.WAYS * protocol.QUERIES

    def episode(shots: int) -> float:
        support = protocol.WAYS * shots
        return protocol.STEPS * (fixed_step + per_image_step * support) + fixed_eval + per_image_eval * queries

    one, five = episode(1), episode(5)
    protocol_total = sum(protocol.EPISODES[k] * episode(k) for k in protocol.SHOTS)  # one target, one method
    return {"model": "ViT-B-16 (224 px)", "method": "coop+lora/none",
            "train_step_flops_per_image": per_image_step, "train_step_flops_fixed": fixed_step,
            "forward_flops_per_image": per_image_eval, "forward_flops_fixed": fixed_eval,
            "episode_flops_1shot": one, "episode_flops_5shot": five,
            "protocol_flops_per_target_and_method": protocol_total,
            "protocol_flops_4_targets_3_methods": 12 * protocol_total}


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "throughput"
    report = {"throughput": throughput, "flops": flops}[name]()
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sweep_{name}.json").write_text(json.dumps(report, indent=2) + "\n")
