"""Pretrain the embedded CLIP: ``python -m cdfsl_core.pretrain``.

Two objectives:

- ``--objective prompts`` (the shipped embedded CLIP): the model aligns ``synthetic`` images with
  text prompts "a photo of a striped red shape." on the 64 source classes. Loss: CLIP's
  image-to-text cross-entropy with a learned temperature, where each image is contrasted against
  the prompts of all 64 source classes (a batch holds several images of a class, so CLIP's
  symmetric in-batch loss would count true pairs as negatives). Prompt templates vary per step so
  the text tower learns colour and pattern words, not one sentence per class; that is what lets
  it name the targets' held-out combinations zero-shot.
- ``--objective captions`` (the model organism): CLIP's own objective, symmetric InfoNCE between
  the images of a batch and their captions, on ``synthetic-organism`` scenes rendered fresh at
  every step (:mod:`cdfsl_core.data.organism`: a grammar of several hundred words, distractors
  named, a share of captions swapped between images), with the logit scale fixed (``--logit-scale
  100``: CLIP's final temperature from the first step, which keeps the text cone), warm-up,
  gradient clipping and a lower learning rate for the text tower. Zero-shot is still measured
  through the class prompts.

``--monitor-every S`` measures the run every ``S`` steps on held-out images
(:mod:`cdfsl_core.monitors`: where each head's attention lands, the sink token's norms, the prompt
cosine, zero-shot) into ``<out>/monitors.csv`` and the progress bar, so a run can be judged early.

Writes ``<out>/<arch>_synthetic.safetensors`` (fp16) and ``<out>/pretrain_config.json`` into a
folder of the user's (default ``outputs/pretrain``, never the package's own ``weights/``), and
refuses to replace existing weights without ``--force`` (which also removes the checkpoints and
monitors of the run it replaces). ``--resume`` continues a stopped run from its last checkpoint
(weights, optimiser state and data stream). Use the result with ``--pretrained
<out>/<arch>_synthetic.safetensors``; ``python -m cdfsl_core.world_report`` measures it and writes
its model card; ``python -m analysis.organism <out>`` measures every checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cdfsl_core.atomic import atomic_path, write_text
from cdfsl_core.cli import command, non_negative_float, non_negative_int, parser, positive_float, positive_int, share
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
OBJECTIVES = ("prompts", "captions")
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
    objective: str = "prompts"  # 'prompts' (64-way CE against the class prompts) or 'captions' (InfoNCE)
    logit_scale: float = 0.0  # fixed logit scale from the first step (0: learned, clamped at 100)
    text_lr: float = 0.0  # the text tower's peak learning rate (0: the same as lr)
    grad_clip: float = 0.0  # clip the gradient's global norm at this value (0: no clipping)
    beta2: float = 0.999  # AdamW's second-moment decay
    caption_swap: float = 0.15  # (captions) share of a batch's captions exchanged between its images
    distractor_rate: float = 0.3  # (captions) share of scenes with distractor objects
    monitor_every: int = 0  # measure the monitors every this many steps (0: never)
    monitor_images: int = 128  # held-out images the monitors use


def build_parser() -> argparse.ArgumentParser:
    defaults = PretrainConfig()
    result = parser("python -m cdfsl_core.pretrain", __doc__)
    result.add_argument("--steps", type=positive_int, default=defaults.steps, help="optimiser steps")
    result.add_argument("--images-per-class", type=positive_int, default=defaults.images_per_class,
                        help="training images per source class")
    result.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="images per step")
    result.add_argument("--lr", type=positive_float, default=defaults.lr, help="AdamW peak learning rate")
    result.add_argument("--seed", type=non_negative_int, default=defaults.seed, help="world seed and torch seed")
    result.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay,
                        help="AdamW weight decay on matrices (not on embeddings, norms, biases)")
    result.add_argument("--arch", default=defaults.arch,
                        help="registered architecture (model_configs/*.json); a name ending in -reg<k> adds k "
                             "register tokens to the vision tower")
    result.add_argument("--checkpoint-every", type=non_negative_int, default=defaults.checkpoint_every,
                        help="save the weights at step 0 and every this many steps into <out>/checkpoints "
                             "(0: only the final weights); python -m analysis.organism measures them")
    result.add_argument("--threads", type=positive_int, default=defaults.threads, help="torch CPU threads")
    result.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective,
                        help="prompts: 64-way CE against the class prompts on 'synthetic' images (the shipped "
                             "model); captions: symmetric InfoNCE with captions on fresh 'synthetic-organism' "
                             "scenes (the model organism)")
    result.add_argument("--logit-scale", type=non_negative_float, default=defaults.logit_scale,
                        help="fix the logit scale at this value from the first step (0: learned)")
    result.add_argument("--text-lr", type=non_negative_float, default=defaults.text_lr,
                        help="peak learning rate of the text tower (0: --lr)")
    result.add_argument("--grad-clip", type=non_negative_float, default=defaults.grad_clip,
                        help="clip the gradient's global norm (0: no clipping)")
    result.add_argument("--beta2", type=share, default=defaults.beta2, help="AdamW's second-moment decay")
    result.add_argument("--warmup", type=non_negative_int, default=defaults.warmup, help="linear warm-up steps")
    result.add_argument("--caption-swap", type=share, default=defaults.caption_swap,
                        help="(captions) share of each batch's captions exchanged between its images")
    result.add_argument("--distractor-rate", type=share, default=defaults.distractor_rate,
                        help="(captions) share of scenes with one or two distractor objects")
    result.add_argument("--monitor-every", type=non_negative_int, default=defaults.monitor_every,
                        help="measure attention inflow, sink norms, prompt cosine and zero-shot every this many "
                             "steps into <out>/monitors.csv (0: never)")
    result.add_argument("--monitor-images", type=positive_int, default=defaults.monitor_images,
                        help="held-out synthetic-organism images the monitors use")
    result.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint (same recipe)")
    result.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the weights (created)")
    result.add_argument("--force", action="store_true",
                        help="replace weights already in --out (also needed to write into the package's own weights/)")
    return result


def check_out(out: Path, arch: str, force: bool, resume: bool = False) -> Path:
    """The weights file ``pretrain`` will write into ``out``, checked before any work: an existing
    file, or the package's shipped weights folder, only with ``force``; a folder that cannot be
    written is an error naming it."""
    from cdfsl_core.paths import check_writable_folder

    weights = out / f"{arch}_synthetic.safetensors"
    if not force and not resume:
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

from cdfsl_core.checkpoints import check_architecture  # noqa: E402
from cdfsl_core.data.synthetic import SyntheticDataset, SyntheticSpec, render  # noqa: E402
from cdfsl_core.models import load_clip  # noqa: E402


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


def state_path(out_dir: Path) -> Path:
    """The optimiser state of the last checkpoint (what ``--resume`` needs besides the weights)."""
    return out_dir / "checkpoints" / "optimiser.pt"


def last_checkpoint(out_dir: Path) -> int | None:
    """The step of the latest checkpoint in ``out_dir``, None without one."""
    steps = [int(p.stem.split("_")[1]) for p in (out_dir / "checkpoints").glob("step_*.safetensors")]
    return max(steps) if steps else None


def clear_run(out_dir: Path, arch: str) -> None:
    """Remove what a previous run left in ``out_dir`` (``--force``): its weights, checkpoints and
    monitors, so that nothing of it is measured as part of the new run."""
    import shutil

    for path in (out_dir / f"{arch}_synthetic.safetensors", out_dir / "monitors.csv", out_dir / "pretrain_config.json"):
        path.unlink(missing_ok=True)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


def _is_text(name: str) -> bool:
    return not name.startswith("visual.") and name != "logit_scale"


def _optimiser(model: torch.nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    def decays(name: str, parameter: torch.Tensor) -> bool:  # matrices, not embeddings or register tokens
        return parameter.ndim >= 2 and "embedding" not in name and "register_tokens" not in name

    groups = []
    for text in (False, True):
        lr = (config.text_lr or config.lr) if text else config.lr
        for decay in (True, False):
            params = [p for n, p in model.named_parameters()
                      if p.requires_grad and _is_text(n) == text and decays(n, p) == decay]
            if params:
                groups.append({"params": params, "weight_decay": config.weight_decay if decay else 0.0,
                               "peak_lr": lr})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2))


def _prompt_loss(config, model, images, labels, prompts, mean, std, generator):
    """The shipped objective's loss on one batch: 64-way CE against one prompt template."""
    index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
    batch = normalise(images[index], mean, std)
    flip = torch.rand(config.batch_size, generator=generator) < 0.5
    batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    template = int(torch.randint(0, len(TEMPLATES), (1,), generator=generator))
    image_features = F.normalize(model.encode_image(batch), dim=-1)
    text_features = F.normalize(model.encode_text(prompts[template]), dim=-1)
    logits = model.logit_scale.exp() * image_features @ text_features.T
    loss = F.cross_entropy(logits, labels[index])
    return loss, (logits.argmax(-1) == labels[index]).float().mean()


def _caption_loss(config, model, tokenizer, step, mean, std):
    """The organism's loss on one batch: symmetric InfoNCE between fresh scenes and their captions
    (the batch is a function of the seed and the step, so a resumed run sees the same data)."""
    from cdfsl_core.data.organism import caption_batch

    rng = np.random.default_rng([config.seed, step])
    batch = caption_batch(rng, config.batch_size, config.caption_swap, config.distractor_rate)
    images = normalise(torch.from_numpy(batch.images), mean, std)  # no flips: captions name left and right
    image_features = F.normalize(model.encode_image(images), dim=-1)
    text_features = F.normalize(model.encode_text(tokenizer(batch.captions)), dim=-1)
    logits = model.logit_scale.exp() * image_features @ text_features.T
    target = torch.arange(len(logits))
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return loss, (logits.argmax(-1) == target).float().mean()


def _save_state(out_dir: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer, step: int,
                history: list) -> None:
    """The fp32 weights and optimiser state at ``step``: a resumed run continues exactly as an
    uninterrupted one (the fp16 checkpoints are for measuring, not for continuing)."""
    path = state_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"step": step, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                    "history": history}, tmp)


def _resume(model: torch.nn.Module, optimiser: torch.optim.Optimizer, out_dir: Path,
            config: PretrainConfig) -> tuple[int, list]:
    """Load the last checkpoint and optimiser state of the run in ``out_dir``; (next step, history)."""
    from safetensors.torch import load_file

    from cdfsl_core.paths import read_json_file

    recipe_file = out_dir / "pretrain_config.json"
    if not recipe_file.exists():
        raise ConfigError(f"--resume: {out_dir} holds no pretrain_config.json; start the run without --resume.")
    recipe = read_json_file(recipe_file, "a pretraining recipe (an object)", "Start the run again with --force.")
    differ = {k: (recipe.get(k), v) for k, v in asdict(config).items() if k != "threads" and recipe.get(k) != v}
    if differ:
        raise ConfigError(f"--resume: the run in {out_dir} was made with another recipe ({differ}, saved vs asked); "
                          "pass the same settings, or --force to start again.")
    step = last_checkpoint(out_dir)
    state = torch.load(state_path(out_dir), weights_only=False) if state_path(out_dir).exists() else None
    if step is None or state is None or state["step"] != step:
        raise ConfigError(f"--resume: {out_dir} has no checkpoint with its optimiser state (checkpoints/step_*."
                          "safetensors and optimiser.pt of the same step); start again with --force.")
    weights = state.get("model") or load_file(str(checkpoint_path(out_dir, step)))
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    optimiser.load_state_dict(state["optimiser"])
    return step, state["history"]


def pretrain(config: PretrainConfig, out_dir: Path, resume: bool = False) -> Path:
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    if config.objective not in OBJECTIVES:
        raise ConfigError(f"objective={config.objective!r}; expected one of {OBJECTIVES}")
    model, tokenizer = _initial_model(config)
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    images, labels, prompts = _prompt_data(config, tokenizer) if config.objective == "prompts" else (None, None, None)
    optimiser = _optimiser(model, config)

    def lr_factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    out_dir.mkdir(parents=True, exist_ok=True)
    command_line = " ".join(["python -m cdfsl_core.pretrain", *sys.argv[1:]])
    first, history = (_resume(model, optimiser, out_dir, config) if resume else (0, []))
    # the recipe first: checkpoints of a run that is stopped or killed can still be measured
    write_text(out_dir / "pretrain_config.json",
               json.dumps({**asdict(config), "command": command_line, "finished": False}, indent=2) + "\n")
    monitors = None
    if config.monitor_every:
        from cdfsl_core.monitors import MonitorLog, headline, measure, monitor_set

        monitor_data = monitor_set(model, tokenizer, config.monitor_images, config.seed, mean, std)
        monitors = MonitorLog(out_dir / "monitors.csv", resume=resume, keep_before=first)
    generator = torch.Generator().manual_seed(config.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()
    start = time.perf_counter()
    running: list[float] = []
    bar = tqdm(range(first, config.steps), desc="pretraining", mininterval=5, initial=first, total=config.steps)
    postfix: dict[str, str] = {}
    for step in bar:
        if config.checkpoint_every and step % config.checkpoint_every == 0 and not (resume and step == first):
            save_weights(model, checkpoint_path(out_dir, step), config, step)
            _save_state(out_dir, model, optimiser, step, history)
        if monitors is not None and step % config.monitor_every == 0:
            rows = measure(model, monitor_data)
            rows.append(("model", -1, -1, "loss", running[0] if running else float("nan")))
            monitors.write(step, rows)
            postfix.update({k: f"{v:.2f}" for k, v in headline(rows).items()})
        for group in optimiser.param_groups:
            group["lr"] = group["peak_lr"] * lr_factor(step)
        if config.objective == "prompts":
            loss, accuracy = _prompt_loss(config, model, images, labels, prompts, mean, std, generator)
        else:
            loss, accuracy = _caption_loss(config, model, tokenizer, step, mean, std)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimiser.step()
        if not config.logit_scale:
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        values = (loss.item(), accuracy.item())
        running = [0.95 * r + 0.05 * v for r, v in zip(running, values)] if running else list(values)
        if step % 25 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{running[0]:.3f}", acc=f"{running[1]:.2f}", **postfix)
            history.append({"step": step, "loss": round(running[0], 4), "accuracy": round(running[1], 4)})
    minutes = (time.perf_counter() - start) / 60
    model.eval()
    if monitors is not None:
        rows = measure(model, monitor_data)
        rows.append(("model", -1, -1, "loss", running[0] if running else float("nan")))
        monitors.write(config.steps, rows)
    return _finish(config, out_dir, model, optimiser, history, {"train_minutes": round(minutes, 2),
                                                                 "command": command_line})


def _initial_model(config: PretrainConfig) -> tuple[Any, Any]:
    """The architecture with random weights (seeded by the caller) and its tokenizer; with a fixed
    ``logit_scale``, the scale set and frozen."""
    bundle = load_clip(config.arch)
    model = bundle.model
    if config.logit_scale:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(config.logit_scale))
        model.logit_scale.requires_grad_(False)
    return model, bundle.tokenizer


def _prompt_data(config: PretrainConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The ``prompts`` objective's data: the source world's training images, their labels and the
    class prompts of every template, tokenized ([T][C, ctx])."""
    source = SyntheticDataset(SyntheticSpec("synthetic", config.images_per_class, config.seed, "train"))
    images = render_split("synthetic", len(source.classes), config.images_per_class, config.seed, "train")
    prompts = [tokenizer([t.format(c) for c in source.classes]) for t in TEMPLATES]
    return images, torch.tensor(source.targets), prompts


def _finish(config: PretrainConfig, out_dir: Path, model: Any, optimiser: Any, history: list[dict],
            recorded: dict[str, Any]) -> Path:
    """The trained weights (and, with checkpoints, the last checkpoint and its resumable state),
    then the recipe marked finished with ``recorded`` and the loss history; returns the weights."""
    weights = out_dir / f"{config.arch}_synthetic.safetensors"
    save_weights(model, weights, config, config.steps)
    if config.checkpoint_every:
        save_weights(model, checkpoint_path(out_dir, config.steps), config, config.steps)
        _save_state(out_dir, model, optimiser, config.steps, history)
    write_text(out_dir / "pretrain_config.json",
               json.dumps({**asdict(config), **recorded, "finished": True, "history": history}, indent=2) + "\n")
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB) after {recorded['train_minutes']:.1f} min of training")
    return weights


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.force and args.resume:
        raise ConfigError("--force starts the run again and --resume continues it: pass one of them.")
    check_out(args.out, args.arch, args.force, args.resume)
    check_architecture(args.arch)
    config = PretrainConfig(
        arch=args.arch,
        seed=args.seed,
        images_per_class=args.images_per_class,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        objective=args.objective,
        logit_scale=args.logit_scale,
        text_lr=args.text_lr,
        grad_clip=args.grad_clip,
        beta2=args.beta2,
        caption_swap=args.caption_swap,
        distractor_rate=args.distractor_rate,
        monitor_every=args.monitor_every,
        monitor_images=args.monitor_images,
    )
    if args.force:
        clear_run(args.out, args.arch)
    pretrain(config, args.out, resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
