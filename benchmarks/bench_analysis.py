"""Analysis-layer benchmarks, each measured side by side in one run.

    .venv/bin/python benchmarks/bench_analysis.py overhead   # recorded forward / plain forward
    .venv/bin/python benchmarks/bench_analysis.py memory     # peak RSS, 1,000 vs 10,000 images
    .venv/bin/python benchmarks/bench_analysis.py cka        # streaming CKA vs the O(n^2) reference

overhead: the embedded CLIP on batches of 128 synthetic images, every block recorded. 'recording
only' stores resid_post; 'norms+sinks' also reduces it to token norms and the sink counts that
need no attention (sum-all, high-norm, massive-activation); 'norms+sinks+head/tail' adds the
head/tail similarity histogram; 'with attention' also recomputes attention for attention-mass.
21 interleaved rounds; reported: the median of the per-round ratios to the plain forward and the
ratio of the fastest rounds.
memory: each size runs in a fresh subprocess; the peak resident set size of the two is compared.
cka: n = 5,000 random features of width 768; the plain estimate builds 5,000 x 5,000 Grams.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROUNDS = 21


def _setup(n_images: int = 128):
    from cdfsl_core.data import load_dataset
    from cdfsl_core.models import EMBEDDED_MODEL, load_clip
    from cdfsl_core.runner import protocol_transform
    from cdfsl_core.zeroshot import text_features

    bundle = load_clip(*EMBEDDED_MODEL)
    dataset = load_dataset("synthetic", images_per_class=max(1, n_images // 64 + 1))
    transform = protocol_transform(bundle, 1.15)
    text = text_features(bundle, dataset.classes[:5])
    return bundle, dataset, transform, text


def overhead() -> dict:
    from analysis.diagnostics import SINK_DEFINITIONS, TokenDiagnostics
    from analysis.recorder import record

    bundle, dataset, transform, text = _setup()
    visual = bundle.model.visual
    images = torch.stack([transform(dataset.load_image(i)) for i in range(128)])
    layers = list(range(len(visual.transformer.resblocks)))
    no_attention = [SINK_DEFINITIONS[k] for k in ("sum-all", "high-norm", "massive-activation")]

    def plain():
        visual(images)

    def recording_only():
        with record(visual, layers, what=("resid_post",)):
            visual(images)

    # built once, as when streaming over batches
    lean = TokenDiagnostics(visual, text, layers, sinks=no_attention, head_tail=False)
    full = TokenDiagnostics(visual, text, layers, sinks=no_attention)
    everything = TokenDiagnostics(visual, text, layers)

    def recorded(diagnostics, what):
        def fn():
            with record(visual, layers, what=what) as cache:
                visual(images)
            diagnostics.update(cache)
        return fn

    variants = {"plain": plain, "recording only": recording_only,
                "norms+sinks": recorded(lean, ("resid_post",)),
                "norms+sinks+head/tail": recorded(full, ("resid_post",)),
                "with attention": recorded(everything, ("resid_post", "attn.pattern"))}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(ROUNDS):  # interleaved, so drifts of a busy machine hit every variant alike
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    others = [name for name in variants if name != "plain"]
    # the fastest round is the least disturbed by the rest of a shared machine (as timeit
    # advises); the ratio of minimums is reported beside the median of per-round ratios
    return {"seconds_per_batch_of_128": {k: statistics.median(v) for k, v in samples.items()},
            "median_ratio": {name: statistics.median(t / p for t, p in zip(samples[name], samples["plain"]))
                             for name in others},
            "ratio_of_minimums": {name: min(samples[name]) / min(samples["plain"]) for name in others},
            "rounds": ROUNDS, "threads": torch.get_num_threads()}


def _stream(n_images: int) -> None:
    from analysis.diagnostics import TokenDiagnostics
    from analysis.recorder import record

    bundle, dataset, transform, text = _setup(n_images)
    visual = bundle.model.visual
    layers = list(range(len(visual.transformer.resblocks)))
    diag = TokenDiagnostics(visual, text, layers)
    with torch.no_grad():
        for start in range(0, n_images, 128):
            batch = torch.stack([transform(dataset.load_image(i)) for i in range(start, min(start + 128, n_images))])
            with record(visual, layers) as cache:
                visual(batch)
            diag.update(cache)
    print(json.dumps({"images": n_images, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory() -> dict:
    results = {}
    for n in (1000, 10000):
        out = subprocess.run([sys.executable, __file__, "_stream", str(n)], capture_output=True, text=True, check=True)
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return {"peak_rss_mb": results, "ratio_10000_over_1000": results[10000] / results[1000]}


def cka() -> dict:
    from analysis.cka import CKAAccumulator
    from analysis.cka import cka as plain_cka

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 768, generator=gen, dtype=torch.float64)
    y = F.normalize(x @ torch.randn(768, 768, generator=gen, dtype=torch.float64) + torch.randn(5000, 768, generator=gen, dtype=torch.float64))
    start = time.perf_counter()
    reference = plain_cka(x, y, "linear", "debiased")
    plain_seconds = time.perf_counter() - start
    start = time.perf_counter()
    acc = CKAAccumulator("linear", "debiased")
    for i in range(0, 5000, 500):
        acc.update(x[i:i + 500], y[i:i + 500])
    streamed = acc.value()
    stream_seconds = time.perf_counter() - start
    return {"n": 5000, "width": 768, "plain_seconds": plain_seconds, "streaming_seconds_batch_500": stream_seconds,
            "speedup": plain_seconds / stream_seconds, "plain_cka": reference, "streaming_cka": streamed}


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1] == "_stream":
        _stream(int(sys.argv[2]))
    else:
        print(json.dumps({"overhead": overhead, "memory": memory, "cka": cka}[sys.argv[1]](), indent=2))
