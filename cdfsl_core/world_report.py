"""Measure the embedded world: ``python -m cdfsl_core.world_report``.

Prints (and writes as JSON, and into the model card with ``--card``):

- zero-shot accuracy of the model over all 64 source classes on held-out source images
  (the ``test`` split: an index range never rendered for pretraining);
- 5-way zero-shot accuracy on each target domain, mean and 95% CI over a fixed episode file;
- a domain similarity between the source and each target: ``1 - MMD^2 / 2`` of the model's
  L2-normalised image features, with a Gaussian kernel whose bandwidth is the median pairwise
  distance of the pooled features (MMD^2 is the biased estimate, in [0, 2]; 1 means the two
  feature distributions cannot be told apart by the kernel, 0 that they do not overlap).

The world is meant to show zero-shot accuracy and similarity falling together as the designed
shift grows: crops, satellite, lesions, xray.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cdfsl_core.atomic import write_text
from cdfsl_core.cli import command, parser, positive_int


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m cdfsl_core.world_report", __doc__)
    result.add_argument("--model", default="cdfsl-synth-vit", help="open_clip architecture")
    result.add_argument("--pretrained", default="synthetic", help="tag or weights file")
    result.add_argument("--episodes", type=positive_int, default=100, help="5-way 15-query episodes per target")
    result.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    result.add_argument("--card", type=Path, default=None, help="write the model card here")
    return result


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments answer here, before PyTorch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cdfsl_core.config import episode_config
from cdfsl_core.data import load_dataset  # noqa: E402
from cdfsl_core.data.synthetic import SYNTHETIC_TARGETS  # noqa: E402
from cdfsl_core.episodes import generate_episodes  # noqa: E402
from cdfsl_core.models import load_clip  # noqa: E402
from cdfsl_core.stats import format_mean_ci, json_number, median_gaussian_kernel  # noqa: E402
from cdfsl_core.zeroshot import accuracy, image_features, mean_ci95, text_features, zero_shot_episodes  # noqa: E402


def feature_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - MMD^2 / 2`` between feature sets x [n, d] and y [m, d] (Gaussian kernel, median bandwidth;
    the biased V-statistic, in [0, 2]). The unbiased MMD with references and nulls is
    :func:`analysis.domain.domain_estimate`."""
    kernel, _ = median_gaussian_kernel(torch.cat([x, y]))
    n = len(x)
    mmd2 = kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()
    return float(1 - mmd2 / 2)


def measure(
    name: str, pretrained: str | None, episodes: int = 100, n_similarity: int = 500, seed: int = 0
) -> dict[str, Any]:
    """All numbers of the report, as a dict."""
    bundle = load_clip(name, pretrained)
    source_test = load_dataset("synthetic", split="test", images_per_class=10, seed=seed)
    source_features = image_features(bundle, source_test)
    logits = source_features @ text_features(bundle, source_test.classes).T
    report: dict[str, Any] = {
        "model": name,
        "pretrained": pretrained,
        "source_zero_shot_accuracy": accuracy(logits, source_test.targets),
        "source_classes": len(source_test.classes),
        "source_test_images": len(source_test),
        "episodes": episodes,
        "targets": {},
    }
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(source_test), size=min(n_similarity, len(source_test)), replace=False))
    for target in SYNTHETIC_TARGETS:
        dataset = load_dataset(target, images_per_class=60, seed=seed)
        episode_file = generate_episodes(dataset, episode_config(1, episodes, seed))
        per_episode = zero_shot_episodes(bundle, dataset, episode_file)
        mean, ci = mean_ci95(per_episode)
        sample = np.sort(rng.choice(len(dataset), size=min(n_similarity, len(dataset)), replace=False))
        similarity = feature_similarity(source_features[keep], image_features(bundle, dataset, sample.tolist()))
        report["targets"][target] = {
            "zero_shot_5way_accuracy": json_number(mean),
            "ci95": json_number(ci),
            "episode_file_sha256": episode_file.sha256,
            "domain_similarity": similarity,
            "classes": len(dataset.classes),
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} / {report['pretrained']}",
        f"source zero-shot accuracy over {report['source_classes']} classes "
        f"({report['source_test_images']} held-out images): {100 * report['source_zero_shot_accuracy']:.1f}%",
        f"{'target':<22}{'5-way zero-shot (95% CI)':>28}{'domain similarity':>20}",
    ]
    for target, row in report["targets"].items():
        acc = f"{format_mean_ci(row['zero_shot_5way_accuracy'], row['ci95'])}%"
        lines.append(f"{target:<22}{acc:>28}{row['domain_similarity']:>20.3f}")
    lines.append(f"({report['episodes']} episodes of 5-way 15-query per target; chance is 20%)")
    return "\n".join(lines)


ORGANISM_SECTION = "## As a model organism"  # written by hand from python -m analysis.organism; kept on rewrite


def write_card(report: dict[str, Any], card: Path) -> None:
    """The model card: provenance from pretrain_config.json beside it, and the measured numbers."""
    config_path = card.parent / "pretrain_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    text = f"""# {report['model']} / {report['pretrained']}: the embedded CLIP

A small CLIP (`cdfsl_core/model_configs/{report['model']}.json`: ViT with 6 blocks of width 128,
64x64 images, 8x8 patches = 64 patch tokens + CLS; text transformer of 4 blocks, width 64; joint
space 64) pretrained on the synthetic source domain `synthetic` (64 colour-pattern classes) only.
Weights stored as fp16 safetensors; `load_clip("{report['model']}", "{report['pretrained']}")` loads
them as fp32.

## How it was made
```
python -m cdfsl_core.pretrain --out cdfsl_core/weights --force   # the shipped weights; the default --out is outputs/pretrain
```
Config (`pretrain_config.json`): {json.dumps({k: v for k, v in config.items() if k not in ('command', 'history')})}

Training loss and batch accuracy (running means; all of them in `pretrain_config.json`):
{', '.join(f"step {h['step']}: {h['loss']:.2f} / {h['accuracy']:.2f}" for h in config.get('history', [])[::20])}

Data seed: {config.get('seed', 0)} (the world seed; the same seed renders the same pixels).

## Measured
```
python -m cdfsl_core.world_report --card cdfsl_core/weights/MODEL_CARD.md
```
```
{format_report(report)}
```
Source accuracy is over all 64 classes on held-out images (the `test` index range). Target
accuracy is 5-way zero-shot over a fixed episode file per target, with the class prompts
"a photo of a <pattern> <colour> shape."; target classes are colour-pattern combinations never
seen in pretraining. Domain similarity is `1 - MMD^2/2` of image features (see `cdfsl_core/world_report.py`).

## What was changed until the shift was real
1. Classes were first colour x silhouette, with silhouettes rotated freely. A square rotated
   45 degrees is a diamond, so objects were drawn upright (+-20 degrees), and the hexagon, which
   at 64 px differs from a circle by at most 13% of its radius, became a hollow square. Even so
   the loss stayed at ln 6.4 for 800 steps: the model had learned colour and was uniform over the
   silhouettes of each colour. Classes became colour x surface pattern (local texture that 8x8
   patches see), silhouettes a random nuisance; the loss then fell below that plateau in 150 steps.
2. With the first target renderers the zero-shot order was wrong: crops 35.9%, satellite 50.0%,
   lesions 95.7%, xray 20.9% (similarity 0.869, 0.932, 0.983, 0.813; 100 episodes). Crops had a
   dark soil background with heavy mottling and spots; lesions kept the pattern at full contrast.
   Crops now has a light leafy background, milder mottling and a 40% natural colour cast;
   lesions dilute the pattern to 20% under pigment and skin; xray raised the grey-level
   contrast of the pattern. Only the target renderers changed, so the weights did not.
"""
    kept = card.read_text().partition(ORGANISM_SECTION)[1:] if card.exists() else ("", "")
    write_text(card, text + ("\n" + "".join(kept) if kept[0] else ""))  # the organism section is measured elsewhere


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cdfsl_core.paths import check_writable_file

    for path, flag in ((args.json, "--json"), (args.card, "--card")):
        if path is not None:
            check_writable_file(path, flag)  # before the measurement, not after it
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    report = measure(args.model, args.pretrained, args.episodes)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.card:
        write_card(report, args.card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
