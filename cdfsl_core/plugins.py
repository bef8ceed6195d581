"""Plug-ins from installed packages, through Python entry points.

A package extends the project by declaring entry points in its ``pyproject.toml``::

    [project.entry-points."cdfsl.interventions"]
    my-intervention = "my_package.intervention"      # a module that calls register_intervention

    [project.entry-points."cdfsl.sinks"]
    my-sink = "my_package.sinks:register"            # or a function that registers

The registries load their group the first time they are asked (every command, a sweep's Ray
workers, a notebook), so an installed plug-in is there without an import in user code. A
plug-in that fails to load is an error naming it. This module imports nothing of the project's
above it.
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points

from cdfsl_core.errors import ConfigError

__all__ = ["GROUPS", "load_plugins"]

GROUPS = ("cdfsl.interventions", "cdfsl.sinks", "cdfsl.probes", "cdfsl.plants", "cdfsl.towers")
_LOADED: set[str] = set()


def load_plugins(group: str) -> list[str]:
    """Load every entry point of ``group`` once per process; the names loaded now."""
    if group in _LOADED:
        return []
    _LOADED.add(group)
    loaded = []
    for entry in entry_points(group=group):
        try:
            target = entry.load()
            if callable(target) and not inspect.isclass(target):
                target()  # a register() function; a module registers when it is imported
        except Exception as err:  # a broken plug-in must not pass unnoticed
            _LOADED.discard(group)
            raise ConfigError(f"plug-in {entry.name!r} ({entry.value}) of entry-point group {group!r} failed to load: "
                              f"{type(err).__name__}: {err}. Fix or uninstall the package that declares it.") from err
        loaded.append(entry.name)
    return loaded
