"""Register neurons and test-time registers (Jiang et al. 2025, "Vision Transformers Don't Need
Trained Registers"), beside TIR.

High-norm outlier tokens in CLIP ViTs are written by a sparse set of MLP neurons in early-middle
blocks ("register neurons"), which fire on the outlier positions. :func:`find_register_neurons`
ranks every MLP neuron of blocks ``0..highest_block`` by its mean |activation| at the outlier
tokens of the ``outlier_block``'s output (high-norm patch tokens: norm above ``tau`` times the
image's median patch norm), averaged over the images that have outliers, and keeps the
``top_k``.

:class:`TestTimeRegister` appends one token after the patches (zeros, or the mean patch token,
entering block 0) and, at every register neuron, sets the register's activation to the neuron's
largest activation over all tokens and the patch tokens' activations to zero: the outlier moves
out of the image into the register, with no training. The appended token is removed before the
pooling; while it is in the stream the tower adapter reports it (``appended``), so that patch
statistics, recordings and the other interventions leave it out, as they leave trained registers
out. ``tir+test-time-register`` runs TIR's re-weighting with the register in place.

The register neurons of a method built without ``neurons`` are detected once per model and
settings when the method is built (:meth:`TestTimeRegister.bind`), on ``detect_images`` test
images of ``detect_dataset`` (the source world by default, as the authors detect on ImageNet);
each episode line records them. See docs/concepts/methods.md, test-time registers.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from cdfsl_core.config import TestTimeRegisterConfig, TIRConfig, TIRRegisterConfig
from cdfsl_core.errors import ConfigError
from cdfsl_core.interventions.base import Intervention, check_blocks, register_intervention
from cdfsl_core.interventions.tir import TIR
from cdfsl_core.towers import vision_tower

__all__ = ["RegisterNeurons", "TIRWithRegister", "TestTimeRegister", "default_highest_block", "detect_images",
           "find_register_neurons"]

REGISTER_INITS = ("zeros", "mean")


def default_highest_block(n_blocks: int) -> int:
    """The last candidate block: the authors' 5 of 12 for ViT-B/16, ``round(5n/12)`` at other depths."""
    return min(n_blocks - 1, round(5 * n_blocks / 12))


@dataclass
class RegisterNeurons:
    """What :func:`find_register_neurons` found."""

    neurons: list[tuple[int, int]]  # (block, neuron), best first
    scores: torch.Tensor  # [candidate blocks, hidden]: mean |activation| at the outlier tokens
    images: int  # images seen
    images_with_outliers: int  # images that had at least one outlier token (only these are scored)
    outliers_per_image: float  # mean number of outlier tokens per image with outliers

    def score(self, block: int, neuron: int) -> float:
        return float(self.scores[block, neuron])


@torch.no_grad()
def find_register_neurons(model: nn.Module, batches: Sequence[torch.Tensor] | torch.Tensor, *, top_k: int = 10,
                          highest_block: int | None = None, outlier_block: int = -1, tau: float = 2.0,
                          encode: Callable[[torch.Tensor], Any] | None = None) -> RegisterNeurons:
    """Rank the MLP neurons of blocks ``0..highest_block`` by their mean |activation| at the
    outlier tokens (patch tokens of ``outlier_block``'s output with norm > ``tau`` x the image's
    median patch norm), over the images with outliers; keep the ``top_k``.

    ``model`` holds a vision tower (a CLIP, a FewShotCLIP or the tower); ``batches`` are
    preprocessed images (one tensor or a sequence of them); ``encode`` runs a forward (default:
    ``model.encode_image``, else ``model``). No outlier in any image: no neuron (an empty list).
    """
    tower = vision_tower(model)
    blocks = tower.blocks
    n = len(blocks)
    highest = default_highest_block(n) if highest_block is None else highest_block
    check_blocks("register-neuron highest_block", (highest,), n)
    if not -n <= outlier_block < n:
        raise ConfigError(f"register-neuron outlier_block {outlier_block} out of range for {n} blocks "
                          f"({-n}..{n - 1}; -1 is the last).")
    if top_k < 0 or tau <= 0:
        raise ConfigError(f"top_k={top_k}, tau={tau}: expected top_k >= 0 and tau > 0.")
    if encode is None:
        encode = getattr(model, "encode_image", model)
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    activations: dict[int, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}
    handles = [tower.mlp_activation(blocks[b]).register_forward_hook(
        lambda m, a, out, b=b: activations.__setitem__(b, out.detach())) for b in range(highest + 1)]
    handles.append(blocks[outlier_block % n].register_forward_hook(
        lambda m, a, out: captured.__setitem__("out", out.detach())))
    sums = None
    images = scored = 0
    outliers = 0.0
    try:
        for images_batch in batches:
            encode(images_batch)
            norms = tower.patches(captured["out"]).float().norm(dim=-1)  # [B, L]
            mask = norms > tau * norms.median(dim=-1, keepdim=True).values
            has = mask.any(dim=-1)
            images += len(mask)
            if not bool(has.any()):
                continue
            scored += int(has.sum())
            outliers += float(mask[has].sum())
            weights = (mask[has].float() / mask[has].sum(dim=-1, keepdim=True))  # [B', L], rows sum to 1
            per_block = torch.stack([
                torch.einsum("bl,blh->h", weights, tower.patches(activations[b][has]).float().abs())
                for b in range(highest + 1)])  # [blocks, hidden], summed over images
            sums = per_block if sums is None else sums + per_block
    finally:
        for handle in handles:
            handle.remove()
    if sums is None:
        hidden = int(tower.mlp_output(blocks[0]).weight.shape[1])
        return RegisterNeurons([], torch.zeros(highest + 1, hidden), images, 0, 0.0)
    scores = (sums / scored).cpu()
    order = scores.flatten().argsort(descending=True)[:top_k].tolist()
    hidden = scores.shape[1]
    return RegisterNeurons([(i // hidden, i % hidden) for i in order], scores, images, scored, outliers / scored)


def detect_images(preprocess: Callable, dataset: str, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` test-split images of ``dataset`` (a registered name), drawn with ``seed``,
    through ``preprocess``: the corpus register neurons are detected on."""
    import inspect

    from cdfsl_core.data import dataset_spec, load_dataset  # the data registry (synthetic world, real layouts)

    splits = "split" in inspect.signature(dataset_spec(dataset).loader).parameters  # real layouts have none
    data = load_dataset(dataset, split="test") if splits else load_dataset(dataset)
    if count < 1:
        raise ConfigError(f"detect_images={count}: register neurons are detected on at least one image.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)[:count].tolist()
    return torch.stack([preprocess(data.load_image(i)) for i in order])


# one detection per model and settings: every method built on a model reuses it
_DETECTED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, RegisterNeurons]] = weakref.WeakKeyDictionary()


class TestTimeRegister(Intervention):
    """Append a register token and move the register neurons' activations into it (no training)."""

    __test__ = False  # not a pytest test class, whatever its name
    name = "test-time-register"
    supports_episode_batch = True  # the same neurons for every episode: E episodes are E parts of one batch

    def __init__(self, n_blocks: int, config: TestTimeRegisterConfig = TestTimeRegisterConfig()) -> None:
        super().__init__()
        if config.register_init not in REGISTER_INITS:
            raise ConfigError(f"register_init={config.register_init!r}; expected one of {REGISTER_INITS}.")
        self.config = config
        self.n_blocks = n_blocks
        check_blocks("test-time-register neurons' blocks", tuple(b for b, _ in config.neurons), n_blocks)
        self.neurons: list[tuple[int, int]] = list(config.neurons)
        self.detection: RegisterNeurons | None = None

    def blocks(self, n_blocks: int) -> list[int]:
        return sorted({b for b, _ in self.neurons})

    def bind(self, bundle: Any) -> None:
        """Detect the register neurons on the model of ``bundle`` when the settings name none."""
        if self.config.neurons:
            return
        c = self.config
        key = (c.top_k, c.highest_block, c.outlier_block, c.outlier_tau, c.detect_dataset, c.detect_images, c.detect_seed)
        found = _DETECTED.setdefault(bundle.model, {})
        if key not in found:
            images = detect_images(bundle.preprocess, c.detect_dataset, c.detect_images, c.detect_seed)
            device = bundle.model.logit_scale.device
            found[key] = find_register_neurons(bundle.model, list(images.to(device).split(32)), top_k=c.top_k,
                                               highest_block=c.highest_block, outlier_block=c.outlier_block,
                                               tau=c.outlier_tau)
        self.detection = found[key]
        self.neurons = list(self.detection.neurons)

    def episode_log(self) -> dict[str, Any]:
        return {"register_neurons": [f"{b}:{n}" for b, n in self.neurons]}

    @contextmanager
    def active(self, visual: nn.Module, text: torch.Tensor | None, episodes: int | None = None,
               params: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        if not self.neurons:  # nothing to move: the forward is left exactly as it is
            yield
            return
        tower = vision_tower(visual)
        blocks = tower.blocks
        by_block: dict[int, list[int]] = {}
        for b, n in self.neurons:
            by_block.setdefault(b, []).append(n)
        init = self.config.register_init

        def append(module, args, kwargs):
            x = tower.block_input(args, kwargs)
            if init == "zeros":
                register = x.new_zeros(*x.shape[:-2], 1, x.shape[-1])
            else:
                register = x[..., tower.n_prefix:, :].mean(dim=-2, keepdim=True)  # not yet appended
            return tower.with_block_input(args, kwargs, torch.cat([x, register], dim=-2))

        def move(indices: list[int]):
            def hook(module, args, out):
                out = out.clone()
                register = out.shape[-2] - 1
                out[..., register, indices] = out[..., indices].amax(dim=-2)  # the largest over all tokens
                out[..., tower.n_prefix:register, indices] = 0.0  # the patch tokens
                return out
            return hook

        def strip(x: torch.Tensor) -> torch.Tensor:
            return x[..., :x.shape[-2] - 1, :]

        handles = []
        tower.appended += 1
        try:
            handles.append(blocks[0].register_forward_pre_hook(append, with_kwargs=True, prepend=True))
            for b, indices in sorted(by_block.items()):
                handles.append(tower.mlp_activation(blocks[b]).register_forward_hook(move(indices)))
            handles.append(tower.sequence_end_hook(strip))
            yield
        finally:
            for handle in handles:
                handle.remove()
            tower.appended -= 1


class TIRWithRegister(TestTimeRegister):
    """TIR's re-weighting with a test-time register in the stream (the register is not re-weighted)."""

    name = "tir+test-time-register"

    def __init__(self, n_blocks: int, config: TIRRegisterConfig = TIRRegisterConfig()) -> None:
        super().__init__(n_blocks, config)
        self.tir = TIR(TIRConfig(blocks=config.tir_blocks, rho=config.rho, lam=config.lam))
        self.tir.blocks(n_blocks)

    @contextmanager
    def active(self, visual: nn.Module, text: torch.Tensor | None, episodes: int | None = None,
               params: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(TestTimeRegister.active(self, visual, text, episodes, params))
            stack.enter_context(self.tir.active(visual, text, episodes, params))
            yield


register_intervention("test-time-register", lambda n_blocks, config: TestTimeRegister(n_blocks, config),
                      TestTimeRegisterConfig,
                      "register neurons' activations moved into an appended token, no training (Jiang et al. 2025)")
register_intervention("tir+test-time-register", lambda n_blocks, config: TIRWithRegister(n_blocks, config),
                      TIRRegisterConfig, "TIR with a test-time register in the stream")
