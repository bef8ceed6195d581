"""Token maps: every per-token quantity the diagnostics compute, for each chosen image and block,
on the image's patch grid.

    table = token_maps(method, images, model="pretrained")            # one model
    table = compare_token_maps({"pretrained": a, "coop+lora": b}, images)  # the same images, several models
    figures.token_maps(table, display_images(images, bundle), block=4)

One tidy row per (image, token, block, model, quantity): columns ``image``, ``token`` (patch index
j, 0-based, prefix tokens such as CLS excluded), ``row``, ``col`` (its place on the patch grid),
``block``, ``model``, ``quantity``, ``value``, and any labels passed. Quantities, at block b:

=======================  ==========================================================================
quantity                 value for patch token j
=======================  ==========================================================================
``sum_score``            TIR's Sum score m_j (0..N) of the stream after block b (the ``norms``
                         table's bucket)
``tir_weight``           TIR's weight w(m_j) (the method's lambda for TIR, else TIR's default)
``norm``                 the token's norm after block b in the analysis space and transform (the
                         ``norms`` table's value)
``max_similarity``       max_c cos(x_j, u~_c) with ATHA's class vectors (the ``head_tail`` value)
``head_tail``            1 in ATHA's head (the floor(rho_head L) largest ``max_similarity``), -1 in
                         its tail (the floor(rho_tail L) smallest), 0 neither
``pulled_class``         argmax_c of that cosine: the class a head token is pulled toward
``pushed_class``         argmin_c: the class a tail token is pushed from (ATHA's ``tail_class=least``)
``sink:<definition>``    1 when the registered sink definition flags the token, else 0 (the
                         ``sinks`` table counts these)
``attention_from_cls``   the attention CLS gives the token in block b (mean over heads)
``attention_mean``       the attention the token receives in block b, mean over queries and heads
``edit``                 how much the method's intervention changed the token entering block b:
                         ``|x_edited - x| / |x|`` (ATHA's edit size, TIR's ``|w - 1|``; 0 where
                         the method does not intervene)
=======================  ==========================================================================

On a model without class text (a vision tower, DINOv2 with registers, a CLIP loaded without a
tokenizer) the quantities of ``TEXT_QUANTITIES`` and text-based sink definitions (``sum-all``)
are left out: the maps hold norms, attention, the other sinks and ``edit`` (0).

The stream, the Sum scores, the class vectors and the sink masks are computed by
:class:`~analysis.diagnostics.TokenDiagnostics` itself, so a map's mean over tokens equals the
corresponding entry of the ``norms``, ``sinks`` and ``head_tail`` tables on the same images (a
test checks it).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from analysis.config import AnalysisConfig
from analysis.diagnostics import TokenDiagnostics, model_view
from analysis.keys import act_name
from analysis.recorder import record
from cdfsl_core.config import TIRConfig
from cdfsl_core.errors import ConfigError
from cdfsl_core.token_text import head_tail_sets, tir_weights
from cdfsl_core.towers import vision_tower

__all__ = ["QUANTITIES", "TEXT_QUANTITIES", "balanced_indices", "compare_token_maps", "display_images", "patch_grid", "token_maps"]

QUANTITIES = ("sum_score", "tir_weight", "norm", "max_similarity", "head_tail", "pulled_class", "pushed_class",
              "attention_from_cls", "attention_mean", "edit")  # plus one sink:<definition> per registered definition
TEXT_QUANTITIES = ("sum_score", "tir_weight", "max_similarity", "head_tail", "pulled_class", "pushed_class")
CATEGORICAL = ("head_tail", "pulled_class", "pushed_class")  # drawn with a discrete colour map


def balanced_indices(labels: Sequence[int], n: int) -> list[int]:
    """The first ``n`` positions of ``labels`` taken round-robin over the classes (class 0's first,
    class 1's first, ..., class 0's second, ...), so a few images of an episode's class-major query
    list cover its classes; all positions when ``n`` is 0 or more than there are."""
    labels = [int(v) for v in labels]
    if n <= 0 or n >= len(labels):
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    chosen: list[int] = []
    rank = 0
    while len(chosen) < n:
        for positions in by_class.values():
            if rank < len(positions) and len(chosen) < n:
                chosen.append(positions[rank])
        rank += 1
    return sorted(chosen)


def patch_grid(tokens: int, prefix: int | None = None) -> tuple[int, int]:
    """(prefix tokens, grid side) of a stream of ``tokens`` tokens: the patch tokens must form a
    square grid after ``prefix`` tokens (CLS, registers); ``prefix=None`` takes the largest square
    that fits (one CLS for open_clip's towers, none for a tower without a prefix)."""
    if prefix is None:
        side = math.isqrt(tokens)
        prefix = tokens - side * side
    side = math.isqrt(tokens - prefix)
    if prefix < 0 or side * side != tokens - prefix:
        raise ConfigError(f"{tokens} tokens with {prefix} prefix tokens do not leave a square patch grid; "
                          "pass the tower's number of prefix tokens.")
    return prefix, side


def _tir_lam(method: Any) -> float:
    settings = getattr(getattr(method, "config", None), "settings", None)
    config = settings() if callable(settings) else None
    return config.lam if isinstance(config, TIRConfig) else TIRConfig().lam


@torch.no_grad()
def token_maps(method: Any, images: torch.Tensor, *, layers: Sequence[int] | None = None,
               analysis: AnalysisConfig = AnalysisConfig(), model: str = "model", image_ids: Sequence[Any] | None = None,
               batch_size: int = 32, **labels: Any) -> pd.DataFrame:
    """Every quantity of the module doc for ``method`` (a :class:`~cdfsl_core.methods.FewShotCLIP`,
    or a model without class text: then those of ``TEXT_QUANTITIES`` are left out) on
    ``images`` [n, 3, H, W] at ``layers`` (default all blocks), labelled ``model`` and ``labels``;
    ``image_ids`` name the images (default 0..n-1). The method is put in eval mode."""
    method.eval()
    visual = vision_tower(method)
    blocks = visual.blocks
    layers = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    image_ids = list(range(len(images))) if image_ids is None else list(image_ids)
    if len(image_ids) != len(images):
        raise ConfigError(f"{len(image_ids)} image ids for {len(images)} images.")
    view = model_view(method)
    diagnostics = TokenDiagnostics.from_config(visual, view.readout, layers, analysis, view.text_norm)
    lam = _tir_lam(method)
    parts: list[pd.DataFrame] = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        ids = image_ids[start:start + batch_size]
        unedited: dict[int, torch.Tensor] = {}  # the stream entering each block before any intervention hook

        def keep(i: int):
            def hook(module, args, kwargs):
                unedited[i] = visual.block_input(args, kwargs).detach()
            return hook

        handles = [blocks[i].register_forward_pre_hook(keep(i), with_kwargs=True, prepend=True) for i in layers]
        try:
            with record(method, layers=layers) as cache:
                view.forward(batch)
        finally:
            for handle in handles:
                handle.remove()
        for layer in layers:
            values = _layer_values(diagnostics, cache, layer, unedited[layer], analysis, lam)
            parts.append(_rows(values, ids, layer))
    table = pd.concat(parts, ignore_index=True)
    table.insert(4, "model", model)
    for key, value in labels.items():
        table[key] = value
    return table


def _layer_values(diagnostics: TokenDiagnostics, cache: Any, layer: int, unedited: torch.Tensor,
                  analysis: AnalysisConfig, lam: float) -> dict[str, torch.Tensor]:
    """{quantity: [B, L]} at one block, from the recording of one batch."""
    p = diagnostics.tower.n_prefix  # the patch tokens follow the prefix (CLS, registers)
    with torch.autocast(unedited.device.type, enabled=False):
        x = cache[act_name("resid_post", layer)].float()
        counts, residual_norms, projected_norms = diagnostics._scores(x)
        norms = projected_norms if analysis.space == "projected" else residual_norms
        pattern = cache[act_name("attn.pattern", layer)].float().mean(dim=1)  # [B, T, T], mean over heads
        entering = cache[act_name("resid_pre", layer)].float()[:, p:]
        before = unedited.float()[:, p:]
        norm = norms.log() if analysis.transform == "log" else norms
        values = {"norm": norm}
        if diagnostics.text is not None:
            similarity = (F.linear(x, diagnostics._unit_vectors.to(x.device))[:, p:]
                          / residual_norms.clamp_min(1e-12).unsqueeze(-1))  # [B, L, C] cosines with the class vectors
            best, pulled = similarity.max(dim=-1)
            head, tail = head_tail_sets(best, analysis.rho_head, analysis.rho_tail)
            values = {
                "sum_score": counts.float(),
                "tir_weight": tir_weights(counts, diagnostics.n_classes, lam),
                "norm": norm,
                "max_similarity": best,
                "head_tail": head.float() - tail.float(),
                "pulled_class": pulled.float(),
                "pushed_class": similarity.argmin(dim=-1).float(),
            }
        values |= {
            "attention_from_cls": (pattern[:, 0, p:] if diagnostics.tower.has_cls
                                   else torch.full_like(norm, float("nan"))),  # no CLS: no attention from it
            "attention_mean": pattern[:, :, p:].mean(dim=1),
            "edit": (entering - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12),
        }
        for sink in diagnostics.sinks:
            values[f"sink:{sink.name}"] = diagnostics._sink_mask(sink, layer, cache, x, counts, residual_norms).float()
        return values


def _rows(values: Mapping[str, torch.Tensor], image_ids: Sequence[Any], layer: int) -> pd.DataFrame:
    batch, length = next(iter(values.values())).shape
    _, side = patch_grid(length, 0)
    token = np.tile(np.arange(length), batch)
    frames = []
    for quantity, tensor in values.items():
        frames.append(pd.DataFrame({
            "image": np.repeat(np.asarray(image_ids, dtype=object), length), "token": token,
            "row": token // side, "col": token % side, "block": layer, "quantity": quantity,
            "value": tensor.detach().cpu().double().numpy().reshape(-1)}))
    return pd.concat(frames, ignore_index=True)


def compare_token_maps(models: Mapping[str, Any], images: torch.Tensor, **settings: Any) -> pd.DataFrame:
    """:func:`token_maps` of each model (``{label: method}``) on the same ``images``, in one table."""
    return pd.concat([token_maps(method, images, model=label, **settings) for label, method in models.items()],
                     ignore_index=True)


def display_images(images: torch.Tensor, preprocess: Mapping[str, Any] | Any) -> np.ndarray:
    """Preprocessed ``images`` [n, 3, H, W] back to displayable RGB floats [n, H, W, 3] in [0, 1]:
    ``preprocess`` is the tower's ``preprocess_cfg`` (mean, std) or a bundle/model that has one."""
    cfg = preprocess
    for attribute in ("model", "visual"):
        cfg = getattr(cfg, attribute, cfg)
    cfg = getattr(cfg, "preprocess_cfg", cfg)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    pixels = images.detach().float().cpu() * std + mean
    return pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()
