"""How the diagnostics measure, in one config: :class:`AnalysisConfig`.

The ``run_diagnostics`` command (one flag per field), :func:`analysis.run_diagnostics.diagnose_run`
and the study accept it, and every diagnostics table carries its fields as columns, so a table
says how it was measured. The Sum-score and head/tail fractions default to TIR's and ATHA's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from analysis.sinks import SinkDefinition, list_sinks
from cdfsl_core import protocol
from cdfsl_core.errors import ConfigError

__all__ = ["AnalysisConfig", "SPACES", "TRANSFORMS"]

SPACES = ("residual", "projected")
TRANSFORMS = ("none", "log")
TEXT_NORMS = ("none", "unit")


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of the token diagnostics, the sink definitions and the attribution maps."""

    space: str = "residual"  # token norms in the 'residual' stream or the 'projected' space (ln_post(x) P)
    transform: str = "none"  # 'none' or 'log' of the norms
    rho: float = protocol.TIR_RHO  # the Sum score's top-k fraction (TIR's)
    rho_head: float = protocol.ATHA_RHO_HEAD  # head fraction of the head/tail histogram (ATHA's)
    rho_tail: float = protocol.ATHA_RHO_TAIL  # tail fraction (ATHA's)
    high_norm_tau: float = 2.0  # high-norm sink: norm above tau x the image's median patch norm
    attention_tau: float = 5.0  # attention-mass sink: more than tau x the uniform share of attention
    attention_source: str = "cls"  # ... received from 'cls', or the 'mean' over all queries
    massive_tau: float = 100.0  # massive-activation sink: a channel above tau x the median |activation|
    bins: int = 40  # head/tail histogram bins over [-1, 1]
    head_tail: bool = True  # also the head/tail histogram
    attribution_steps: int = 16  # integrated-gradients steps of the attribution maps
    token_map_images: int = 4  # query images whose token maps a run's diagnostics keep (0: none)
    text_norm: str | None = None  # ATHA's class vectors: 'none', 'unit', or None: as the method's intervention builds them
    sink_taus: tuple[tuple[str, float], ...] = ()  # thresholds of registered sink definitions without a field here

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ConfigError(f"space={self.space!r}; expected one of {SPACES}.")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"transform={self.transform!r}; expected one of {TRANSFORMS}.")
        if self.attention_source not in ("cls", "mean"):
            raise ConfigError(f"attention_source={self.attention_source!r}; expected 'cls' or 'mean'.")
        if self.text_norm is not None and self.text_norm not in TEXT_NORMS:
            raise ConfigError(f"text_norm={self.text_norm!r}; expected one of {TEXT_NORMS} or None.")
        for name in ("rho", "rho_head", "rho_tail"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a fraction in (0, 1).")
        for name in ("high_norm_tau", "attention_tau", "massive_tau"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a positive threshold.")
        if self.token_map_images < 0:
            raise ConfigError(f"token_map_images={self.token_map_images}: expected 0 or more images.")
        if self.bins < 1 or self.attribution_steps < 1:
            raise ConfigError(f"bins={self.bins}, attribution_steps={self.attribution_steps}: expected positive integers.")

    def sinks(self) -> list[SinkDefinition]:
        """Every registered sink definition (:mod:`analysis.sinks`) with these thresholds."""
        extra = dict(self.sink_taus)
        unknown = sorted(set(extra) - set(list_sinks()))
        if unknown:
            raise ConfigError(f"sink_taus names {unknown}, which are not registered sink definitions; expected some "
                              f"of {list(list_sinks())}.")
        return [SinkDefinition(name, getattr(self, spec.tau_field) if spec.tau_field else extra.get(name, spec.default_tau),
                               self.attention_source) for name, spec in list_sinks().items()]

    def columns(self) -> dict[str, Any]:
        """The settings as table columns (``analysis_`` + field name)."""
        columns = {f"analysis_{key}": value for key, value in asdict(self).items()}
        columns["analysis_sink_taus"] = "; ".join(f"{name}={tau:g}" for name, tau in self.sink_taus)  # a cell, not a list
        return columns

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
