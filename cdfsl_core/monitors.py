"""Monitors of a pretraining run: is an attention sink forming, does the text cone hold?

``python -m cdfsl_core.pretrain --monitor-every S`` calls :func:`measure` every ``S`` steps on a
fixed set of held-out ``synthetic-organism`` images, whose background patches are known from the
renderer's masks, and appends the rows to ``<out>/monitors.csv`` (one row per step, tower, block,
head and statistic). A run can be judged by them within minutes (docs "The model organism" gives
the criteria to stop a run early).

Vision tower, per block (its input, the residual stream the block's attention reads) and head:

``max_inflow``        the largest attention a token receives, averaged over the queries (the
                      token's "inflow"), mean over images; uniform attention gives 1 / T
``lands_cls`` ...     where that token is: share of images whose top-inflow token is the CLS
                      token, a register, a background patch (no object pixel in it) or an
                      object patch (``lands_cls``, ``lands_register``, ``lands_background``,
                      ``lands_object``)
``background_sink``   share of images whose top-inflow token is a background patch receiving at
                      least 0.2 of the attention (R3's early check)
``background_mass``   the attention all background patches receive together, over their uniform
                      share (their number over T), mean over queries and images: a sink spread over
                      the identical background tokens (their positions differ, so the top token
                      alone may hold little) shows here; 1 is uniform
``cls_mass``          the same for the CLS token (uniform share 1 / T)
``value_ratio``       what the top-inflow token writes when attended (its value through the output
                      projection, this head's part) over the median token's, median over images:
                      a sink's write is small (the "value drain")
``resid_ratio``       the top-inflow token's residual norm over the median token's, median over
                      images: a sink's is large

Text tower, per block (mean over heads; queries up to the end-of-text token):

``start_inflow``      attention to the start token over what uniform causal attention gives it
                      (1 / (position + 1)), mean over the queries: R2's check

Whole model (block -1): ``zero_shot`` (64-way, through the class prompts "a photo of a {}."),
``prompt_cosine`` (mean pairwise cosine of the 64 class prompts' features: the cone), and the
training ``loss`` (running mean).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdfsl_core.data.organism import class_prompt, scene_of
from cdfsl_core.data.synthetic import SOURCE_COMBOS, to_uint8
from cdfsl_core.towers import vision_tower

CATEGORIES = ("cls", "register", "background", "object")
SINK_INFLOW = 0.2  # R3's threshold: a background token receiving this share of a head's attention
COLUMNS = ("step", "tower", "block", "head", "statistic", "value")


@dataclass(frozen=True)
class MonitorSet:
    """The fixed held-out images, their token categories and the class prompts."""

    images: torch.Tensor  # normalised [B, 3, 64, 64]
    labels: torch.Tensor  # [B] source class
    categories: torch.Tensor  # [B, T] index into CATEGORIES for every token of the vision tower
    prompts: torch.Tensor  # tokenised class prompts [64, context]


def background_patches(masks: np.ndarray, grid: tuple[int, int], level: float = 0.01) -> np.ndarray:
    """[B, rows * cols] bool (row-major): patches without any object pixel (mask below ``level``
    everywhere in the patch). ``masks`` [B, H, W]."""
    b, h, w = masks.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ValueError(f"masks of {h}x{w} pixels do not split into a {rows}x{cols} patch grid")
    peak = masks.reshape(b, rows, h // rows, cols, w // cols).max(axis=(2, 4))
    return (peak < level).reshape(b, -1)


def token_categories(background: np.ndarray, has_cls: bool, n_registers: int) -> torch.Tensor:
    """The category of every token, [B, T], for a sequence laid out as [CLS, registers, patches]."""
    b = background.shape[0]
    prefix = [0] * int(has_cls) + [1] * n_registers
    patches = np.where(background, 2, 3)
    return torch.from_numpy(np.concatenate([np.tile(prefix, (b, 1)), patches], axis=1).astype(np.int64))


def monitor_set(model: nn.Module, tokenizer, n_images: int, seed: int, mean, std) -> MonitorSet:
    """``n_images`` held-out organism images (class i mod 64), normalised for ``model``."""
    tower = vision_tower(model)
    scenes = [scene_of(i % len(SOURCE_COMBOS), i // len(SOURCE_COMBOS), seed, "test") for i in range(n_images)]
    pixels = torch.from_numpy(np.stack([to_uint8(s.image) for s in scenes]))
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    images = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    background = background_patches(np.stack([s.mask for s in scenes]), tower.grid)
    categories = token_categories(background, tower.has_cls, tower.n_registers)
    labels = torch.tensor([i % len(SOURCE_COMBOS) for i in range(n_images)])
    prompts = tokenizer([class_prompt(c) for c in SOURCE_COMBOS])
    return MonitorSet(images, labels, categories, prompts)


def _block_inputs(blocks, run) -> list[torch.Tensor]:
    """Run ``run()`` and return what each of ``blocks`` received as its first argument."""
    captured: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):
        def hook(module, args, kwargs, i=i):
            captured[i] = (args[0] if args else kwargs["x"]).detach()
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return captured  # type: ignore[return-value]


def head_value_writes(block: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """What every token writes through each head when fully attended, [B, heads, T]: the norm of its
    value through that head's slice of the output projection (an open_clip block; ``z`` is the
    output of the block's ``ln_1``)."""
    attn = block.attn
    width = z.shape[-1]
    bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(z, attn.in_proj_weight[2 * width:], bias)  # [B, T, width]
    heads = attn.num_heads
    d_head = width // heads
    v = v.reshape(*v.shape[:2], heads, d_head)  # [B, T, H, dh]
    w = attn.out_proj.weight.reshape(width, heads, d_head)  # out = sum_h v_h @ W[:, h].T
    return torch.einsum("bthd,whd->bhtw", v, w).norm(dim=-1)


def _median_ratio(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, H, T], index [B, H]: the indexed token's value over the median token's, [B, H]."""
    picked = values.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked / values.median(dim=-1).values.clamp_min(1e-12)


@torch.no_grad()
def vision_rows(model: nn.Module, data: MonitorSet) -> Iterator[tuple[str, int, int, str, float]]:
    """Per vision block and head: the top-inflow statistics (module docstring)."""
    tower = vision_tower(model)
    blocks = list(tower.blocks)
    inputs = _block_inputs(blocks, lambda: model.encode_image(data.images))
    for b, (block, x) in enumerate(zip(blocks, inputs)):
        probs = tower.attention_probs(block, x)  # [B, H, T, T]
        inflow = probs.mean(dim=2)  # [B, H, T]: mean over the queries
        top_value, top = inflow.max(dim=-1)  # [B, H]
        where = data.categories.gather(1, top)  # [B, H]
        background = (data.categories == CATEGORIES.index("background")).float()  # [B, T]
        share = background.sum(dim=-1, keepdim=True) / x.shape[1]  # [B, 1] uniform share
        background_mass = ((inflow * background.unsqueeze(1)).sum(dim=-1) / share.clamp_min(1e-12)).mean(dim=0)
        cls_mass = (inflow[..., 0] * x.shape[1]).mean(dim=0) if tower.has_cls else None
        writes = head_value_writes(block, tower.pre_norm(block)(x))
        resid = x.norm(dim=-1).unsqueeze(1).expand_as(inflow)  # [B, H, T]
        value_ratio = _median_ratio(writes, top).median(dim=0).values
        resid_ratio = _median_ratio(resid, top).median(dim=0).values
        for h in range(inflow.shape[1]):
            yield "vision", b, h, "max_inflow", float(top_value[:, h].mean())
            for c, name in enumerate(CATEGORIES):
                yield "vision", b, h, f"lands_{name}", float((where[:, h] == c).float().mean())
            sink = (where[:, h] == CATEGORIES.index("background")) & (top_value[:, h] >= SINK_INFLOW)
            yield "vision", b, h, "background_sink", float(sink.float().mean())
            yield "vision", b, h, "background_mass", float(background_mass[h])
            if cls_mass is not None:
                yield "vision", b, h, "cls_mass", float(cls_mass[h])
            yield "vision", b, h, "value_ratio", float(value_ratio[h])
            yield "vision", b, h, "resid_ratio", float(resid_ratio[h])
        yield "vision", b, -1, "uniform_inflow", 1.0 / x.shape[1]


def causal_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention probabilities ``[B, heads, T, T]`` of an open_clip text block for its input ``x``
    under the causal mask (recomputed from ``ln_1`` and the fused in-projection)."""
    z = block.ln_1(x)
    width = z.shape[-1]
    heads = block.attn.num_heads
    bias = block.attn.in_proj_bias[: 2 * width] if block.attn.in_proj_bias is not None else None
    q, k = F.linear(z, block.attn.in_proj_weight[: 2 * width], bias).chunk(2, dim=-1)
    q = q.reshape(*q.shape[:2], heads, -1).transpose(1, 2)
    k = k.reshape(*k.shape[:2], heads, -1).transpose(1, 2)
    length = x.shape[1]
    causal = torch.full((length, length), float("-inf"), device=x.device).triu(1)
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + causal, dim=-1)


def start_inflow(probs: torch.Tensor, end: torch.Tensor) -> float:
    """Attention to position 0 over what uniform causal attention gives it (1 / (position + 1)), mean
    over heads and over the queries up to each sequence's end-of-text position ``end`` [B]."""
    positions = torch.arange(probs.shape[-1], device=probs.device)
    valid = positions.unsqueeze(0) <= end.unsqueeze(1)  # [B, T]
    ratio = probs[..., 0].mean(dim=1) * (positions + 1).float()  # [B, T]
    return float(ratio[valid].mean())


@torch.no_grad()
def text_rows(model: nn.Module, tokens: torch.Tensor) -> Iterator[tuple[str, int, int, str, float]]:
    """Per text block: attention to the start token over uniform causal attention (module docstring)."""
    blocks = list(model.transformer.resblocks)
    inputs = _block_inputs(blocks, lambda: model.encode_text(tokens))
    end = tokens.argmax(dim=-1)  # the end-of-text token has the largest id (open_clip's convention)
    for b, (block, x) in enumerate(zip(blocks, inputs)):
        yield "text", b, -1, "start_inflow", start_inflow(causal_attention(block, x), end)


@torch.no_grad()
def measure(model: nn.Module, data: MonitorSet) -> list[tuple[str, int, int, str, float]]:
    """Every monitor row of ``model`` on ``data``: (tower, block, head, statistic, value)."""
    was_training = model.training
    model.eval()
    try:
        rows = list(vision_rows(model, data))
        rows.extend(text_rows(model, data.prompts))
        image = F.normalize(model.encode_image(data.images), dim=-1)
        text = F.normalize(model.encode_text(data.prompts), dim=-1)
        zero_shot = float(((image @ text.T).argmax(-1) == data.labels).float().mean())
        gram = text @ text.T
        c = len(text)
        cosine = float((gram.sum() - gram.diagonal().sum()) / (c * (c - 1)))
        rows.append(("model", -1, -1, "zero_shot", zero_shot))
        rows.append(("model", -1, -1, "prompt_cosine", cosine))
    finally:
        model.train(was_training)
    return rows


class MonitorLog:
    """``monitors.csv`` in a run folder, appended and flushed row by row (a killed run keeps what it
    measured); a new run replaces an old file."""

    def __init__(self, path: Path, resume: bool = False, keep_before: int = 0) -> None:
        self.path = path
        kept: list[list[str]] = []
        if resume and path.exists():  # a resumed run keeps the rows of the steps before it
            with path.open(newline="") as handle:
                kept = [row for row in list(csv.reader(handle))[1:] if row and int(row[0]) < keep_before]
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            writer.writerows(kept)

    def write(self, step: int, rows: list[tuple[str, int, int, str, float]]) -> None:
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            for tower, block, head, statistic, value in rows:
                writer.writerow((step, tower, block, head, statistic, f"{value:.6g}"))
            handle.flush()


def headline(rows: list[tuple[str, int, int, str, float]]) -> dict[str, float]:
    """The few numbers for a progress bar: zero-shot, prompt cosine, the strongest background sink
    (share of images, best head), the largest inflow at blocks >= 3 and the text start inflow."""
    def best(statistic: str, min_block: int = 0) -> float:
        values = [v for t, b, h, s, v in rows if s == statistic and b >= min_block]
        return max(values) if values else float("nan")

    return {"zs": best("zero_shot", -1), "cos": best("prompt_cosine", -1), "bg_sink": best("background_sink", 3),
            "bg_mass": best("background_mass", 3),
            "inflow": best("max_inflow", 3), "bos": best("start_inflow")}
