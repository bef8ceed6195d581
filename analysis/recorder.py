"""Record what the vision tower computes, block by block.

    with record(model, layers=[3, 5], what=("resid_post", "attn.pattern")) as cache:
        model(images)                 # any forward that runs the vision tower
    cache["blocks.3.resid_post"]      # [batch, 1 + L, width], CLS first
    cache.stack("resid_post")         # [layer, batch, 1 + L, width]

Keys follow one scheme, pinned by a test:

- ``blocks.{i}.resid_pre``: the residual stream entering block i, after any intervention hook
  (ATHA, TIR) has edited it, i.e. what the block really computes on (taken at the input of
  the block's ``ln_1``);
- ``blocks.{i}.resid_post``: the block's output;
- ``blocks.{i}.attn.pattern``: attention probabilities per head, ``[batch, head, query, key]``,
  recomputed from the block's q and k (LoRA adapters included), since open_clip's fused
  attention does not return them. Record in eval mode: in training mode LoRA's dropout draws
  anew for the recomputation.

``model`` is a CLIP, a :class:`~cdfsl_core.methods.FewShotCLIP`, or a vision tower. Each forward
overwrites the cache, so a loop over batches keeps memory constant (reducers consume the cache
after each batch). Hooks are removed on exit, also when the forward raises.

Tokens an intervention appends after the patches for a forward (a test-time register) are not in
the recordings, as trained registers are not among the patches: ``cache.appended[key]`` holds
them apart (residual streams only), and attention patterns are among the image's tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from analysis.keys import WHAT, act_name
from cdfsl_core.errors import ConfigError
from cdfsl_core.towers import VisionTower
from cdfsl_core.towers import vision_tower as tower_of

__all__ = ["ActivationCache", "WHAT", "record", "vision_tower"]



def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower module inside a CLIP, a FewShotCLIP, or the tower itself (its adapter:
    :func:`cdfsl_core.towers.vision_tower`)."""
    return tower_of(model).module


def attention_pattern(tower: VisionTower, block: nn.Module, z: torch.Tensor, kwargs: dict | None = None) -> torch.Tensor:
    """Softmax(scale q k^T) per head for ``z``, the output of ``block``'s pre-norm
    [batch, token, width] -> [batch, head, query, key] (``kwargs``: the block's forward keyword
    arguments, e.g. rotary embeddings). Recomputed in fp32 whatever the autocast context:
    attention-mass sinks are thresholds on these probabilities, so they must not depend on the
    forward's precision."""
    return tower.attention_probs(block, z, kwargs, normalised=True)


class ActivationCache(Mapping):
    """A read-only mapping of the last forward's recordings."""

    def __init__(self, layers: Sequence[int], what: Sequence[str]) -> None:
        self.layers = list(layers)
        self.what = tuple(what)
        self._store: dict[str, torch.Tensor] = {}
        self.appended: dict[str, torch.Tensor] = {}  # tokens appended after the patches (test-time registers), by key

    def keys_expected(self) -> list[str]:
        return [act_name(w, i) for i in self.layers for w in self.what]

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._store[key]
        except KeyError:
            raise KeyError(f"{key!r} was not recorded; recorded: {sorted(self._store)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def stack(self, what: str) -> torch.Tensor:
        """``what`` of every recorded layer stacked: [layer, ...]."""
        return torch.stack([self[act_name(what, i)] for i in self.layers])

    def to(self, device: torch.device | str) -> "ActivationCache":
        """A copy with every tensor on ``device`` (e.g. to the CPU, to keep one batch's recordings)."""
        return ActivationCache.from_tensors({key: value.to(device) for key, value in self._store.items()})

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "ActivationCache":
        """A cache holding ``tensors`` under their keys (``blocks.{i}.{what}``), as if recorded: for
        tests and for reducers fed from saved activations."""
        parsed = []
        for key in tensors:
            parts = key.split(".", 2)
            if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in WHAT:
                raise ConfigError(f"cache key {key!r}: expected 'blocks.<layer>.<what>' with what in {WHAT}.")
            parsed.append((int(parts[1]), parts[2]))
        cache = cls(sorted({layer for layer, _ in parsed}), tuple(dict.fromkeys(what for _, what in parsed)))
        for key, value in tensors.items():
            cache._put(key, value)
        return cache

    def _put(self, key: str, value: torch.Tensor) -> None:
        self._store[key] = value.detach()

    def _put_stream(self, tower: VisionTower, key: str, value: torch.Tensor) -> None:
        """A residual stream, without the tokens appended after the patches (a test-time register):
        those are kept apart, in ``appended[key]``, so every statistic reads the image's tokens."""
        if tower.appended:
            self.appended[key] = tower.appended_tokens(value).detach()
        self._put(key, tower.image_tokens(value))

    def _put_pattern(self, tower: VisionTower, key: str, value: torch.Tensor) -> None:
        """Attention probabilities among the image's tokens (queries and keys of appended tokens
        dropped: the rows then sum to what the image's tokens receive)."""
        if tower.appended:
            kept = value.shape[-1] - tower.appended
            value = value[..., :kept, :kept]
        self._put(key, value)


@contextmanager
def record(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    what: Sequence[str] = WHAT,
) -> Iterator[ActivationCache]:
    """Capture ``what`` at vision ``layers`` (all when None) during forwards inside the block."""
    tower = tower_of(model)
    blocks = tower.blocks
    n_blocks = len(blocks)
    layers = list(range(n_blocks)) if layers is None else list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_blocks]
    if bad:
        raise ConfigError(f"layers {bad} out of range: this vision tower has blocks 0..{n_blocks - 1}.")
    unknown = [w for w in what if w not in WHAT]
    if unknown:
        raise ConfigError(f"unknown recording(s) {unknown}; expected some of {WHAT}.")
    cache = ActivationCache(layers, what)
    handles = []
    try:
        for i in layers:
            block = blocks[i]
            norm = tower.pre_norm(block)  # sees the stream after any intervention's pre-hook on the block
            if "resid_pre" in what:
                handles.append(norm.register_forward_pre_hook(
                    lambda m, args, i=i: cache._put_stream(tower, act_name("resid_pre", i), args[0])))
            if "attn.pattern" in what:
                extras: dict = {}  # the block's keyword arguments (rotary embeddings), the stream excluded
                handles.append(block.register_forward_pre_hook(
                    lambda m, args, kwargs, extras=extras: extras.update(
                        {k: v for k, v in kwargs.items() if k != tower.input_keyword}), with_kwargs=True))
                handles.append(norm.register_forward_hook(  # the attention looked up at call time (LoRA)
                    lambda m, args, out, i=i, block=block, extras=extras: cache._put_pattern(
                        tower, act_name("attn.pattern", i), attention_pattern(tower, block, out, extras))))
            if "resid_post" in what:
                handles.append(block.register_forward_hook(
                    lambda m, args, out, i=i: cache._put_stream(tower, act_name("resid_post", i), out)))
        yield cache
    finally:
        for handle in handles:
            handle.remove()
