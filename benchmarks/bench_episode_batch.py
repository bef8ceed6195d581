"""Episodes per hour when E episodes train together in one forward, side by side in one run.

    .venv/bin/python benchmarks/bench_episode_batch.py [--model cdfsl-synth-vit] [--pretrained synthetic]
        [--shots 1 5] [--batches 1 4 8 16] [--episodes 16] [--steps 30] [--method coop+lora/tir]
        [--device cpu] [--precision fp32] [--json PATH]

For each shot setting, the same ``--episodes`` episodes run through
:func:`cdfsl_core.episode_loop.run_episode_batch` in chunks of E for every E of ``--batches``
(E = 1 is the sequential runner), each a whole episode (prepare, the queries before and after,
training), after one untimed episode. Reports seconds per episode, episodes per hour, the speed-up over E = 1, and whether
every E gave the same accuracies as E = 1 (they must: tests/test_episode_batch.py). Memory per
episode: what autograd saves for the backward of one training forward of the E episodes, per
episode (any device; ``--no-memory`` skips it), and on a GPU also the peak allocated memory.

``--evaluation``: instead, the query evaluation alone, side by side for each E of ``--batches``:
E episodes evaluated one at a time (``evaluate`` inside the intervention's ``measuring()``, what
the one-episode loop does) against the same E evaluated in one batched forward
(:meth:`cdfsl_core.episode_batch.EpisodeBatch.evaluate`), best of ``--repeats``, with the ratio and
whether both gave the same accuracies.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from benchmark_report import finish

from cdfsl_core import protocol
from cdfsl_core.config import run_config
from cdfsl_core.data import load_dataset
from cdfsl_core.episode_loop import run_episode_batch
from cdfsl_core.episodes import generate_episodes
from cdfsl_core.models import load_clip, resolve_precision
from cdfsl_core.preprocess import ImageCache, protocol_transform

RESULTS = Path(__file__).parent / "results"


def _setup(model: str, pretrained: str | None, shots: int, episodes: int, steps: int, method: str, device: str,
           precision: str, queries: int = protocol.QUERIES):
    adaptation, _, intervention = method.partition("/")
    options = {"images_per_class": 40}
    config = run_config("synthetic-crops", shots, adaptation, intervention, episodes=episodes, steps=steps, model=model,
                        pretrained=pretrained, device=device, precision=precision, data_options=options, queries=queries)
    dataset = load_dataset("synthetic-crops", **options)
    torch.manual_seed(0)
    bundle = load_clip(model, pretrained, device=torch.device(device))
    resolved = resolve_precision(torch.device(device), precision)
    images = ImageCache(dataset, protocol_transform(bundle), device)  # as the runner prepares episodes
    return config, dataset, generate_episodes(dataset, config.episodes), bundle, images, resolved


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model: str = "cdfsl-synth-vit", pretrained: str | None = "synthetic", shots: int = 1,
            batches: tuple[int, ...] = (1, 4, 8, 16), episodes: int = 16, steps: int = 30,
            method: str = "coop+lora/tir", device: str = "cpu", precision: str = "fp32", queries: int = protocol.QUERIES,
            setup: tuple | None = None) -> dict:
    """Seconds per episode and episodes per hour for each E, on the same episodes (``setup``: what
    :func:`_setup` returned for these settings, reused instead of loading again)."""
    config, dataset, drawn, bundle, transform, resolved = setup or _setup(model, pretrained, shots, episodes, steps,
                                                                          method, device, precision, queries)
    rows, accuracies = {}, {}
    # one untimed episode first: the first E measured would otherwise carry the process's warm-up
    # (allocations, thread pools, the image cache's first decodes), which made E = 1 look slower
    run_episode_batch(config, bundle, dataset, drawn, [0], [], transform, resolved)
    for e in batches:
        methods: list = []
        accuracy = []
        if isinstance(transform, ImageCache):  # every E starts with an empty cache, as every run does
            transform = ImageCache(dataset, transform.transform, device)
        peak = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        start = time.perf_counter()
        for first in range(0, episodes, e):
            indices = list(range(first, min(first + e, episodes)))
            methods, lines = run_episode_batch(config, bundle, dataset, drawn, indices, methods, transform, resolved)
            accuracy += [line["accuracy"] for line in lines]
        _sync(device)
        seconds = (time.perf_counter() - start) / episodes
        if device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() / 2**20
        accuracies[e] = accuracy
        rows[str(e)] = {"seconds_per_episode": round(seconds, 4), "episodes_per_hour": round(3600 / seconds, 1),
                        "seconds_per_step_of_the_batch": round(seconds * e / max(1, steps), 4)}
        if peak is not None:
            rows[str(e)]["peak_memory_mib"] = round(peak, 1)
            rows[str(e)]["peak_memory_mib_per_episode"] = round(peak / e, 1)
    base = rows[str(batches[0])]["seconds_per_episode"]
    for e in batches:
        rows[str(e)]["speedup_over_E1"] = round(base / rows[str(e)]["seconds_per_episode"], 3)
    return {"shots": shots, "steps": steps, "queries_per_class": queries, "episodes": episodes, "method": method,
            "precision": resolved,
            "by_episode_batch": rows,
            "same_accuracies_as_E1": all(accuracies[e] == accuracies[batches[0]] for e in batches),
            "accuracies": {str(e): accuracies[e] for e in batches}}


def activation_mib(setup: tuple, e: int) -> float:
    """MiB that autograd keeps for the backward of one training forward of E episodes together
    (every tensor saved for the backward, each storage counted once): what grows with E, on any device."""
    from cdfsl_core.episode_batch import EpisodeBatch, generator_like_global
    from cdfsl_core.episode_loop import prepare_episode
    from cdfsl_core.zeroshot import autocast_for

    config, dataset, drawn, bundle, transform, resolved = setup
    prepared = [prepare_episode(config, bundle, dataset, drawn, i, None, transform) for i in range(e)]
    batch = EpisodeBatch([p[0] for p in prepared], [generator_like_global(p[1].device) for p in prepared]).train()
    seen: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), tensor.device.type)] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast_for(prepared[0][1].device, resolved):
            batch(torch.cat([p[1] for p in prepared])).float().sum()
    batch.eval()
    return sum(seen.values()) / 2**20


def evaluation(setup: tuple, e: int, repeats: int = 3) -> dict:
    """Seconds per episode of evaluating E episodes' queries one at a time and in one batched forward
    (best of ``repeats`` each, alternated), the methods in their initial state."""
    from cdfsl_core.episode_batch import EpisodeBatch
    from cdfsl_core.episode_loop import evaluate, prepare_episode

    config, dataset, drawn, bundle, transform, resolved = setup
    prepared = [prepare_episode(config, bundle, dataset, drawn, i, None, transform) for i in range(e)]
    methods, queries, labels = [p[0] for p in prepared], [p[3] for p in prepared], [p[4] for p in prepared]
    batch = EpisodeBatch(methods)
    size = config.train.eval_batch_size
    device = str(queries[0].device)

    def alone() -> list[float]:
        out = []
        for method, query, label in zip(methods, queries, labels):
            with method.intervention.measuring():
                out.append(evaluate(method, query, label, size, resolved))
        return out

    def together() -> list[float]:
        return batch.evaluate(queries, labels, size, resolved, measure=True)[0]

    best = {"one_at_a_time": float("inf"), "batched": float("inf")}
    results = {}
    for _ in range(repeats):
        for name, call in (("one_at_a_time", alone), ("batched", together)):
            _sync(device)
            start = time.perf_counter()
            results[name] = call()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {"episodes": e, "queries_per_episode": len(queries[0]), "eval_batch_size": size,
            "seconds_per_episode_one_at_a_time": round(best["one_at_a_time"] / e, 4),
            "seconds_per_episode_batched": round(best["batched"] / e, 4),
            "batched_speedup": round(best["one_at_a_time"] / best["batched"], 3),
            "same_accuracies": results["one_at_a_time"] == results["batched"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cdfsl-synth-vit")
    parser.add_argument("--pretrained", default="synthetic")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--method", default="coop+lora/tir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--queries", type=int, default=protocol.QUERIES, help="query images per class (the protocol's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--evaluation", action="store_true", help="the query evaluation alone, one at a time and batched")
    parser.add_argument("--repeats", type=int, default=3, help="with --evaluation: best of this many")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pretrained = None if args.pretrained == "none" else args.pretrained
    result = {"model": args.model, "pretrained": args.pretrained, "device": args.device, "settings": []}
    for shots in args.shots:
        setup = _setup(args.model, pretrained, shots, max(args.episodes, *args.batches), args.steps, args.method,
                       args.device, args.precision, args.queries)
        if args.evaluation:
            report = {"shots": shots, "method": args.method, "precision": setup[-1],
                      "by_episode_batch": {str(e): evaluation(setup, e, args.repeats) for e in args.batches}}
            result["settings"].append(report)
            print(json.dumps(report, indent=2), flush=True)
            continue
        report = measure(args.model, pretrained, shots, tuple(args.batches), args.episodes, args.steps, args.method,
                         args.device, args.precision, args.queries, setup)
        if not args.no_memory:
            for e in args.batches:
                mib = activation_mib(setup, e)
                report["by_episode_batch"][str(e)]["saved_activations_mib"] = round(mib, 1)
                report["by_episode_batch"][str(e)]["saved_activations_mib_per_episode"] = round(mib / e, 2)
        result["settings"].append(report)
        print(json.dumps(report, indent=2), flush=True)
    return finish(result, "bench_episode_batch.py", argv, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
