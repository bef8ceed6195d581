"""Causal tools: ablate tokens (beside a random control), patch activations between two models,
and decompose the logits into the contributions of each block and head.

Every tool runs the same images through the same model with and without the change and reports
the query accuracy and the true-class margin (the logit of the true class minus the largest other
logit, with the method's logit scale). See docs/concepts/diagnostics.md, Causal tools.

**Token ablation** (:func:`ablated`, :func:`ablation_effects`). The patch tokens of a set S entering
vision block b are replaced by ``zero``, by the ``mean`` of the image's other patch tokens at that
point, or by the same positions of another image of the batch (``resample``: the batch rolled by
one). S is a detector's flag on the stream entering block b (the output of block b - 1, where the
diagnostics measure): ``sink:<definition>``, ``bucket:<m>`` (Sum score m), ``head`` or ``tail``
(ATHA's), ``all``; its control is a random set of the same size in every image. The ablation acts
before any intervention hook of block b (ATHA, TIR then see the ablated stream).

**Activation patching** (:func:`patch_effects`). Models A and B on the same images: the output of
vision block b of A (all patch tokens, CLS only, or every token) is replaced by B's; the site
``text`` replaces A's classifier (class text features, the read-out its intervention uses, and the
logit scale) by B's. The recovered share is ``(margin_patched - margin_A) / (margin_B - margin_A)``
of the mean true-class margins. Patching the last block's output and the text reproduces B,
patching nothing reproduces A.

**Direct logit attribution** (:func:`logit_attribution`). The CLS stream after the last block is a
sum: its embedding (CLS + position 0 after ``ln_pre``), each block's edit by the intervention,
each block's attention output (per head through the output projection, plus the projection's
bias) and MLP output. With ``ln_post``'s scale frozen to its value on the full stream of each
image (``scale="image"``, the standard linearisation) and the image feature's norm frozen
likewise, the read-out ``s * normalize(ln_post(x) P) . t_c`` is linear in the stream, so every
component has a contribution to every class logit and the contributions (with the constant
``ln_post`` bias term) sum to the logits. ``scale="batch"`` uses one scale for all images instead
and reports what no longer adds up as the component ``residual``.

Every tool goes through the tower adapter (:mod:`cdfsl_core.towers`): on a timm or EVA trunk the
embedding is the stream entering block 0, each head's write passes through the layer scale, the
read-out is the adapter's (``ln_post``'s role is played by the trunk's final norm and head, and
the ``ln_post bias`` component is that read-out's constant: the norm's bias through the head,
plus the head's bias). Direct logit attribution needs the image feature to be the CLS token's
read-out (``pools_cls``) and pre-norm blocks whose attention splits into heads; other towers
(SigLIP's attention-pooling head, mean pooling) are refused with a message.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from analysis.config import AnalysisConfig
from analysis.diagnostics import TokenDiagnostics
from analysis.recorder import record, vision_tower
from analysis.token_maps import _layer_values, _tir_lam
from cdfsl_core.errors import ConfigError
from cdfsl_core.stats import mean_ci95
from cdfsl_core.towers import vision_tower as tower_of

__all__ = ["ABLATIONS", "ablated", "ablation_effects", "block_outputs", "logit_attribution", "margins", "patch_effects",
           "patched_logits", "random_like", "summarize_effects", "token_set", "token_sets"]

ABLATIONS = ("zero", "mean", "resample")
PATCH_TOKENS = ("all", "patches", "cls")


# ----------------------------------------------------------------------------------------- shared
@torch.no_grad()
def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True-class margin per image: the true class's logit minus the largest other, [n]."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
    return true - others


def _outcome(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()),
            "margin": float(margins(logits, labels).mean())}


def _blocks(method: Any):
    return tower_of(method).blocks


# ----------------------------------------------------------------------------------------- ablation
@torch.no_grad()
def token_set(method: Any, images: torch.Tensor, block: int, name: str,
              analysis: AnalysisConfig = AnalysisConfig()) -> torch.Tensor:
    """Which patch tokens entering ``block`` belong to the set ``name``, [n, L] bool, measured on the
    stream entering the block (the output of block - 1) as the diagnostics measure it:
    ``sink:<definition>``, ``bucket:<m>``, ``head``, ``tail`` or ``all``."""
    return token_sets(method, images, block, [name], analysis)[name]


@torch.no_grad()
def token_sets(method: Any, images: torch.Tensor, block: int, names: Sequence[str],
               analysis: AnalysisConfig = AnalysisConfig()) -> dict[str, torch.Tensor]:
    """:func:`token_set` of each name, from one forward."""
    blocks = _blocks(method)
    if not 1 <= block < len(blocks):
        raise ConfigError(f"ablation block {block}: expected 1..{len(blocks) - 1} (the set is measured on the output "
                          "of the block before).")
    method.eval()
    _, readout = method.text_features(readout=True)
    text_norm = analysis.text_norm or getattr(method.config.settings(), "text_norm", "none")
    diagnostics = TokenDiagnostics.from_config(vision_tower(method), readout, [block - 1], analysis, text_norm)
    unedited: dict[int, torch.Tensor] = {}
    tower = tower_of(method)
    hook = blocks[block - 1].register_forward_pre_hook(
        lambda m, args, kwargs: unedited.__setitem__(0, tower.block_input(args, kwargs).detach()),
        with_kwargs=True, prepend=True)
    try:
        with record(method, layers=[block - 1]) as cache:
            method.encode_image(images, readout)
    finally:
        hook.remove()
    values = _layer_values(diagnostics, cache, block - 1, unedited[0], analysis, _tir_lam(method))
    return {name: _named_set(values, name).cpu() for name in names}


def check_set_names(names: Sequence[str], n_classes: int) -> None:
    """Every token-set name can exist for episodes of ``n_classes`` ways (checked before any work):
    ``bucket:<m>`` with 0 <= m <= n_classes, ``sink:<definition>`` a registered definition, or
    ``head``, ``tail``, ``all``."""
    from analysis.sinks import list_sinks

    for name in names:
        if name.startswith("bucket:"):
            m = name.split(":", 1)[1]
            if not m.isdigit() or int(m) > n_classes:
                raise ConfigError(f"token set {name!r}: the Sum score of a {n_classes}-way episode is 0..{n_classes}; "
                                  f"pass bucket:0 to bucket:{n_classes}.")
        elif name.startswith("sink:"):
            if name[5:] not in list_sinks():
                raise ConfigError(f"token set {name!r}: no such sink definition; expected one of "
                                  f"{['sink:' + k for k in list_sinks()]}.")
        elif name not in ("head", "tail", "all"):
            raise ConfigError(f"token set {name!r}: expected 'sink:<definition>', 'bucket:<m>', 'head', 'tail' or "
                              "'all'.")


def _named_set(values: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name == "all":
        return torch.ones_like(values["sum_score"], dtype=torch.bool)
    if name.startswith("sink:"):
        if name not in values:
            raise ConfigError(f"token set {name!r}: no such sink definition; expected one of "
                              f"{[k for k in values if k.startswith('sink:')]}.")
        return values[name] > 0
    if name.startswith("bucket:"):
        return values["sum_score"] == int(name.split(":", 1)[1])
    if name in ("head", "tail"):
        return values["head_tail"] == (1 if name == "head" else -1)
    raise ConfigError(f"token set {name!r}: expected 'sink:<definition>', 'bucket:<m>', 'head', 'tail' or 'all'.")


def random_like(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random set with as many tokens as ``mask`` in every row (the ablation's control), [n, L] bool."""
    scores = torch.rand(mask.shape, generator=generator)
    order = scores.argsort(dim=1)
    ranks = order.argsort(dim=1)
    return ranks < mask.sum(dim=1, keepdim=True)


@contextmanager
def ablated(method: Any, block: int, mask: torch.Tensor, how: str = "zero") -> Iterator[None]:
    """Within the block, forwards of ``method`` see the patch tokens ``mask`` [n, L] entering vision
    ``block`` replaced by ``how`` (``zero``, ``mean`` of the image's other patch tokens, ``resample``
    from the next image of the batch); the forwards must be of the ``n`` images of the mask."""
    if how not in ABLATIONS:
        raise ConfigError(f"ablation {how!r}; expected one of {ABLATIONS}.")
    tower = tower_of(method)
    prefix = tower.n_prefix  # CLS and registers are never ablated

    def hook(module, args, kwargs):
        x = tower.block_input(args, kwargs)
        if x.shape[0] != mask.shape[0] or x.shape[1] - prefix != mask.shape[1]:
            raise ConfigError(f"the ablation mask is {tuple(mask.shape)} but block {block} receives {tuple(x.shape)}; "
                              "run the forward on the images the mask was made for.")
        chosen = mask.to(x.device).unsqueeze(-1)
        patches = x[:, prefix:]
        if how == "zero":
            replacement = torch.zeros_like(patches)
        elif how == "mean":
            keep = (~chosen).to(patches.dtype)
            replacement = ((patches * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)).expand_as(patches)
        else:
            replacement = patches.roll(1, dims=0)
        x = torch.cat([x[:, :prefix], torch.where(chosen, replacement, patches)], dim=1)
        return tower.with_block_input(args, kwargs, x)

    handle = _blocks(method)[block].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def ablation_effects(method: Any, images: torch.Tensor, labels: torch.Tensor, block: int,
                     sets: Sequence[str] = ("sink:high-norm", "sink:attention-mass", "head", "tail"),
                     how: str = "zero", seed: int = 0, analysis: AnalysisConfig = AnalysisConfig(),
                     **columns: Any) -> pd.DataFrame:
    """For each set, the queries' accuracy and margin with the set ablated and with its random
    control, beside the unablated model: one row per (set, variant), ``variant`` 'set' or
    'control', with ``tokens`` (mean per image), ``d_accuracy`` and ``d_margin`` (ablated minus
    unablated), and ``columns``."""
    method.eval()
    base = _outcome(method(images), labels)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    masks = token_sets(method, images, block, sets, analysis)
    for name in sets:
        mask = masks[name]
        for variant, chosen in (("set", mask), ("control", random_like(mask, generator))):
            with ablated(method, block, chosen, how):
                out = _outcome(method(images), labels)
            rows.append({**columns, "set": name, "variant": variant, "block": block, "ablation": how,
                         "tokens": float(chosen.sum(1).float().mean()), "accuracy": out["accuracy"],
                         "margin": out["margin"], "base_accuracy": base["accuracy"], "base_margin": base["margin"],
                         "d_accuracy": out["accuracy"] - base["accuracy"], "d_margin": out["margin"] - base["margin"]})
    return pd.DataFrame(rows)


def summarize_effects(table: pd.DataFrame, keys: Sequence[str] = ("model", "set", "block", "ablation"),
                      value: str = "d_margin") -> pd.DataFrame:
    """Per ``keys``: the mean effect of the set and of its control over episodes with 95% CIs, and the
    paired difference set - control with its CI (pairs: the same episode)."""
    keys = [k for k in keys if k in table]
    rows = []
    for group, part in table.groupby(keys, sort=False):
        wide = part.pivot_table(index="episode", columns="variant", values=value)
        set_mean, set_ci = mean_ci95(wide["set"].tolist())
        control_mean, control_ci = mean_ci95(wide["control"].tolist())
        diff_mean, diff_ci = mean_ci95((wide["set"] - wide["control"]).tolist())
        rows.append({**dict(zip(keys, group if isinstance(group, tuple) else (group,))), "statistic": value,
                     "episodes": len(wide), "set_effect": set_mean, "set_ci95": set_ci, "control_effect": control_mean,
                     "control_ci95": control_ci, "set_minus_control": diff_mean, "difference_ci95": diff_ci,
                     "tokens": part[part["variant"] == "set"]["tokens"].mean()})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- patching
@contextmanager
def _patched_outputs(method: Any, outputs: Mapping[int, torch.Tensor], tokens: str) -> Iterator[None]:
    if tokens not in PATCH_TOKENS:
        raise ConfigError(f"patch tokens {tokens!r}; expected one of {PATCH_TOKENS}.")
    tower = tower_of(method)
    blocks = tower.blocks
    if tokens == "cls" and not tower.has_cls:
        raise ConfigError("patch tokens 'cls': this tower has no CLS token; patch 'all' or 'patches'.")
    prefix = tower.n_prefix

    def make(block: int):
        def hook(module, args, out):
            source = outputs[block].to(out.dtype)
            if tokens == "all":
                return source.clone()
            out = out.clone()
            if tokens == "cls":
                out[:, :1] = source[:, :1]
            else:  # the patch tokens (registers stay with the prefix)
                out[:, prefix:] = source[:, prefix:]
            return out
        return hook

    handles = [blocks[b].register_forward_hook(make(b)) for b in outputs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_outputs(method: Any, images: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """The outputs of vision ``blocks`` of ``method`` on ``images``, for patching them elsewhere."""
    method.eval()
    _, readout = method.text_features()
    with record(method, layers=list(blocks), what=("resid_post",)) as cache:
        method.encode_image(images, readout)
    return {b: cache[f"blocks.{b}.resid_post"] for b in blocks}


@torch.no_grad()
def patched_logits(method_a: Any, method_b: Any, images: torch.Tensor, blocks: Sequence[int] = (),
                   tokens: str = "all", text: bool = False, outputs_b: Mapping[int, torch.Tensor] | None = None,
                   classifiers: Mapping[int, Any] | None = None) -> torch.Tensor:
    """A's logits on ``images`` with the outputs of vision ``blocks`` (``tokens`` of them) taken from B,
    and with B's classifier when ``text`` (``outputs_b`` and ``classifiers``: computed once by a caller
    patching many sites)."""
    method_a.eval()
    method_b.eval()
    outputs = {}
    if blocks:
        source = outputs_b if outputs_b is not None else block_outputs(method_b, images, blocks)
        outputs = {b: source[b] for b in blocks}
    owner = method_b if text else method_a
    classifier, readout = classifiers[id(owner)] if classifiers else owner.text_features()
    with _patched_outputs(method_a, outputs, tokens):
        image = method_a.encode_image(images, readout)
    return owner.log_scale.exp() * image @ classifier.T


@torch.no_grad()
def patch_effects(method_a: Any, method_b: Any, images: torch.Tensor, labels: torch.Tensor,
                  blocks: Sequence[int] | None = None, tokens: Sequence[str] = ("all", "cls", "patches"),
                  **columns: Any) -> pd.DataFrame:
    """Where B's difference from A lives: for each vision block (default all) and each token choice,
    and for the ``text`` site, A with that part taken from B; ``recovered`` is the share of the mean
    true-class margin difference B - A it gives back (1: all of it, 0: none)."""
    n_blocks = len(_blocks(method_a))
    blocks = list(range(n_blocks)) if blocks is None else list(blocks)
    logits_a, logits_b = method_a.eval()(images), method_b.eval()(images)
    a, b = _outcome(logits_a, labels), _outcome(logits_b, labels)
    gap = b["margin"] - a["margin"]
    rows = []

    def add(site: str, block: int | None, chosen: str, logits: torch.Tensor) -> None:
        out = _outcome(logits, labels)
        rows.append({**columns, "site": site, "block": block, "tokens": chosen, "accuracy": out["accuracy"],
                     "margin": out["margin"], "margin_a": a["margin"], "margin_b": b["margin"],
                     "accuracy_a": a["accuracy"], "accuracy_b": b["accuracy"],
                     "recovered": (out["margin"] - a["margin"]) / gap if abs(gap) > 1e-12 else np.nan})

    outputs_b = block_outputs(method_b, images, blocks)
    classifiers = {id(m): m.text_features() for m in (method_a, method_b)}
    for block in blocks:
        for chosen in tokens:
            add("block output", block, chosen, patched_logits(method_a, method_b, images, [block], chosen,
                                                              outputs_b=outputs_b, classifiers=classifiers))
    add("text", None, "classifier", patched_logits(method_a, method_b, images, text=True, classifiers=classifiers))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- attribution
def _require_cls_pooling(tower: Any, what: str) -> None:
    """Direct logit attribution decomposes the read-out of the CLS token; a tower pooling otherwise
    (mean of tokens, attention pooling) has no such decomposition here."""
    if not tower.pools_cls:
        raise ConfigError(f"{what} decomposes the CLS token's read-out; this {tower.family} tower pools its image "
                          "feature otherwise (mean pooling, an attention-pooling head, or no CLS token).")


@torch.no_grad()
def logit_attribution(method: Any, images: torch.Tensor, labels: torch.Tensor | None = None, scale: str = "image",
                      **columns: Any) -> pd.DataFrame:
    """Each component's contribution to each class logit of each image (see the module doc): one row
    per (image, component, block, head, class) with ``value``; components ``embedding``,
    ``edit`` (the intervention's change of the CLS token entering a block), ``attention`` (per head),
    ``attention bias``, ``mlp``, ``ln_post bias`` and, for ``scale="batch"``, ``residual``.
    ``true_class`` marks the rows of each image's label. Their sum per (image, class) is the logit."""
    if scale not in ("image", "batch"):
        raise ConfigError(f"scale={scale!r}; expected 'image' (exact) or 'batch'.")
    method.eval()
    tower = tower_of(method)
    _require_cls_pooling(tower, "direct logit attribution")
    classifier, readout = method.text_features()
    n = len(images)
    parts, final, stream = _residual_parts(method, tower, images, readout)
    affine = tower.readout_affine()
    centred = stream - stream.mean(-1, keepdim=True)
    sigma = (centred.pow(2).mean(-1, keepdim=True) + affine.eps).sqrt()  # [B, 1]
    if scale == "batch":
        sigma = sigma.mean().expand_as(sigma)
    feature_norm = final.float().norm(dim=-1, keepdim=True)  # [B, 1], frozen likewise
    weight_text = method.log_scale.exp() * classifier.float().T  # [embed, C]
    proj = affine.projection.float() if affine.projection is not None else None
    gamma = affine.gamma.float()

    def project(v: torch.Tensor) -> torch.Tensor:
        return v @ proj if proj is not None else v

    def to_logits(vector: torch.Tensor, centre: bool = True) -> torch.Tensor:
        v = vector.float()
        if centre:
            v = v - v.mean(-1, keepdim=True)
        return (project(v * gamma / sigma) / feature_norm) @ weight_text  # [B, C]

    contributions = [(kind, block, head, to_logits(vector)) for kind, block, head, vector in parts]
    bias = project(affine.beta.float().expand(n, -1))
    if affine.bias is not None:
        bias = bias + affine.bias.float()
    contributions.append(("ln_post bias", None, None, (bias / feature_norm) @ weight_text))
    logits = method.log_scale.exp() * F.normalize(final.float(), dim=-1) @ classifier.float().T
    if scale == "batch":
        total = sum(c[3] for c in contributions)
        contributions.append(("residual", None, None, logits - total))
    table = _contribution_table(contributions, n, classifier.shape[0])
    if labels is not None:
        table["true_class"] = table["class"].to_numpy() == labels.cpu().numpy()[table["image"].to_numpy()]
    table["scale"] = scale
    for key, value in columns.items():
        table[key] = value
    return table


def _residual_parts(method: Any, tower: Any, images: torch.Tensor, readout: torch.Tensor | None,
                    ) -> tuple[list[tuple[str, int | None, int | None, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """One fp32 forward of ``images`` through the method's vision tower with every write to the CLS
    token's residual stream captured: (component, block, head, vector [B, width]) for the
    embedding, each block's intervention edit, each attention head (recomputed inside the adapters
    from the block's captured input), the attention bias and each MLP; with the image feature
    before normalisation and the last block's CLS stream [B, width]."""
    visual, blocks = tower.module, tower.blocks
    n = len(images)
    captured: dict[str, torch.Tensor] = {}
    block_kwargs: dict[int, dict] = {}
    hooks = []

    def keep(i: int):
        def hook(module, args, kwargs):
            captured[f"in.{i}"] = tower.block_input(args, kwargs).detach()
            block_kwargs[i] = {k: v for k, v in kwargs.items() if k != tower.input_keyword}
        return hook

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(keep(i), with_kwargs=True, prepend=True))
        hooks.append(tower.pre_norm(block).register_forward_pre_hook(
            lambda m, args, i=i: captured.__setitem__(f"pre.{i}", args[0].detach())))
        hooks.append(tower.mlp_norm(block).register_forward_pre_hook(
            lambda m, args, i=i: captured.__setitem__(f"mid.{i}", args[0].detach())))
        hooks.append(block.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(f"post.{i}", out.detach())))
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.autocast(images.device.type, enabled=False))
            with method.adapted(), method.intervention.active(visual, readout):
                final = visual(images.float())  # the image feature before normalisation
            # the per-head split needs the adapted attention: recompute inside the adapters
            parts: list[tuple[str, int | None, int | None, torch.Tensor]] = [
                ("embedding", None, None, captured["in.0"][:, 0])]  # the stream entering block 0, before any edit
            with method.adapted():
                for i, block in enumerate(blocks):
                    parts.append(("edit", i, None, captured[f"pre.{i}"][:, 0] - captured[f"in.{i}"][:, 0]))
                    z = tower.pre_norm(block)(captured[f"pre.{i}"].float())
                    heads, bias = tower.head_writes(block, z, block_kwargs.get(i), query=0)  # [B, H, width]
                    for h in range(heads.shape[1]):
                        parts.append(("attention", i, h, heads[:, h]))
                    if bias is not None:
                        parts.append(("attention bias", i, None, bias.float().expand(n, -1)))
                    parts.append(("mlp", i, None, captured[f"post.{i}"][:, 0] - captured[f"mid.{i}"][:, 0]))
    finally:
        for handle in hooks:
            handle.remove()
    return parts, final, captured[f"post.{len(blocks) - 1}"][:, 0].float()


def _contribution_table(contributions: list[tuple[str, int | None, int | None, torch.Tensor]], images: int,
                        classes: int) -> pd.DataFrame:
    """One row per (image, component, block, head, class) of the per-component logits [B, C]."""
    rows = []
    for kind, block, head, values in contributions:
        values = values.detach().cpu().numpy()
        for image in range(images):
            for c in range(classes):
                rows.append((image, kind, block, head, c, float(values[image, c])))
    return pd.DataFrame(rows, columns=["image", "component", "block", "head", "class", "value"])
