"""Analysis-layer benchmarks, each measured side by side in one run.

    .venv/bin/python benchmarks/bench_analysis.py overhead   # recorded forward / plain forward
    .venv/bin/python benchmarks/bench_analysis.py memory     # peak RSS, 1,000 vs 10,000 images
    .venv/bin/python benchmarks/bench_analysis.py cka        # streaming CKA vs the O(n^2) reference

overhead: the embedded CLIP on batches of 128 synthetic images; 'norms+sinks' records resid_post
and runs the token diagnostics without attention (norms, sum-all, high-norm, massive-activation);
'with attention' also recomputes attention for the attention-mass definition. 11 interleaved
rounds; the ratio is the median of the per-round ratios.
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

    diag_plain = TokenDiagnostics(visual, text, layers, sinks=no_attention)  # built once, as when streaming
    diag_attention = TokenDiagnostics(visual, text, layers)

    def norms_and_sinks():
        with record(visual, layers, what=("resid_post",)) as cache:
            visual(images)
        diag_plain.update(cache)

    def with_attention():
        with record(visual, layers, what=("resid_post", "attn.pattern")) as cache:
            visual(images)
        diag_attention.update(cache)

    variants = (("plain", plain), ("norms+sinks", norms_and_sinks), ("with attention", with_attention))
    samples: dict[str, list[float]] = {name: [] for name, _ in variants}
    with torch.no_grad():
        for _, fn in variants:
            fn()  # warm-up
        for _ in range(11):  # interleaved, so drifts of a busy machine hit every variant alike
            for name, fn in variants:
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    ratios = {name: statistics.median(t / p for t, p in zip(samples[name], samples["plain"]))
              for name in ("norms+sinks", "with attention")}
    return {"seconds_per_batch_of_128": {k: statistics.median(v) for k, v in samples.items()},
            "ratio_norms_sinks": ratios["norms+sinks"], "ratio_with_attention": ratios["with attention"],
            "rounds": 11}


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
    from analysis.cka import CKAAccumulator, cka as plain_cka

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
