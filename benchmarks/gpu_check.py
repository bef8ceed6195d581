"""The prepared GPU check: run it first whenever a GPU is available, and commit its JSON.

    make gpu-check                      # on a machine with a CUDA device, under 8 minutes
    make gpu-check ARGS=--dry-run       # anywhere: the same steps on the CPU with a tiny model

Steps, each written into the JSON as soon as it finishes (a step that fails is recorded as such,
and the others still run; a step that would start after ``--budget`` seconds is skipped, and says
so):

1. ``device``: what the machine is (torch, CUDA, device name, memory, peak bf16 rate).
2. ``gpu_tests``: ``pytest -m gpu`` (tests/test_gpu.py: bf16 selections against fp32, reducers on
   the device, batched episodes and batched evaluation on the device equal to one at a time).
3. ``search``: for 1 and 5 shots, the training step of ``coop+lora/none`` at E = 16, 64 and as
   many episodes as the device's free memory holds (``--episode-batch auto``, at most 256),
   bf16: seconds per step, per-episode throughput, peak memory and the step's model FLOP
   utilisation (FLOPs counted by PyTorch, benchmarks/results/sweep_flops.json, over the time and
   the device's peak bf16 rate). The best E is the one with the most episode-steps per second.
4. ``protocol``: whole 100-step episodes (prepared, evaluated before and after, trained) of the
   three methods (baseline, ATHA, TIR, all on ``coop+lora``) at 1 and 5 shots, at the best E (or
   the largest searched E whose 100 steps take at most 30 s; a run that would start after
   ``--budget`` is skipped): seconds per episode, episodes per hour, peak memory, MFU, and the
   hours the papers' whole protocol (4 targets x 3 methods x 800 one-shot and 400 five-shot
   episodes) takes on one such device.
5. ``agreement``: the same 8 episodes at E = 1 and E = 8, in fp32 and in bf16 on the device, 30
   steps: whether fp32 gives the same accuracies at both E (it must, up to rounding), how many
   differ under bf16, and how far bf16 is from fp32 for each E. If fp32 agrees, the bf16
   differences are bf16's own rounding noise (a batched product sums in another order), not
   the batching.
6. ``profile``: ``torch.profiler`` over one batched ViT-B/16 training step on the device
   (benchmarks/profile_step.py; the full trace summary is also written to
   ``results/profile_step_ViT-B-16_cuda.json``): where the time goes, by kind of operator.
7. ``ray_sweep`` (only with ``--ray``): the sweep through Ray, 4 workers sharing the device.

``--dry-run`` runs every step on the CPU with the tiny test architecture and a few steps, to check
the script itself (no number of it means anything); it writes ``gpu_check_dry_run.json``.

It needs the project's dependencies importable, not the project installed: ``python
benchmarks/gpu_check.py`` from a checkout works with any Python that has them (Ray only for step 7).
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
from dataclasses import replace
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


def _flops() -> dict | None:
    path = RESULTS / "sweep_flops.json"
    return json.loads(path.read_text()) if path.exists() else None


def _step_flops(counts: dict | None, support: int, episodes: int) -> float | None:
    """FLOPs of one training step of E episodes of ViT-B/16 coop+lora (``support`` images each)."""
    if counts is None:
        return None
    return episodes * (counts["train_step_flops_fixed"] + counts["train_step_flops_per_image"] * support)


def _episode_flops(counts: dict | None, support: int, queries: int, steps: int) -> float | None:
    """FLOPs of one episode: ``steps`` training steps and the queries forwarded twice (before and after)."""
    if counts is None:
        return None
    forward = counts["forward_flops_fixed"] + counts["forward_flops_per_image"] * queries
    return _step_flops(counts, support, 1) * steps + 2 * forward


def _settings(dry: bool, device: str) -> dict:
    from cdfsl_core import protocol

    if dry:
        return dict(model="cdfsl-test-vit", pretrained=None, device="cpu", precision="fp32", steps=2, queries=2,
                    candidates=(1, 2), distinct=2, agreement_episodes=2, agreement_batch=2, agreement_steps=2,
                    run_seconds=30.0)
    return dict(model="ViT-B-16", pretrained=None, device=device, precision="bf16", steps=protocol.STEPS,
                queries=protocol.QUERIES, candidates=(16, 64, "auto"), distinct=16, agreement_episodes=8,
                agreement_batch=8, agreement_steps=30, run_seconds=30.0)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _search(shots: int, s: dict, peak: float | None, counts: dict | None) -> dict:
    """The training step of coop+lora/none at each candidate E (the distinct episodes repeated to
    fill E slots): seconds per step, episode-steps per second, peak memory and MFU."""
    import torch
    from bench_episode_batch import _setup

    from cdfsl_core.episode_batch import generator_like_global, train_batch
    from cdfsl_core.episode_loop import prepare_episode
    from cdfsl_core.runner import measure_footprint, prepare_run, resolve_episode_batch, support_images

    setup = _setup(s["model"], s["pretrained"], shots, s["distinct"], s["steps"], "coop+lora/none", s["device"],
                   s["precision"], s["queries"])
    config, dataset, drawn, bundle, images, precision = setup
    prepared = [prepare_episode(config, bundle, dataset, drawn, i, None, images) for i in range(s["distinct"])]
    device = torch.device(s["device"])
    candidates = []
    for e in s["candidates"]:
        if e == "auto":
            with tempfile.TemporaryDirectory() as folder:
                plan = prepare_run(config, Path(folder) / "run")
                e = resolve_episode_batch("auto", device, support_images(config), lambda: measure_footprint(plan, bundle))
        candidates.append(e)
    rows, best = {}, None
    steps = 3
    for e in sorted(set(candidates)):
        slots = [prepared[i % len(prepared)] for i in range(e)]
        methods, supports, labels = [p[0] for p in slots], [p[1] for p in slots], [p[2] for p in slots]
        train = replace(config.train, steps=steps, trajectory_steps=())

        def timed() -> float:
            generators = [generator_like_global(supports[0].device) for _ in methods]
            _sync(s["device"])
            start = time.perf_counter()
            train_batch(methods, supports, labels, train, precision, generators)
            _sync(s["device"])
            return time.perf_counter() - start

        _reset_peak(s["device"])
        try:
            timed()  # warm-up
            seconds = min(timed(), timed()) / steps
        except torch.OutOfMemoryError:
            rows[str(e)] = {"error": "out of memory"}
            _reset_peak(s["device"])
            continue
        row = {"seconds_per_step": round(seconds, 4), "episode_steps_per_second": round(e / seconds, 2),
               "peak_memory_mib": _peak_mib(s["device"])}
        flops = _step_flops(counts, support_images(config), e)
        if flops is not None and not s["model"].startswith("cdfsl"):
            row["achieved_tflops"] = round(flops / seconds / 1e12, 2)
            if peak:
                row["model_flop_utilisation"] = round(flops / seconds / peak, 4)
        rows[str(e)] = row
        if best is None or row["episode_steps_per_second"] > rows[str(best)]["episode_steps_per_second"]:
            best = e
    return {"shots": shots, "method": "coop+lora/none", "precision": precision, "support_images": support_images(config),
            "candidates": candidates, "by_episode_batch": rows, "best_episode_batch": best}


def _protocol(searches: list[dict], s: dict, peak: float | None, counts: dict | None) -> dict:
    """Whole episodes of the three methods at each shot's best E (or the largest E whose steps fit
    ``run_seconds``), and the hours of the papers' protocol on one device at these rates."""
    from bench_episode_batch import measure

    from cdfsl_core import protocol

    runs, hours = [], 0.0
    for search in searches:
        shots = search["shots"]
        best = search["best_episode_batch"]
        fitting = [int(e) for e, row in search["by_episode_batch"].items()
                   if "seconds_per_step" in row and row["seconds_per_step"] * s["steps"] <= s["run_seconds"]]
        e = best if best in fitting or not fitting else max(fitting)
        for intervention in ("none", "atha", "tir"):
            method = f"coop+lora/{intervention}"
            if time.perf_counter() > s["deadline"]:
                runs.append({"shots": shots, "method": method, "skipped": "out of time"})
                continue
            _reset_peak(s["device"])
            report = measure(s["model"], s["pretrained"], shots, (e,), e, s["steps"], method, s["device"],
                             s["precision"], s["queries"])
            row = report["by_episode_batch"][str(e)]
            support = search["support_images"]
            flops = _episode_flops(counts, support, 5 * s["queries"], s["steps"])
            out = {"shots": shots, "method": method, "episode_batch": e, "steps": s["steps"],
                   "seconds_per_episode": row["seconds_per_episode"], "episodes_per_hour": row["episodes_per_hour"],
                   "peak_memory_mib": row.get("peak_memory_mib"),
                   "mean_accuracy": round(sum(report["accuracies"][str(e)]) / e, 4)}
            if flops is not None and not s["model"].startswith("cdfsl") and peak:
                out["model_flop_utilisation"] = round(flops / row["seconds_per_episode"] / peak, 4)
            hours += 4 * protocol.EPISODES[shots] * row["seconds_per_episode"] / 3600
            runs.append(out)
    complete = all("skipped" not in run for run in runs)
    return {"runs": runs, "protocol_hours_one_device": round(hours, 2) if complete else None,
            "protocol_note": ("4 targets x 3 methods x (800 one-shot + 400 five-shot episodes) of 100 steps at the "
                              "measured seconds per episode; N devices: divide by N (episodes are independent). "
                              "MFU counts the FLOPs of coop+lora/none (ATHA and TIR add a few percent)")}


def _agreement(s: dict, device: str) -> dict:
    """The same episodes at E = 1 and E = k, in fp32 and in bf16 (on the CPU: fp32 only)."""
    from bench_episode_batch import measure

    precisions = ("fp32",) if device == "cpu" else ("fp32", "bf16")
    batches = (1, s["agreement_batch"])
    accuracies = {}
    for precision in precisions:
        report = measure(s["model"], s["pretrained"], 1, batches, s["agreement_episodes"], s["agreement_steps"],
                         "coop+lora/none", device, precision, s["queries"])
        accuracies[precision] = {e: report["accuracies"][str(e)] for e in batches}
    result: dict = {"episodes": s["agreement_episodes"], "steps": s["agreement_steps"], "batches": list(batches)}
    for precision, by_e in accuracies.items():
        one, many = by_e[1], by_e[batches[1]]
        result[precision] = {"episodes_differing_between_E1_and_Ek": sum(a != b for a, b in zip(one, many)),
                             "largest_difference": round(max(abs(a - b) for a, b in zip(one, many)), 4),
                             "accuracies_E1": one, "accuracies_Ek": many}
    if "bf16" in accuracies:
        for e in batches:
            spread = [abs(a - b) for a, b in zip(accuracies["bf16"][e], accuracies["fp32"][e])]
            result["bf16"][f"largest_difference_from_fp32_at_E{e}"] = round(max(spread), 4)
    fp32_same = result["fp32"]["episodes_differing_between_E1_and_Ek"] == 0
    result["verdict"] = (
        "fp32 gives the same accuracies at E = 1 and E > 1, so the batching is exact; the bf16 differences are "
        "bf16's rounding (a batched product sums in another order), as large as bf16's own distance from fp32"
        if fp32_same else
        "fp32 differs between E = 1 and E > 1: the batching itself is not exact on this device (a bug to chase)")
    return result


def _profile(dry: bool, device: str, folder: Path) -> dict:
    import profile_step

    name = "ViT-B-16" if not dry else "cdfsl-test-vit"
    out = folder / f"profile_step_{name}_{'cpu_dry_run' if dry else 'cuda'}.json"
    argv = ["--model", name, "--episodes", "16" if not dry else "2", "--shots", "1", "--method", "coop+lora/tir",
            "--device", device, "--precision", "bf16" if not dry else "fp32", "--steps", "2", "--json", str(out)]
    profile_step.main(argv)
    report = json.loads(out.read_text())
    return {"file": out.name, "seconds": report["seconds"], "share_by_kind": report["share_by_kind"],
            "top_operators": report["top_operators"][:8]}


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
    parser.add_argument("--skip", nargs="*", default=[], choices=list(STEPS))
    parser.add_argument("--ray", action="store_true", help="also the Ray sweep with 4 workers sharing the device")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds after which no further step starts (default 450: the check ends within 8 minutes)")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. On a GPU machine run `make gpu-check`; to check the script itself on "
              "the CPU, `make gpu-check ARGS=--dry-run`.", file=sys.stderr)
        return 2
    started = time.perf_counter()
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
    settings = _settings(args.dry_run, device)
    peak, counts = report["device"].get("peak_bf16_flops"), _flops()
    searches: list[dict] = []

    def search() -> dict:
        from cdfsl_core import protocol

        searches.extend(_search(shots, settings, peak, counts) for shots in protocol.SHOTS)
        return {"settings": searches}

    settings["deadline"] = started + args.budget  # the protocol's runs stop starting then, too
    steps = {"gpu_tests": lambda: _gpu_tests(timeout=150),
             "search": search,
             "protocol": lambda: _protocol(searches, settings, peak, counts),
             "agreement": lambda: _agreement(settings, device),
             # the dry run's profile goes beside its JSON, the real one into results/
             "profile": lambda: _profile(args.dry_run, device, out.parent if args.dry_run else RESULTS),
             "ray_sweep": lambda: _ray_sweep(args.dry_run, device)}
    failed = 0
    for name, step in steps.items():
        elapsed = time.perf_counter() - started
        if name in args.skip or (name == "ray_sweep" and not args.ray):
            report[name] = {"skipped": True}
            continue
        if elapsed > args.budget:
            report[name] = {"skipped": f"out of time: {elapsed:.0f} s spent of the {args.budget:.0f} s budget"}
            save()
            continue
        if name == "protocol" and not searches:
            report[name] = {"skipped": "needs the search"}
            continue
        start = time.perf_counter()
        try:
            report[name] = step()
        except Exception as err:  # recorded, and the next step still runs
            failed += 1
            report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        report[name]["step_seconds"] = round(time.perf_counter() - start, 1)
        save()
        print(f"{name}: {json.dumps(report[name])[:600]}", flush=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    save()
    print(f"written {out} in {report['total_seconds']} s")
    return 1 if failed or report.get("gpu_tests", {}).get("returncode", 0) not in (0, 5) else 0


STEPS = ("gpu_tests", "search", "protocol", "agreement", "profile", "ray_sweep")


if __name__ == "__main__":
    raise SystemExit(main())
