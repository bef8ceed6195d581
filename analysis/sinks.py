"""Sink-token definitions, as a registry: each is one entry, with its threshold's unit and default,
the positive-control plant that must find it, and the command-line flag of its threshold.

``list_sinks()`` lists them; ``register_sink(SinkSpec(...))`` adds one (a plug-in or a test file
can), and it then appears in :class:`~analysis.diagnostics.TokenDiagnostics`' tables, the
``sink_counts`` figure, the study and ``run_diagnostics`` (which gets a ``--<name>-tau`` flag).
A definition's ``mask`` sees one recorded layer (:class:`SinkInputs`) and returns which patch
tokens are sinks, ``[B, L]`` bool. This module imports no torch (commands read it for ``--help``).

Built in:

======================  =============================================================  ===================
definition              a patch token is a sink when                                   planted control
======================  =============================================================  ===================
``sum-all``             it is in every class's top set (Sum score m = N, TIR)           every-class-top
``high-norm``           its norm > tau x the image's median patch norm (registers)      high-norm
``attention-mass``      it receives > tau x the uniform share 1/T of attention, from    attention-sink
                        CLS or averaged over queries (``source``), mean over heads
``massive-activation``  some channel > tau x the median |activation| of the image's     massive-activation
                        patch tokens (median estimated on every 8th channel)
======================  =============================================================  ===================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from analysis.keys import act_name
from cdfsl_core.errors import ConfigError
from cdfsl_core.plugins import load_plugins

__all__ = ["SinkDefinition", "SinkInputs", "SinkSpec", "list_sinks", "register_sink", "sink_spec",
           "unregister_sink"]


@dataclass
class SinkInputs:
    """What a definition may look at, for one recorded layer (every tensor in fp32)."""

    x: Any  # [B, prefix + L, D] the residual stream after the block (prefix tokens first: CLS, registers)
    counts: Any  # [B, L] Sum scores m of the patch tokens (0..n_classes; all 0 on a vision-only model)
    norms: Any  # [B, L] residual-stream norms of the patch tokens
    n_classes: int
    cache: Any  # the recorder's ActivationCache of the forward (for attention and other keys)
    layer: int
    n_prefix: int = 1  # tokens before the patches (the tower adapter's n_prefix)
    has_cls: bool = True  # whether the first prefix token is a CLS token


@dataclass(frozen=True)
class SinkDefinition:
    """A registered definition with its threshold (and, for ``attention-mass``, where attention
    comes from)."""

    name: str  # a registered definition (list_sinks())
    tau: float  # threshold, in the unit of the definition (SinkSpec.unit)
    source: str = "cls"  # attention-mass only: 'cls' (attention from CLS) or 'mean' (over all queries)

    def label(self) -> str:
        return sink_spec(self.name).describe(self)


@dataclass(frozen=True)
class SinkSpec:
    """One sink definition of the registry."""

    name: str
    mask: Callable[[SinkInputs, SinkDefinition], Any]  # -> [B, L] bool: which patch tokens are sinks
    unit: str  # what tau multiplies, for labels ('' when the definition has no threshold)
    default_tau: float
    plant: str | None = None  # the analysis.controls plant it must find (its positive control)
    tau_field: str | None = None  # the AnalysisConfig field of its threshold (None: AnalysisConfig.sink_taus)
    flag: str | None = None  # its threshold's command-line flag (None: --<name>-tau; '' for no threshold)
    description: str = ""
    needs_text: bool = False  # needs the class text (the Sum score): skipped on a vision-only model

    @property
    def option(self) -> str | None:
        """The command-line flag of the threshold, or None when the definition has none."""
        if self.flag == "":
            return None
        return self.flag or f"--{self.name}-tau"

    def describe(self, definition: SinkDefinition) -> str:
        if self.name == "sum-all":
            return "sum-all (m = N)"
        if self.name == "attention-mass":
            return f"attention-mass (> {definition.tau:g} x uniform, from {definition.source})"
        if not self.unit:
            return self.name
        return f"{self.name} (> {definition.tau:g} x {self.unit})"


_REGISTRY: dict[str, SinkSpec] = {}
BUILT_IN = ("sum-all", "high-norm", "attention-mass", "massive-activation")


def register_sink(spec: SinkSpec) -> None:
    """Make ``spec`` a sink definition of every diagnostic, table, figure and command."""
    _REGISTRY[spec.name] = spec


def unregister_sink(name: str) -> None:
    """Remove a registered definition (a plug-in's test cleaning up); built-ins stay."""
    if name in BUILT_IN:
        raise ConfigError(f"{name!r} is built in and cannot be unregistered.")
    _REGISTRY.pop(name, None)


def list_sinks() -> dict[str, SinkSpec]:
    """The registered definitions by name, in registration order (installed plug-ins included)."""
    load_plugins("cdfsl.sinks")
    return dict(_REGISTRY)


def sink_spec(name: str) -> SinkSpec:
    if name not in _REGISTRY:
        load_plugins("cdfsl.sinks")
    if name not in _REGISTRY:
        raise ConfigError(f"unknown sink definition {name!r}; expected one of {list(_REGISTRY)} "
                          "(register_sink adds one).")
    return _REGISTRY[name]


# ----------------------------------------------------------------- the built-in definitions
def row_median(values: Any) -> Any:
    """The lower median of each row of ``values`` [rows, n], as ``torch.median`` gives it.

    On the CPU, numpy's partition is about 10x faster than ``torch.median``, which sorts; the
    median is on the hot path of every recorded batch."""
    if values.device.type != "cpu":
        return values.median(dim=-1).values
    import numpy as np
    import torch

    k = (values.shape[-1] - 1) // 2
    return torch.from_numpy(np.partition(values.detach().numpy(), k, axis=-1)[:, k])


def _sum_all(inputs: SinkInputs, definition: SinkDefinition) -> Any:
    return inputs.counts == inputs.n_classes


def _high_norm(inputs: SinkInputs, definition: SinkDefinition) -> Any:
    return inputs.norms > definition.tau * row_median(inputs.norms).unsqueeze(-1)


def _massive_activation(inputs: SinkInputs, definition: SinkDefinition) -> Any:
    # the median |activation| estimated on every 8th channel of every patch token: an estimate is
    # enough for a threshold of tau x median; a token is a sink when its largest |activation| passes
    x, p = inputs.x, inputs.n_prefix
    median = row_median(x[:, p:, ::8].abs().flatten(1))  # [B]
    largest = x.amax(dim=-1).maximum(x.amin(dim=-1).neg())[:, p:]  # max |activation|, no |x| copy
    return largest > definition.tau * median.unsqueeze(-1)


def _attention_mass(inputs: SinkInputs, definition: SinkDefinition) -> Any:
    key = act_name("attn.pattern", inputs.layer)
    if key not in inputs.cache:
        raise ConfigError("the attention-mass definition needs 'attn.pattern' in the recording.")
    if definition.source not in ("cls", "mean"):
        raise ConfigError(f"attention-mass source={definition.source!r}; expected 'cls' or 'mean'.")
    if definition.source == "cls" and not inputs.has_cls:
        raise ConfigError("attention-mass source='cls', but this tower has no CLS token; use source='mean'.")
    p = inputs.n_prefix
    pattern = inputs.cache[key].float().mean(dim=1)  # [B, T, T], mean over heads
    received = pattern[:, 0, p:] if definition.source == "cls" else pattern[:, :, p:].mean(dim=1)
    return received > definition.tau / pattern.shape[-1]


register_sink(SinkSpec("sum-all", _sum_all, "", 0.0, plant="every-class-top", flag="",
                       description="in every class's top set (m = N, TIR's simple tokens)", needs_text=True))
register_sink(SinkSpec("high-norm", _high_norm, "median patch norm", 2.0, plant="high-norm", tau_field="high_norm_tau",
                       flag="--high-norm-tau", description="norm above tau x the image's median patch norm"))
register_sink(SinkSpec("attention-mass", _attention_mass, "uniform", 5.0, plant="attention-sink",
                       tau_field="attention_tau", flag="--attention-tau",
                       description="receives more than tau x the uniform share of attention"))
register_sink(SinkSpec("massive-activation", _massive_activation, "median |activation|", 100.0,
                       plant="massive-activation", tau_field="massive_tau", flag="--massive-tau",
                       description="a channel above tau x the median |activation|"))
