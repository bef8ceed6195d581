"""The intervention interface, its registry, and the hooks that put an intervention into a forward.

An intervention is an ``nn.Module`` (it owns its trainable parameters, if any) that edits the
residual stream entering chosen vision blocks. ``with intervention.active(visual, text):``
registers the pre-hooks for one forward and removes them on exit, also when the forward raises.
``text`` is the class text features the tokens are compared with ([n_classes, embed_dim]; by
default the text tower's read-out after its second-to-last block, see :mod:`cdfsl_core.text`).

Interventions are registered by name, as open_clip and timm list models:
``register_intervention(name, build, config_type)`` makes ``name`` usable by
``create_method(..., intervention=name, intervention_config=config_type(...))``, the runner, the
commands' configs, the diagnostics and the study, with no other file to touch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from cdfsl_core.config import NoConfig, register_intervention_config, unregister_intervention_config
from cdfsl_core.errors import ConfigError
from cdfsl_core.plugins import load_plugins
from cdfsl_core.towers import vision_tower

__all__ = ["Intervention", "InterventionSpec", "NoIntervention", "build_intervention", "intervention_spec",
           "list_interventions", "register_intervention", "unregister_intervention"]


class Intervention(nn.Module):
    """Base class: edits the patch tokens entering some vision blocks.

    A subclass sets ``name``, implements :meth:`blocks` and :meth:`edit` (and :meth:`prepare` for
    per-forward state), owns its trainable parameters as ``nn.Parameter`` attributes (the runner
    trains them with the protocol's intervention optimiser), and may report: :meth:`episode_log`
    (what each episode line records, e.g. learned strengths), :meth:`measuring` (per-block
    statistics of its own action on the queries, before and after training) and
    ``reported_statistics`` (which of those the figures draw).
    """

    name = "none"
    reported_statistics: tuple[str, ...] = ()  # per-block statistics of measuring() that figures draw
    # True when edit() also takes E episodes at once (x [E, batch, tokens, width], text [E, 1, C, dim],
    # its parameters from state["params"] with a leading E axis): cdfsl_core.episode_batch trains such
    # an intervention for E episodes in one forward; others run one episode at a time.
    supports_episode_batch = False

    def blocks(self, n_blocks: int) -> list[int]:
        return []

    def edit(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, visual: nn.Module, text: torch.Tensor) -> dict:
        """Per-forward state computed once (e.g. class vectors), handed to every ``edit``."""
        return {"visual": visual, "text": text, "tower": vision_tower(visual)}

    def bind(self, bundle: Any) -> None:
        """Called once when a method is built on ``bundle`` (a ClipBundle), before any forward: an
        intervention that needs the model's own statistics (the register neurons of a test-time
        register) computes them here. Nothing by default."""

    def reset_parameters(self) -> None:
        """Back to the initial state (between episodes)."""

    def episode_log(self) -> dict[str, Any]:
        """What an episode line records about the intervention after training (JSON values)."""
        return {}

    @contextmanager
    def measuring(self) -> Iterator[dict[int, dict[str, float]]]:
        """Within the block, forwards add what the intervention measures about its own action,
        per block (e.g. ATHA's edit size); the yielded dict is filled as forwards run. Nothing by
        default."""
        yield {}

    @contextmanager
    def measuring_episodes(self, episodes: int, params: dict[str, torch.Tensor]) -> Iterator[list[dict]]:
        """:meth:`measuring` for E episodes edited together (``active(visual, text, E, params)``):
        one dict per episode, filled as forwards run. An intervention that overrides
        :meth:`measuring` overrides this too, or its episodes are evaluated one at a time
        (:meth:`measures_episodes`). Nothing by default."""
        yield [{} for _ in range(episodes)]

    @classmethod
    def measures_episodes(cls) -> bool:
        """Whether :meth:`measuring_episodes` measures what :meth:`measuring` measures (True when
        neither is overridden, or both are)."""
        own = cls.measuring is Intervention.measuring
        return own or cls.measuring_episodes is not Intervention.measuring_episodes

    @contextmanager
    def active(self, visual: nn.Module, text: torch.Tensor | None, episodes: int | None = None,
               params: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        """The intervention in ``visual``'s forwards inside the block. ``episodes=E``: the batch is
        E equal parts, part e compared with ``text[e]`` ([E, 1, C, dim]) and edited with the
        parameters ``params`` ({name: [E, ...]}, stacked along the episode axis); by default one
        episode with this module's own parameters. Edits read their parameters from
        ``state["params"]``."""
        tower = vision_tower(visual)
        resblocks = tower.blocks
        indices = self.blocks(len(resblocks))
        if not indices:
            yield
            return
        if text is None:
            raise ConfigError(f"{self.name} needs class text features.")
        if episodes is not None and not self.supports_episode_batch:
            raise ConfigError(f"intervention {self.name!r} does not edit several episodes at once "
                              "(supports_episode_batch is False); run it with an episode batch of 1.")
        state = self.prepare(visual, text)
        state.setdefault("tower", tower)  # the token layout (prefix tokens) and the read-out
        state["params"] = dict(self.named_parameters()) if params is None else params
        handles = []

        def make_hook(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict):
                x = tower.block_input(args, kwargs)
                if episodes is None:
                    x = self.edit(index, x, state)
                else:  # [E * batch, T, D] -> [E, batch, T, D] and back
                    x = self.edit(index, x.reshape(episodes, -1, *x.shape[1:]), state).reshape(x.shape)
                return tower.with_block_input(args, kwargs, x)

            return hook

        try:
            for i in indices:
                handles.append(resblocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


class NoIntervention(Intervention):
    name = "none"
    supports_episode_batch = True


@dataclass(frozen=True)
class InterventionSpec:
    """A registered intervention."""

    name: str
    build: Callable[[int, Any], Intervention]  # (vision blocks, config) -> a fresh intervention
    config_type: type  # a frozen dataclass of settings; its defaults are the paper's
    description: str = ""  # one line for list_interventions()


_REGISTRY: dict[str, InterventionSpec] = {}


def register_intervention(name: str, build: Callable[[int, Any], Intervention], config_type: type = NoConfig,
                          description: str = "") -> None:
    """Make ``name`` an intervention of every method, command config and study. ``build(n_blocks,
    config)`` returns a fresh instance; ``config_type()`` must give the defaults."""
    _REGISTRY[name] = InterventionSpec(name, build, config_type, description)
    register_intervention_config(name, config_type)


def unregister_intervention(name: str) -> None:
    """Remove a registered intervention (a plug-in's test cleaning up); built-ins stay."""
    if name in ("none", "atha", "tir", "test-time-register", "tir+test-time-register"):
        raise ConfigError(f"{name!r} is built in and cannot be unregistered.")
    _REGISTRY.pop(name, None)
    unregister_intervention_config(name)


def list_interventions() -> dict[str, str]:
    """Registered interventions by name, with one line each (installed plug-ins included)."""
    load_plugins("cdfsl.interventions")
    return {name: spec.description for name, spec in _REGISTRY.items()}


def intervention_spec(name: str) -> InterventionSpec:
    if name not in _REGISTRY:
        load_plugins("cdfsl.interventions")
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown intervention {name!r}; expected one of {', '.join(_REGISTRY)} "
                          "(register_intervention adds one).")
    return _REGISTRY[name]


def build_intervention(name: str, n_blocks: int, config: Any = None) -> Intervention:
    """A fresh intervention for a vision tower of ``n_blocks`` blocks; ``config`` None: the defaults."""
    spec = intervention_spec(name)
    if config is None:
        config = spec.config_type()
    elif not isinstance(config, spec.config_type):
        raise ConfigError(f"intervention {name!r} takes a {spec.config_type.__name__}, got {type(config).__name__}.")
    intervention = spec.build(n_blocks, config)
    intervention.blocks(n_blocks)  # fail now on out-of-range blocks
    return intervention


def check_blocks(name: str, blocks: tuple[int, ...], n_blocks: int) -> list[int]:
    bad = [b for b in blocks if not 0 <= b < n_blocks]
    if bad:
        raise ConfigError(f"{name} blocks {bad} out of range for a vision tower of {n_blocks} blocks (0..{n_blocks - 1}).")
    return sorted(set(blocks))




register_intervention("none", lambda n_blocks, config: NoIntervention(), NoConfig, "no intervention")
