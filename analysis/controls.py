"""Positive controls: known artefacts planted into a model's residual stream.

A detector that reports 0 has only been tested if it also reports 1 when there is 1. Each
:class:`Plant` puts one known artefact into every image at one vision block, through a hook that
:func:`planted` registers and always removes; the sink definition that should find it must then
count exactly one more token per image at that block (for attention sinks: exactly the planted
ones, which take CLS's attention from any natural sink):

==================  ==========================================================  ===================
plant               what is planted at ``layer`` into patch token ``token``     found by
==================  ==========================================================  ===================
high-norm           the block's output token rescaled to ``strength`` (10) x    ``high-norm``
                    the image's median patch-token norm (direction kept)
massive-activation  one channel of the block's output token set to ``strength``  ``massive-activation``
                    (1000) x the image's median absolute activation
attention-sink      the token's input to the block's attention (``ln_1``'s      ``attention-mass``
                    output) chosen so its key is a multiple of the CLS query:   (from CLS)
                    its attention logit from CLS exceeds every other by
                    ``strength`` (30) in every head, so the planted tokens
                    share CLS's attention and natural sinks lose theirs
every-class-top     the block's output token replaced by a vector whose         ``sum-all``
                    projection ``ln_post(x) P`` has a cosine with every class
                    above that class's top-k cut among the image's other
                    tokens (gradient ascent per image), at the image's median
                    patch-token norm; impossible placements are an error
register-neuron     MLP neuron ``channel`` of the block fires on the token, so   ``high-norm`` (from
                    that what it writes has ``strength`` (10) x the image's      that block on); the
                    median patch-token norm entering the block                  register-neuron
                                                                                detector
==================  ==========================================================  ===================

Use them beside real models: a zero from a definition on a real model means something only if
the same definition finds the planted token.

    with planted(model, [Plant("high-norm", layer=3)]), record(model) as cache:
        model.encode_image(images)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from analysis.recorder import vision_tower
from analysis.sinks import list_sinks
from cdfsl_core import protocol
from cdfsl_core.errors import ConfigError
from cdfsl_core.plugins import load_plugins
from cdfsl_core.token_text import project_tokens
from cdfsl_core.towers import vision_tower as tower_of

# PLANTS, MECHANISM_PLANTS, DEFAULT_STRENGTH and FINDS are read from the registries when asked for
__all__ = ["Plant", "PlantContext", "PlantSpec", "list_plants", "plant_spec", "planted",
           "register_neuron_control", "register_plant", "unregister_plant"]


def _finds() -> dict[str, str]:
    """plant -> the first registered sink definition that names it as its positive control."""
    found: dict[str, str] = {}
    for name, spec in list_sinks().items():
        if spec.plant is not None:
            found.setdefault(spec.plant, name)
    if "high-norm" in found:  # a register neuron's artefact is a high-norm token
        found.setdefault("register-neuron", found["high-norm"])
    return found


def __getattr__(name: str):
    # from the registries as they are now (a plug-in's plant or sink included)
    if name == "FINDS":
        return _finds()
    if name == "PLANTS":  # the plants of one sink definition each (the study's sink controls)
        return tuple(n for n, spec in list_plants().items() if not spec.mechanism)
    if name == "MECHANISM_PLANTS":  # plants of a mechanism rather than of one sink definition
        return tuple(n for n, spec in list_plants().items() if spec.mechanism)
    if name == "DEFAULT_STRENGTH":
        return {n: spec.default_strength for n, spec in list_plants().items()}
    raise AttributeError(name)


@dataclass
class PlantContext:
    """What a plant's hooks need of the model they go into: its vision tower module and adapter,
    the adapter's blocks, the number of prefix tokens (patch index j is stream token prefix + j)
    and the class text features (None when not given)."""

    visual: nn.Module
    tower: Any
    blocks: Sequence[nn.Module]
    prefix: int
    text: torch.Tensor | None


@dataclass(frozen=True)
class PlantSpec:
    """A kind of planted artefact. ``install(context, plants)`` registers the hooks that plant
    ``plants`` (all of this kind; one block's plants together when ``grouped``) with
    ``prepend=True`` and returns their handles; ``check(plant, context)`` refuses a plant this
    model cannot take before any hook goes in."""

    name: str
    install: Callable[[PlantContext, list["Plant"]], list[Any]]
    default_strength: float
    grouped: bool = False  # the plants of one block depend on each other: one hook places them all
    mechanism: bool = False  # a mechanism's plant (register-neuron), not one sink definition's control
    check: Callable[["Plant", PlantContext], None] | None = None
    description: str = ""


_PLANTS: dict[str, PlantSpec] = {}
_BUILT_IN = ("high-norm", "massive-activation", "attention-sink", "every-class-top", "register-neuron")


def register_plant(spec: PlantSpec) -> None:
    """Make ``spec.name`` a plant of :func:`planted` (and, unless ``mechanism``, of the study's
    sink controls), as ``register_sink`` makes a sink definition; an installed package registers
    its plants under the entry-point group ``cdfsl.plants``."""
    _PLANTS[spec.name] = spec


def unregister_plant(name: str) -> None:
    """Remove a registered plant (a plug-in's test cleaning up); built-ins stay."""
    if name in _BUILT_IN:
        raise ConfigError(f"plant {name!r} is built in and cannot be unregistered.")
    _PLANTS.pop(name, None)


def list_plants() -> dict[str, PlantSpec]:
    """Registered plants by name (installed plug-ins included), in registration order."""
    load_plugins("cdfsl.plants")
    return dict(_PLANTS)


def plant_spec(name: str) -> PlantSpec:
    if name not in _PLANTS:
        load_plugins("cdfsl.plants")
    if name not in _PLANTS:
        raise ConfigError(f"unknown plant {name!r}; expected one of {tuple(_PLANTS)} (register_plant adds one).")
    return _PLANTS[name]


@dataclass(frozen=True)
class Plant:
    """One artefact in every image: ``kind`` (a registered plant, :func:`list_plants`) at vision block ``layer``,
    patch token ``token`` (0-based, CLS excluded), ``channel`` for a massive activation and the MLP
    neuron of a register-neuron plant."""

    kind: str
    layer: int
    token: int = 0
    strength: float | None = None  # None: DEFAULT_STRENGTH[kind]
    channel: int = 0  # massive-activation: the channel; register-neuron: the MLP neuron
    rho: float = protocol.TIR_RHO  # every-class-top only: the top-set fraction of the Sum score it must enter

    @property
    def finds(self) -> str:
        return _finds()[self.kind]

    def value(self) -> float:
        return plant_spec(self.kind).default_strength if self.strength is None else self.strength


def _median_norm(x: torch.Tensor, prefix: int = 1, tower: Any = None) -> torch.Tensor:
    if tower is not None:  # without tokens appended after the patches (a test-time register)
        x = tower.image_tokens(x)
    return x[:, prefix:].norm(dim=-1).median(dim=-1).values  # [B]


@torch.no_grad()
def _attention_sink_inputs(tower: Any, block: nn.Module, z: torch.Tensor, kwargs: dict, tokens: Sequence[int],
                           margin: float, prefix: int = 1) -> torch.Tensor:
    """Pre-norm outputs [B, len(tokens), width] for the planted ``tokens`` (patch indices): each
    one's key is the same multiple s of the CLS query, s large enough for their logit from CLS to
    exceed every other token's by ``margin`` in every head; so they share CLS's attention equally
    and the rest get less than exp(-margin) of it. Keys come from the tower adapter (its q/k
    projections, adapters and rotary embeddings included: ``key_affine`` per planted position)."""
    z = z.float()
    queries, keys, scale = tower.query_key(block, z, kwargs)  # [B, H, T, dh]
    query = queries[:, :, 0]  # [B, H, dh] the CLS query
    others = torch.einsum("bhd,bhtd->bht", query, keys) * scale
    others[..., [prefix + t for t in tokens]] = -torch.inf
    best_other = others.amax(dim=-1)  # [B, H]
    own = query.pow(2).sum(dim=-1) * scale  # logit per unit s: ||q_h||^2 x scale
    s = ((best_other + margin) / own.clamp_min(1e-12)).amax(dim=-1).clamp_min(1.0)  # [B]
    wanted = []
    for t in tokens:
        weight, offset = tower.key_affine(block, z, prefix + t, kwargs)  # k = z_t @ weight + offset
        wanted.append((s.unsqueeze(-1) * query.flatten(1) - offset) @ torch.linalg.pinv(weight))  # [B, width]
    return torch.stack(wanted, dim=1)


def _every_class_tokens(visual: nn.Module, out: torch.Tensor, tokens: Sequence[int], text: torch.Tensor, rho: float,
                        steps: int = 500) -> torch.Tensor:
    """Residual-stream vectors [B, width], one per image, whose projection ln_post(x) P has a cosine
    with every class text feature above that image's top-k cut (k = floor(rho L)) among the other
    patch tokens, so ``len(tokens)`` copies enter every class's top set; at the image's median
    patch-token norm. Found by gradient ascent on the smallest margin (a smooth minimum, Adam,
    deterministic); an impossible plant is an error, never a silent miss."""
    targets = F.normalize(text.detach().float(), dim=-1)  # [C, embed_dim]
    tower = tower_of(visual)
    patches = tower.patches(out).detach().float()
    length = patches.shape[1]
    rank = int(rho * length) - len(tokens) + 1  # the planted tokens must beat this natural rank
    if rank < 1:
        raise ConfigError(f"cannot plant {len(tokens)} every-class-top tokens when the top set holds floor({rho} x {length}) "
                         f"= {int(rho * length)}; plant fewer.")
    keep = [j for j in range(length) if j not in tokens]
    with torch.no_grad():
        natural = F.normalize(project_tokens(visual, patches[:, keep]), dim=-1) @ targets.T  # [B, L', C]
        cut = natural.topk(rank, dim=1).values[:, -1]  # [B, C]
    affine = tower.readout_affine()
    direction = targets.mean(dim=0) - (0 if affine.bias is None else affine.bias.detach().float())
    start = (torch.linalg.pinv(affine.projection.detach().float().T) @ direction if affine.projection is not None
             else direction)
    x = start.expand(len(out), -1).clone().requires_grad_()
    optimiser = torch.optim.Adam([x], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            margin = F.normalize(project_tokens(visual, x.unsqueeze(1)), dim=-1)[:, 0] @ targets.T - cut  # [B, C]
            if bool((margin > 0.02).all()):
                break
            loss = (torch.logsumexp(-50.0 * margin, dim=-1) / 50.0).sum()  # minus a smooth minimum
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        margin = F.normalize(project_tokens(visual, x.unsqueeze(1)), dim=-1)[:, 0] @ targets.T - cut
        if not bool((margin > 0).all()):
            raise ConfigError(
                f"could not plant a token in every class's top set: in some image no direction has a cosine above "
                f"the top-{rank} cut of every class (smallest margin {float(margin.min()):.3f}). The class text "
                "features are too far apart for this control at this block; try another block or fewer planted tokens.")
        return x.detach() * (patches.norm(dim=-1).median(dim=-1).values / x.detach().norm(dim=-1)).unsqueeze(-1)


@contextmanager
def planted(model: nn.Module, plants: Sequence[Plant], text: torch.Tensor | None = None) -> Iterator[None]:
    """Plant ``plants`` during forwards inside the block; ``text`` [C, embed_dim] (class text
    features) is needed by ``every-class-top``. Hooks run before any other hook on the same module
    (a recorder entered inside sees the planted stream) and are removed on exit, also when the
    forward raises. Every plant is checked before any hook goes in."""
    visual = vision_tower(model)
    tower = tower_of(visual)
    context = PlantContext(visual, tower, tower.blocks, tower.n_prefix, text)
    for plant in plants:
        spec = plant_spec(plant.kind)
        if not 0 <= plant.layer < len(context.blocks):
            raise ConfigError(f"plant layer {plant.layer} out of range: blocks 0..{len(context.blocks) - 1}.")
        if spec.check is not None:
            spec.check(plant, context)
    # the plants of one block that depend on each other (attention sinks share CLS's attention,
    # every-class-top tokens share the top sets) go in through one hook per block, registered
    # first: with prepend, the single plants' hooks then run before theirs
    groups: dict[tuple[str, int], list[Plant]] = {}
    for plant in plants:
        if plant_spec(plant.kind).grouped:
            groups.setdefault((plant.kind, plant.layer), []).append(plant)
    handles: list[Any] = []
    try:
        for (kind, _), group in groups.items():
            handles += plant_spec(kind).install(context, group)
        for plant in plants:
            if not plant_spec(plant.kind).grouped:
                handles += plant_spec(plant.kind).install(context, [plant])
        yield
    finally:
        for handle in handles:
            handle.remove()


def _install_output(context: PlantContext, plants: list[Plant]) -> list[Any]:
    """high-norm and massive-activation: the block's output token rescaled, or one of its channels set."""
    tower, prefix, (plant,) = context.tower, context.prefix, plants

    def hook(module, args, out):
        out = out.clone()
        j = prefix + plant.token
        with torch.no_grad():
            if plant.kind == "high-norm":
                scale = plant.value() * _median_norm(out, prefix, tower) / out[:, j].norm(dim=-1).clamp_min(1e-12)
                out[:, j] = out[:, j] * scale.unsqueeze(-1)
            else:  # massive-activation
                median = tower.patches(out).abs().flatten(1).median(dim=-1).values
                out[:, j, plant.channel] = plant.value() * median
        return out

    return [context.blocks[plant.layer].register_forward_hook(hook, prepend=True)]


def _install_attention_sinks(context: PlantContext, group: list[Plant]) -> list[Any]:
    """attention-sink: one block's planted tokens placed together in the input of its attention."""
    tower, prefix, layer = context.tower, context.prefix, group[0].layer
    block = context.blocks[layer]
    tokens = [prefix + plant.token for plant in group]
    block_kwargs: dict[str, Any] = {}  # the block's keyword arguments (rotary embeddings)

    def keep_kwargs(module, args, kwargs):
        block_kwargs.clear()
        block_kwargs.update({k: v for k, v in kwargs.items() if k != tower.input_keyword})

    def hook(module, args, out):
        out = out.clone()
        out[:, tokens] = _attention_sink_inputs(tower, block, out, dict(block_kwargs), [p.token for p in group],
                                                max(p.value() for p in group), prefix).to(out.dtype)
        return out

    return [block.register_forward_pre_hook(keep_kwargs, with_kwargs=True, prepend=True),
            tower.pre_norm(block).register_forward_hook(hook, prepend=True)]


def _check_attention_sink(plant: Plant, context: PlantContext) -> None:
    if not context.tower.has_cls:
        raise ConfigError("the attention-sink plant aims the planted keys at the CLS query; this tower has no CLS "
                          "token. Plant another kind.")


def _install_every_class_top(context: PlantContext, group: list[Plant]) -> list[Any]:
    """every-class-top: one block's planted tokens found together, in every class's top set."""
    prefix = context.prefix

    def hook(module, args, out):
        out = out.clone()
        planted_tokens = _every_class_tokens(context.visual, out, [p.token for p in group], context.text, group[0].rho)
        out[:, [prefix + p.token for p in group]] = planted_tokens.unsqueeze(1).to(out.dtype)
        return out

    return [context.blocks[group[0].layer].register_forward_hook(hook, prepend=True)]


def _check_every_class_top(plant: Plant, context: PlantContext) -> None:
    if context.text is None:
        raise ConfigError("the every-class-top plant needs the class text features: planted(model, plants, text=...).")


def _install_register_neuron(context: PlantContext, plants: list[Plant]) -> list[Any]:
    """register-neuron: MLP neuron ``channel`` of block ``layer`` fires on patch ``token`` so that
    what it writes (its activation times its output weights) has ``strength`` x the norm of the
    image's median patch token entering the block; before any other hook, so a test-time register
    then moves it."""
    tower, prefix, (plant,) = context.tower, context.prefix, plants
    block = context.blocks[plant.layer]
    weight = tower.mlp_output(block).weight  # [width, hidden]
    median: dict[str, torch.Tensor] = {}

    def entering(module, args, kwargs):
        median["norm"] = _median_norm(tower.block_input(args, kwargs).detach(), prefix, tower)

    def fire(module, args, out):
        out = out.clone()
        written = weight[:, plant.channel].detach().float().norm().clamp_min(1e-12)
        out[:, prefix + plant.token, plant.channel] = (plant.value() * median["norm"] / written).to(out.dtype)
        return out

    return [block.register_forward_pre_hook(entering, with_kwargs=True, prepend=True),
            tower.mlp_activation(block).register_forward_hook(fire, prepend=True)]


def _check_register_neuron(plant: Plant, context: PlantContext) -> None:
    hidden = context.tower.mlp_output(context.blocks[plant.layer]).weight.shape[1]
    if not 0 <= plant.channel < hidden:
        raise ConfigError(f"register-neuron plant: neuron {plant.channel} out of range; block {plant.layer}'s MLP has "
                          f"{hidden} (0..{hidden - 1}).")


register_plant(PlantSpec("high-norm", _install_output, 10.0,
                         description="the output token rescaled to strength x the median patch norm"))
register_plant(PlantSpec("massive-activation", _install_output, 1000.0,
                         description="one output channel set to strength x the median absolute activation"))
register_plant(PlantSpec("attention-sink", _install_attention_sinks, 30.0, grouped=True, check=_check_attention_sink,
                         description="keys a multiple of the CLS query: they take CLS's attention"))
register_plant(PlantSpec("every-class-top", _install_every_class_top, 0.0, grouped=True, check=_check_every_class_top,
                         description="a token in every class's top set of the Sum score"))
register_plant(PlantSpec("register-neuron", _install_register_neuron, 10.0, mechanism=True,
                         check=_check_register_neuron, description="an MLP neuron that writes a high-norm token"))


def register_neuron_control(bundle: Any, images: torch.Tensor, layer: int | None = None, neuron: int = 7,
                            token: int = 5) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """The test-time register's positive control on any model: a ``register-neuron`` plant (MLP
    ``neuron`` of block ``layer``, default a third of the depth, fires on patch ``token``), found
    by :func:`~cdfsl_core.interventions.find_register_neurons`, then removed by a test-time
    register at the detector's first neuron. Returns a table (per model: the detector's first
    neuron, high-norm patches per image at the last block, the planted patch's and the register's
    norm over the median patch norm) and, per model, the neuron's activation and the norm / median
    ratio over the patch grid ``[images, rows, cols]`` for the figure
    :func:`analysis.figures.register_control`."""
    import pandas as pd

    from analysis.recorder import record
    from cdfsl_core.config import TestTimeRegisterConfig
    from cdfsl_core.interventions import find_register_neurons
    from cdfsl_core.methods import create_method

    tower = tower_of(bundle.model)
    layer = max(1, tower.n_blocks // 3) if layer is None else layer
    last, (rows, cols) = tower.n_blocks - 1, tower.grid
    plant = Plant("register-neuron", layer, token=token, channel=neuron)
    names = ["first class", "second class"]  # the tokens do not depend on the class names
    plain = create_method(bundle, names, "zeroshot", "none").eval()
    with planted(plain, [plant]):
        found = find_register_neurons(plain.model, images)
    register = create_method(bundle, names, "zeroshot", "test-time-register",
                             intervention_config=TestTimeRegisterConfig(neurons=tuple(found.neurons[:1]))).eval()
    table, maps = [], {}
    for label, method in (("planted", plain), ("planted + test-time register", register)):
        seen: dict[str, torch.Tensor] = {}
        hook = tower.mlp_output(tower.blocks[layer]).register_forward_pre_hook(lambda m, args: seen.update(a=args[0]))
        try:
            with planted(method, [plant]), record(method, layers=[last]) as cache, torch.no_grad():
                method.encode_image(images, None)
        finally:
            hook.remove()
        stream = cache[f"blocks.{last}.resid_post"]
        norms = tower.patches(stream).float().norm(dim=-1).cpu()
        median = norms.median(dim=-1, keepdim=True).values
        appended = cache.appended.get(f"blocks.{last}.resid_post")
        table.append({"model": label, "planted": f"{layer}:{neuron}",
                      "detected_first": ":".join(map(str, found.neurons[0])) if found.neurons else "none",
                      "high_norm_per_image": float(((norms / median) > 2.0).sum(dim=-1).float().mean()),
                      "planted_patch_over_median": float((norms[:, token] / median[:, 0]).mean()),
                      "register_over_median": float((appended[:, 0].float().norm(dim=-1).cpu() / median[:, 0]).mean())
                      if appended is not None else float("nan")})
        activation = seen["a"][:, tower.n_prefix:tower.n_prefix + rows * cols, neuron].detach().float().cpu()
        maps[label] = {"activation": activation.reshape(-1, rows, cols),
                       "norm_ratio": (norms / median).reshape(-1, rows, cols)}
    return pd.DataFrame(table), maps
