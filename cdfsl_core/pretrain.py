"""Pretrain the embedded CLIP on the synthetic source domain: ``python -m cdfsl_core.pretrain``.

The model aligns images with text prompts "a photo of a striped red shape." on the 64 source
classes.
Loss: CLIP's image-to-text cross-entropy with a learned temperature, where each image is
contrasted against the prompts of all 64 source classes (a batch holds several images of a
class, so CLIP's symmetric in-batch loss would count true pairs as negatives). Prompt templates
vary per step so the text tower learns colour and pattern words, not one sentence per class; that
is what lets it name the targets' held-out combinations zero-shot.

Writes ``<out>/<arch>_synthetic.safetensors`` (fp16) and ``<out>/pretrain_config.json`` into a
folder of the user's (default ``outputs/pretrain``, never the package's own ``weights/``), and
refuses to replace existing weights without ``--force``. Use the result with
``--pretrained <out>/<arch>_synthetic.safetensors``; ``python -m cdfsl_core.world_report`` measures
it and writes its model card.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cdfsl_core.atomic import atomic_path, write_text
from cdfsl_core.cli import command, non_negative_int, parser, positive_float, positive_int
from cdfsl_core.errors import ConfigError

TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a small {}.",
    "a large {}.",
    "the {}.",
)
PACKAGE_WEIGHTS = Path(__file__).parent / "weights"
DEFAULT_OUT = Path("outputs") / "pretrain"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the shipped weights."""

    arch: str = "cdfsl-synth-vit"  # registered architecture (model_configs/*.json)
    seed: int = 0  # world seed and torch seed
    images_per_class: int = 200  # training images per source class, rendered once
    steps: int = 3000  # optimiser steps (25 min on 2 CPU cores)
    batch_size: int = 64  # images per step
    lr: float = 2e-3  # AdamW peak learning rate (cosine decay, linear warm-up)
    warmup: int = 100  # warm-up steps
    weight_decay: float = 0.05  # AdamW weight decay
    threads: int = 2  # torch CPU threads
    checkpoint_every: int = 500  # also save the weights at step 0 and every this many steps (0: only the end)


def build_parser() -> argparse.ArgumentParser:
    defaults = PretrainConfig()
    result = parser("python -m cdfsl_core.pretrain", __doc__)
    result.add_argument("--steps", type=positive_int, default=defaults.steps, help="optimiser steps")
    result.add_argument("--images-per-class", type=positive_int, default=defaults.images_per_class,
                        help="training images per source class")
    result.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="images per step")
    result.add_argument("--lr", type=positive_float, default=defaults.lr, help="AdamW peak learning rate")
    result.add_argument("--seed", type=int, default=defaults.seed, help="world seed and torch seed")
    result.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help="AdamW weight decay on matrices (not on embeddings, norms, biases)")
    result.add_argument("--arch", default=defaults.arch,
                        help="registered architecture (model_configs/*.json); a name ending in -reg<k> adds k "
                             "register tokens to the vision tower")
    result.add_argument("--checkpoint-every", type=non_negative_int, default=defaults.checkpoint_every,
                        help="save the weights at step 0 and every this many steps into <out>/checkpoints "
                             "(0: only the final weights); python -m analysis.organism measures them")
    result.add_argument("--threads", type=positive_int, default=defaults.threads, help="torch CPU threads")
    result.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the weights (created)")
    result.add_argument("--force", action="store_true",
                        help="replace weights already in --out (also needed to write into the package's own weights/)")
    return result


def check_out(out: Path, arch: str, force: bool) -> Path:
    """The weights file ``pretrain`` will write into ``out``, checked before any work: an existing
    file, or the package's shipped weights folder, only with ``force``; a folder that cannot be
    written is an error naming it."""
    from cdfsl_core.paths import check_writable_folder

    weights = out / f"{arch}_synthetic.safetensors"
    if not force:
        if out.resolve() == PACKAGE_WEIGHTS.resolve():
            raise ConfigError(f"--out {out} is the package's own weights folder: every demo and run would use the new "
                              "model. Pass another --out (default outputs/pretrain), or --force to replace the shipped "
                              "model on purpose.")
        if weights.exists():
            raise ConfigError(f"{weights} exists; pretraining would replace it. Pass another --out, or --force to "
                              "replace it.")
    check_writable_folder(out, "--out")
    return weights


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments answer here, before PyTorch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cdfsl_core.data.synthetic import SyntheticDataset, SyntheticSpec, render  # noqa: E402
from cdfsl_core.models import check_architecture, load_clip  # noqa: E402


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W]."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def render_split(domain: str, n_classes: int, images_per_class: int, seed: int, split: str) -> torch.Tensor:
    """All images of a synthetic split as uint8 [n_classes * images_per_class, 64, 64, 3]."""
    total = n_classes * images_per_class
    out = np.empty((total, 64, 64, 3), dtype=np.uint8)
    for k in tqdm(range(total), desc=f"rendering {domain}/{split}", leave=False, mininterval=2):
        c, i = divmod(k, images_per_class)
        out[k] = render(domain, c, i, seed, split)
    return torch.from_numpy(out)


def checkpoint_path(out_dir: Path, step: int) -> Path:
    """Where the weights after ``step`` optimiser steps are saved (``checkpoints/step_00500.safetensors``)."""
    return out_dir / "checkpoints" / f"step_{step:05d}.safetensors"


def save_weights(model: torch.nn.Module, path: Path, config: PretrainConfig, step: int) -> None:
    """The model's weights in fp16 safetensors, written atomically (a killed run leaves no half file),
    with the recipe and the step in the metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"config": json.dumps(asdict(config)), "step": str(step)})


def pretrain(config: PretrainConfig, out_dir: Path) -> Path:
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    bundle = load_clip(config.arch)
    model, tokenizer = bundle.model, bundle.tokenizer
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    source = SyntheticDataset(SyntheticSpec("synthetic", config.images_per_class, config.seed, "train"))
    n_classes = len(source.classes)
    images = render_split("synthetic", n_classes, config.images_per_class, config.seed, "train")
    labels = torch.tensor(source.targets)
    prompts = [tokenizer([t.format(c) for c in source.classes]) for t in TEMPLATES]  # [T][C, ctx]

    def decays(name: str, parameter: torch.Tensor) -> bool:  # matrices, not embeddings or register tokens
        return parameter.ndim >= 2 and "embedding" not in name and "register_tokens" not in name

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))

    out_dir.mkdir(parents=True, exist_ok=True)
    command_line = " ".join(["python -m cdfsl_core.pretrain", *sys.argv[1:]])
    # the recipe first: checkpoints of a run that is stopped or killed can still be measured
    write_text(out_dir / "pretrain_config.json",
               json.dumps({**asdict(config), "command": command_line, "finished": False}, indent=2) + "\n")
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    start = time.perf_counter()
    running: list[float] = []
    history: list[dict[str, float]] = []  # running means, every 25 steps
    bar = tqdm(range(config.steps), desc="pretraining", mininterval=5)
    for step in bar:
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_weights(model, checkpoint_path(out_dir, step), config, step)
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step)
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        batch = normalise(images[index], mean, std)
        flip = torch.rand(config.batch_size, generator=generator) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        template = int(torch.randint(0, len(TEMPLATES), (1,), generator=generator))
        image_features = F.normalize(model.encode_image(batch), dim=-1)
        text_features = F.normalize(model.encode_text(prompts[template]), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        loss = F.cross_entropy(logits, labels[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        batch_accuracy = (logits.argmax(-1) == labels[index]).float().mean().item()
        running = [0.95 * r + 0.05 * v for r, v in zip(running, (loss.item(), batch_accuracy))] if step else [loss.item(), batch_accuracy]
        if step % 25 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{running[0]:.3f}", acc=f"{running[1]:.2f}")
            history.append({"step": step, "loss": round(running[0], 4), "accuracy": round(running[1], 4)})
    minutes = (time.perf_counter() - start) / 60
    model.eval()

    weights = out_dir / f"{config.arch}_synthetic.safetensors"
    save_weights(model, weights, config, config.steps)
    if config.checkpoint_every:
        save_weights(model, checkpoint_path(out_dir, config.steps), config, config.steps)
    write_text(out_dir / "pretrain_config.json",
        json.dumps({**asdict(config), "train_minutes": round(minutes, 2), "command": command_line, "finished": True,
                    "history": history}, indent=2)
        + "\n"
    )
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB) after {minutes:.1f} min of training")
    return weights


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_out(args.out, args.arch, args.force)
    check_architecture(args.arch)
    config = PretrainConfig(
        arch=args.arch,
        seed=args.seed,
        images_per_class=args.images_per_class,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
    )
    pretrain(config, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
