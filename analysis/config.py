"""How the diagnostics measure, in one config: :class:`AnalysisConfig`.

The ``run_diagnostics`` command (one flag per field), :func:`analysis.run_diagnostics.diagnose_run`
and the study accept it, and every diagnostics table carries its fields as columns, so a table
says how it was measured. The Sum-score and head/tail fractions default to TIR's and ATHA's own.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Any

from analysis.sinks import SinkDefinition, list_sinks
from cdfsl_core import protocol
from cdfsl_core.cli import fraction, non_negative_int, positive_float, positive_int
from cdfsl_core.errors import ConfigError

__all__ = ["AnalysisConfig", "SPACES", "TRANSFORMS", "add_analysis_arguments", "add_sink_arguments", "analysis_config"]

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


# ------------------------------------------------------------------- the commands' settings flags
def add_sink_arguments(group: Any, defaults: Any, text: bool = True) -> None:
    """One threshold flag per registered sink definition (:mod:`analysis.sinks`), generated from its
    entry: a plug-in's definition gets ``--<name>-tau`` (``text=False``: none for definitions that
    need class text)."""
    for name, spec in list_sinks().items():
        if spec.option is None or (spec.needs_text and not text):
            continue
        dest = spec.tau_field or f"sink_tau__{name}"
        default = getattr(defaults, spec.tau_field) if spec.tau_field else dict(defaults.sink_taus).get(name, spec.default_tau)
        group.add_argument(spec.option, dest=dest, type=positive_float, default=default,
                           help=f"{name} sink: {spec.description}")


def analysis_config(args: argparse.Namespace) -> Any:
    """The :class:`~analysis.config.AnalysisConfig` of parsed arguments (plug-in sink thresholds in
    ``sink_taus``)."""
    values = {name: getattr(args, name) for name in AnalysisConfig.field_names() if hasattr(args, name)}
    extra = tuple((key.removeprefix("sink_tau__"), value) for key, value in vars(args).items()
                  if key.startswith("sink_tau__"))
    return AnalysisConfig(**values, sink_taus=extra)




def add_analysis_arguments(parser: argparse.ArgumentParser, text: bool = True) -> None:
    """The settings group of the diagnostics commands, one flag per :class:`AnalysisConfig` field
    (``text=False``: without the flags of what needs class text, for a vision-only model)."""
    defaults = AnalysisConfig()
    settings = parser.add_argument_group("analysis settings (written into every table)")
    settings.add_argument("--space", choices=SPACES, default=defaults.space, help="token norms in this space")
    settings.add_argument("--transform", choices=TRANSFORMS, default=defaults.transform, help="of the token norms")
    if text:
        settings.add_argument("--rho", type=fraction, default=defaults.rho, help="the Sum score's top-k fraction")
        settings.add_argument("--rho-head", type=fraction, default=defaults.rho_head, help="head fraction (head/tail)")
        settings.add_argument("--rho-tail", type=fraction, default=defaults.rho_tail, help="tail fraction (head/tail)")
    add_sink_arguments(settings, defaults, text)
    settings.add_argument("--attention-source", choices=("cls", "mean"), default=defaults.attention_source,
                          help="attention received from CLS or averaged over all queries")
    if text:
        settings.add_argument("--bins", type=positive_int, default=defaults.bins, help="head/tail histogram bins")
        settings.add_argument("--no-head-tail", dest="head_tail", action="store_false",
                              help="skip the head/tail histogram")
        settings.add_argument("--attribution-steps", type=positive_int, default=defaults.attribution_steps,
                              help="integrated-gradients steps")
    settings.add_argument("--token-map-images", type=non_negative_int, default=defaults.token_map_images,
                          help="images whose token maps are kept (token_maps.csv; 0: none)")
    if text:
        settings.add_argument("--text-norm", choices=("none", "unit"), default=defaults.text_norm,
                              help="ATHA's class vectors from the read-out as it is or normalised (None: as the method's)")
