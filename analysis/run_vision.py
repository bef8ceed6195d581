"""Every diagnostic that needs no class text, for a pretrained vision tower: ``python -m
analysis.run_vision MODEL --dataset NAME --out FOLDER [--pretrained FILE] [--image-size N]``.

``MODEL`` is a timm model name (``vit_small_patch14_reg4_dinov2``: DINOv2 with registers, a
vision-only model) or an open_clip architecture loaded without its text side
(``ViT-B-16-SigLIP2`` needs no tokenizer files here). Weights come from a local file
(``--pretrained``; nothing is downloaded); without one the tower has random weights.

On ``--images`` images of the dataset (drawn with ``--seed``), writes into ``--out`` the tables
``run_diagnostics`` writes, for what needs no text: ``norms`` (over all patch tokens),
``sinks`` (``high-norm``, ``attention-mass``, ``massive-activation``, plug-ins that need no
text), ``registers`` (the register tokens' norms and the attention they receive, on their own:
they are never counted among the patch tokens), ``attention`` and ``rollout`` (from CLS, when the
tower has one) and ``token_maps``; ``skipped.csv`` names what needs class text (the Sum score and
``sum-all``, head/tail similarity, attribution of a class logit) and why. Domain similarity and
CKA need no text either: ``python -m analysis.cka --model MODEL`` takes the same names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from analysis.config import add_analysis_arguments, analysis_config
from cdfsl_core.atomic import write_json, write_table
from cdfsl_core.cli import command, non_negative_int, parser, positive_int, pretrained_arg, pretrained_value
from cdfsl_core.paths import check_writable_folder


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m analysis.run_vision", __doc__)
    result.add_argument("model", help="a timm model name (vit_small_patch14_reg4_dinov2) or an open_clip architecture")
    result.add_argument("--pretrained", type=pretrained_arg, default=None,
                        help="a local weights file, or 'none' (random weights, the default)")
    result.add_argument("--image-size", type=positive_int, default=None,
                        help="build a timm tower at this input size (None: its default; DINOv2: 518)")
    result.add_argument("--dataset", default="synthetic", help="registered dataset (python -m cdfsl_core.data list)")
    result.add_argument("--data-root", default=None, help="folder holding the datasets (None: $CDFSL_DATA_ROOT)")
    result.add_argument("--images", type=positive_int, default=32, help="images drawn from the dataset")
    result.add_argument("--seed", type=non_negative_int, default=0, help="which images are drawn")
    result.add_argument("--device", default="cpu", help="'auto', 'cpu' or 'cuda'")
    result.add_argument("--out", type=Path, required=True, help="folder for the tables")
    add_analysis_arguments(result, text=False)
    return result


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments answer here, before PyTorch is imported

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.config import AnalysisConfig  # noqa: E402
from analysis.diagnostics import model_view  # noqa: E402
from analysis.keys import act_name  # noqa: E402
from analysis.recorder import record  # noqa: E402
from analysis.run_diagnostics import diagnose_model  # noqa: E402
from cdfsl_core.errors import ConfigError  # noqa: E402
from cdfsl_core.towers import tower_families, vision_tower  # noqa: E402

__all__ = ["diagnose_vision", "register_table"]


@torch.no_grad()
def register_table(model: Any, images: torch.Tensor, /, batch_size: int = 32, **labels: Any) -> pd.DataFrame:
    """The register tokens of the tower in ``model``, on their own, per block and register: the
    mean over ``images`` of the register's norm over the image's median patch-token norm, and of
    the attention it receives (from CLS, and averaged over every query; mean over heads). Empty
    for a tower without registers."""
    tower = vision_tower(model)
    first = 1 if tower.has_cls else 0
    registers = range(first, first + tower.n_registers)
    if not tower.n_registers:
        return pd.DataFrame(columns=[*labels, "block", "register", "norm_over_median_patch", "attention_from_cls",
                                     "attention_mean"])
    layers = list(range(tower.n_blocks))
    sums = torch.zeros(len(layers), tower.n_registers, 3, dtype=torch.float64)
    forward = model_view(model).forward
    for start in range(0, len(images), batch_size):
        with record(model, layers=layers, what=("resid_post", "attn.pattern")) as cache:
            forward(images[start:start + batch_size])
        for li, layer in enumerate(layers):
            x = cache[act_name("resid_post", layer)].float()
            norms = x.norm(dim=-1)
            median = tower.patches(norms.unsqueeze(-1)).squeeze(-1).median(dim=-1).values  # [B]
            pattern = cache[act_name("attn.pattern", layer)].float().mean(dim=1)  # [B, T, T]
            for ri, token in enumerate(registers):
                from_cls = pattern[:, 0, token] if tower.has_cls else torch.full_like(median, float("nan"))
                sums[li, ri] += torch.stack([(norms[:, token] / median).sum(), from_cls.sum(),
                                             pattern[:, :, token].mean(dim=1).sum()]).double()
    means = sums / len(images)
    return pd.DataFrame([{**labels, "block": layer, "register": ri, "norm_over_median_patch": float(means[li, ri, 0]),
                          "attention_from_cls": float(means[li, ri, 1]), "attention_mean": float(means[li, ri, 2])}
                         for li, layer in enumerate(layers) for ri in range(tower.n_registers)])


def diagnose_vision(model: Any, images: torch.Tensor, analysis: AnalysisConfig = AnalysisConfig(), /,
                    **labels: Any) -> dict[str, pd.DataFrame]:
    """The tables of the module doc for a model without class text (a vision tower, a
    :func:`~cdfsl_core.models.load_vision` model) on ``images`` [n, 3, H, W]."""
    model.eval()
    tables = diagnose_model(model, images, None, labels, analysis)
    tables["registers"] = register_table(model, images, **labels)
    for column, value in analysis.columns().items():
        tables["registers"][column] = value
    return tables


@command
def main(argv: list[str] | None = None) -> int:
    from analysis.features import sample_indices
    from cdfsl_core.data import load_dataset
    from cdfsl_core.models import load_vision
    from cdfsl_core.preprocess import load_images, protocol_transform

    args = build_parser().parse_args(argv)
    analysis = analysis_config(args)
    check_writable_folder(args.out, "--out")
    bundle = load_vision(args.model, pretrained_value(args.pretrained), args.device, image_size=args.image_size)
    if not any(family.matches(m) for m in (bundle.model, getattr(bundle.model, "visual", None))
               if isinstance(m, torch.nn.Module) for family in tower_families()):
        raise ConfigError(f"{args.model} is not a ViT tower: run_vision measures vision transformers only (the "
                          f"families {', '.join(f.family for f in tower_families())}); pass a ViT architecture.")
    dataset = load_dataset(args.dataset, args.data_root)
    chosen = sample_indices(len(dataset), args.images, args.seed)
    dataset.check_images(chosen)
    images = load_images(dataset, chosen, protocol_transform(bundle)).to(bundle.info["device"])
    tower = vision_tower(bundle.model)
    print(f"{args.model}: {tower.family} tower, {tower.n_blocks} blocks, {tower.n_registers} registers, "
          f"{'a' if tower.has_cls else 'no'} CLS token, patch grid {tower.grid[0]}x{tower.grid[1]}; "
          f"{len(chosen)} images of {args.dataset}")
    tables = diagnose_vision(bundle.model, images, analysis, model=args.model, dataset=args.dataset)
    for name, table in tables.items():
        write_table(table, args.out / f"{name}.csv")
    settings = {"model": args.model, "pretrained": args.pretrained, "image_size": bundle.info.get("image_size"),
                "dataset": args.dataset, "images": chosen, **json.loads(json.dumps(analysis.columns()))}
    write_json(args.out / "settings.json", settings)
    sinks = tables["sinks"].groupby("definition")["mean_count"].mean()
    print("mean sink tokens per image (over blocks):")
    print(sinks.to_string())
    if not tables["registers"].empty:
        last = tables["registers"][tables["registers"]["block"] == tower.n_blocks - 1]
        print(f"registers in the last block: norm / median patch norm {last['norm_over_median_patch'].mean():.2f}, "
              f"attention from CLS {last['attention_from_cls'].mean():.3f}")
    skipped = tables.get("skipped")
    if skipped is not None and not skipped.empty:
        print("not computed (needs class text): " + "; ".join(skipped["quantity"].unique()))
    print(f"tables: {args.out}/ ({', '.join(f'{name}.csv' for name in sorted(tables))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
