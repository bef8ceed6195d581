"""What each causal tool costs, in forwards of the same images: ``benchmarks/bench_causal.py [--images 75]``.

On one set of images and one pair of models (the pretrained embedded CLIP and a coop+lora/tir
copy with drawn LoRA weights), side by side in one process: a plain forward of the method; token
ablation (one set and its control, beside the unablated model: ``ablation_effects`` with one set);
activation patching (every block with all tokens and CLS only, and the classifier:
``patch_effects``); direct logit attribution (``logit_attribution``). Each is timed as the median
of ``--repeats`` runs and reported as seconds and as a multiple of one forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from benchmark_report import finish

from analysis.causal import ablation_effects, logit_attribution, patch_effects
from cdfsl_core.methods import create_method
from cdfsl_core.models import load_clip

NAMES = ["striped red shape", "dotted blue shape", "plain green shape", "wavy pink shape", "checkered black shape"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cdfsl-synth-vit")
    parser.add_argument("--pretrained", default="synthetic")
    parser.add_argument("--images", type=int, default=75, help="query images (an episode's 5 x 15)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    bundle = load_clip(args.model, None if args.pretrained == "none" else args.pretrained)
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(args.images) % 5
    a = create_method(bundle, NAMES, "zeroshot", "none").eval()
    b = create_method(bundle, NAMES, "coop+lora", "tir")
    with torch.no_grad():
        for name, p in b.lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    b.eval()
    n_blocks = len(bundle.model.visual.transformer.resblocks)
    block = max(1, round(n_blocks * 8 / 12))

    def forward():
        with torch.no_grad():
            b(images)

    tools = {
        "forward": forward,
        "ablation (1 set + control)": lambda: ablation_effects(b, images, labels, block, sets=("tail",)),
        "patching (all blocks x {all, cls} + text)": lambda: patch_effects(a, b, images, labels, tokens=("all", "cls")),
        "logit attribution": lambda: logit_attribution(b, images, labels),
    }
    seconds = {}
    for name, run in tools.items():
        run()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    result = {
        "model": args.model, "images": args.images, "blocks": n_blocks,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "forwards": {k: round(v / seconds["forward"], 1) for k, v in seconds.items()},
    }
    return finish(result, "bench_causal.py", argv, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
