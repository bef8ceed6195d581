"""The prepared GPU check: run it first whenever a GPU is available, and commit its JSON.

    make gpu-check                      # on a machine with a CUDA device, under 8 minutes
    make gpu-check ARGS=--dry-run       # anywhere: the same steps on the CPU with a tiny model

Steps, each written into the JSON as soon as it finishes (a step that fails or runs out of time is
recorded as such, and the others still run):

1. ``device``: what the machine is (torch, CUDA, device name, memory).
2. ``gpu_tests``: ``pytest -m gpu`` (tests/test_gpu.py: bf16 selections against fp32, reducers on
   the device, batched episodes on the device equal to sequential ones).
3. ``episode_batch``: ViT-B/16 with random weights under bf16, ``coop+lora/none``, at E = 1, 4, 16
   episodes trained together, 1 and 5 shots: seconds per step and per episode, episodes per hour,
   peak memory, and model FLOP utilisation (the FLOP count of benchmarks/results/sweep_flops.json
   over the measured time and the device's peak bf16 rate), with the hours the papers' whole
   protocol (1.26 EFLOP) would take on one such device.
4. ``ray_sweep``: the sweep through Ray with 4 workers sharing the device (0.25 GPU each) at E = 1,
   the no-code-change baseline, in episodes per hour.

``--dry-run`` runs every step on the CPU with the tiny test architecture and a few steps, to check
the script itself (no number of it means anything); it writes ``gpu_check_dry_run.json``.

It needs the project's dependencies importable, not the project installed: ``python
benchmarks/gpu_check.py`` from a checkout works with any Python that has them (Ray only for step 4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # runs from a checkout without installing the project

# dense bf16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def _peak(name: str) -> float | None:
    return next((value for key, value in PEAK_BF16.items() if key in name), None)


def _device_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cuda_available": torch.cuda.is_available(), "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    peak_bf16_flops=_peak(props.name))
    return info


def _gpu_tests(timeout: int) -> dict:
    # addopts cleared: the project's own (--nbmake) need a plug-in that a bare GPU image may lack
    command = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-m", "gpu", "-p", "no:cacheprovider",
               "tests/test_gpu.py"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return {"returncode": out.returncode, "summary": lines[-1] if lines else "", "command": " ".join(command[1:])}


def _episode_flops(shots: int, steps: int, queries: int) -> float | None:
    """FLOPs of one episode of ViT-B/16 coop+lora/none: ``steps`` training steps on 5 x ``shots``
    images, and the queries forwarded twice (before and after training)."""
    path = RESULTS / "sweep_flops.json"
    if not path.exists():
        return None
    counts = json.loads(path.read_text())
    support, n_query = 5 * shots, 5 * queries
    step = counts["train_step_flops_fixed"] + counts["train_step_flops_per_image"] * support
    forward = counts["forward_flops_fixed"] + counts["forward_flops_per_image"] * n_query
    return steps * step + 2 * forward


def _episode_batch(dry: bool, device: str, peak: float | None) -> dict:
    from bench_episode_batch import measure

    from cdfsl_core import protocol

    settings = []
    if dry:
        kwargs = dict(model="cdfsl-test-vit", pretrained=None, batches=(1, 2), episodes=4, steps=2, queries=2,
                      method="coop+lora/none", device="cpu", precision="fp32")
    else:
        kwargs = dict(model="ViT-B-16", pretrained=None, batches=(1, 4, 16), episodes=16, steps=10,
                      queries=protocol.QUERIES, method="coop+lora/none", device=device, precision="bf16")
    protocol_hours = 0.0
    for shots in protocol.SHOTS:
        report = measure(shots=shots, **kwargs)
        flops = None if dry else _episode_flops(shots, kwargs["steps"], kwargs["queries"])
        best = None
        for e, row in report["by_episode_batch"].items():
            if flops is not None:
                achieved = flops / row["seconds_per_episode"]
                row["achieved_tflops"] = round(achieved / 1e12, 2)
                if peak:
                    row["model_flop_utilisation"] = round(achieved / peak, 4)
                best = achieved if best is None else max(best, achieved)
        if best is not None:
            full = _episode_flops(shots, protocol.STEPS, protocol.QUERIES)
            protocol_hours += 4 * 3 * protocol.EPISODES[shots] * full / best / 3600
        settings.append(report)
    result = {"settings": settings, "model": kwargs["model"], "random_weights": True}
    if protocol_hours:
        result["protocol_hours_one_device_at_best_E"] = round(protocol_hours, 2)
        result["protocol_note"] = ("4 targets x 3 methods x (800 one-shot + 400 five-shot episodes) of 100 steps, at "
                                   "the FLOP rate of the best E measured here; N devices: divide by N (episodes "
                                   "are independent)")
    return result


def _ray_sweep(dry: bool, device: str) -> dict:
    import ray

    from cdfsl_core.sweep import SweepGrid, sweep

    started_here = not ray.is_initialized()
    with tempfile.TemporaryDirectory() as folder:
        if dry:
            grid = SweepGrid(datasets=("synthetic-crops",), shots=(1,), methods=("coop+lora/none",), episodes=4, steps=2,
                             ways=3, queries=2, lora_rank=2, model="cdfsl-test-vit", pretrained=None, out=folder,
                             shard=1, cpus_per_task=1, gpus_per_task=0, episode_batch=1, precision="fp32")
        else:
            grid = SweepGrid(datasets=("synthetic-crops",), shots=(1,), methods=("coop+lora/none",), episodes=16,
                             steps=10, model="ViT-B-16", pretrained=None, out=folder, shard=4, cpus_per_task=2,
                             gpus_per_task=0.25, episode_batch=1, precision="bf16")
        start = time.perf_counter()
        try:
            table = sweep(grid, progress=False)
        finally:
            if started_here:  # leave no Ray behind (a caller, a test session, may start its own)
                ray.shutdown()
        seconds = time.perf_counter() - start
    return {"workers_per_device": 0 if dry else round(1 / grid.gpus_per_task), "episodes": grid.episodes,
            "steps": grid.steps, "seconds": round(seconds, 1), "episodes_per_hour": round(3600 * grid.episodes / seconds, 1),
            "note": "includes Ray's start and each worker loading the model", "mean_accuracy": float(table["mean"].iloc[0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with a tiny model")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default: benchmarks/results/gpu_check*.json)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["gpu_tests", "episode_batch", "ray_sweep"])
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. On a GPU machine run `make gpu-check`; to check the script itself on "
              "the CPU, `make gpu-check ARGS=--dry-run`.", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    out = args.out or RESULTS / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    report: dict = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": "benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)}

    from cdfsl_core.atomic import write_json

    def save() -> None:
        write_json(out, report)

    report["device"] = _device_info(device)
    save()
    steps = [("gpu_tests", lambda: _gpu_tests(timeout=240)),
             ("episode_batch", lambda: _episode_batch(args.dry_run, device, report["device"].get("peak_bf16_flops"))),
             ("ray_sweep", lambda: _ray_sweep(args.dry_run, device))]
    failed = 0
    for name, step in steps:
        if name in args.skip:
            report[name] = {"skipped": True}
            continue
        start = time.perf_counter()
        try:
            report[name] = step()
        except Exception as err:  # recorded, and the next step still runs
            failed += 1
            report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        report[name]["step_seconds"] = round(time.perf_counter() - start, 1)
        save()
        print(f"{name}: {json.dumps(report[name])[:400]}", flush=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(f"written {out}")
    return 1 if failed or report.get("gpu_tests", {}).get("returncode", 0) not in (0, 5) else 0


if __name__ == "__main__":
    raise SystemExit(main())
