"""Probes: what a run measures on an episode's queries while the episode trains (its trajectory).

With ``TrainConfig.trajectory_steps`` set, the episode loop measures, at each chosen step, the
query accuracy and the intervention's own statistics, and hands the model to every registered
probe; each returns a small JSON dict that the episode line keeps under ``trajectory``. A probe
is registered by name::

    register_probe("my-probe", factory)   # factory(method, query, query_labels, config) -> measure(step) -> dict

or by an installed package's entry point in the group ``cdfsl.probes`` (as interventions and sink
definitions are; :mod:`cdfsl_core.plugins`). The project's own token diagnostics (sink counts per
definition, Sum-bucket norms, head/tail cut points) are such a probe, declared by this package's
``pyproject.toml`` (:mod:`analysis.trajectory`): the runner never imports the analysis layer.
"""

from __future__ import annotations

from typing import Any, Callable

from cdfsl_core.plugins import load_plugins

__all__ = ["Probe", "list_probes", "register_probe", "unregister_probe"]

Probe = Callable[..., Callable[[int], dict[str, Any]]]  # (method, query, labels, config) -> (step -> JSON dict)
_REGISTRY: dict[str, Probe] = {}


def register_probe(name: str, factory: Probe) -> None:
    """Make ``factory`` measure every trajectory under ``name``."""
    _REGISTRY[name] = factory


def unregister_probe(name: str) -> None:
    _REGISTRY.pop(name, None)


def list_probes() -> dict[str, Probe]:
    """The registered probes by name (installed plug-ins, and this package's own, included)."""
    load_plugins("cdfsl.probes")
    return dict(_REGISTRY)
