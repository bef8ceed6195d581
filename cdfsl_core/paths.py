"""Output paths checked before any work: a command that would compute for minutes and then fail to
write its result fails first, with one line naming the path and the fix.

Writability is tested by creating (and removing) a temporary file in the nearest folder that
exists, so a read-only file system is found also when running as root, for whom permission bits
do not count. Nothing is created for a folder that does not exist yet.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from cdfsl_core.errors import CDFSLError, ConfigError

__all__ = ["check_settings", "check_writable_file", "check_writable_folder", "read_json_file"]


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()  # pragma: no cover - the root always exists


def _writable(folder: Path) -> bool:
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_writable_folder(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` is (or can be created as) a folder this process can write into; ``flag`` names
    the option in the message (``--out``)."""
    path = Path(path).expanduser()
    existing = _nearest_existing(path)
    if existing == path and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; expected a folder. Pass a folder path (it is created if missing).")
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, so no folder can be created below it. Pass another path.")
    if not _writable(existing):
        where = "" if existing == path else f" ({existing}, where it would be created,)"
        raise ConfigError(f"{flag} {path}{where} is not writable. Pass a folder you can write to.")
    return path


def check_writable_file(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` can be written as a file (its folder exists or can be created, and is writable;
    the path is not a folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; expected a file path. Pass a file name inside it.")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path} exists and is not writable. Pass another path, or make it writable.")
    check_writable_folder(path.parent, flag)
    return path


def read_json_file(path: Path, what: str, fix: str, error: type[CDFSLError] = ConfigError,
                   kind: type = dict) -> object:
    """The JSON value in ``path``, of type ``kind``; a file that does not parse, or holds another kind
    of value, is ``error`` naming the file, ``what`` it should be and the ``fix``."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err}); expected {what}. {fix}") from None
    if not isinstance(value, kind):
        raise error(f"{path} holds a JSON {type(value).__name__}, not {what}. {fix}")
    return value


def check_settings(path: Path, settings: dict, what: str) -> None:
    """Tables of other settings are never replaced silently: when ``path`` (the ``settings.json``
    written beside a command's tables, last, once they are complete) holds other settings than
    ``settings``, refuse, naming each difference. ``what`` names the tables ("diagnostics tables")."""
    path = Path(path)
    if not path.is_file():
        return
    saved = read_json_file(path, f"the settings of the {what} beside it (an object)",
                           "Remove it with the tables beside it, or pass --out for another folder.")
    differ = [f"{key}: {saved.get(key)!r} (the tables there) vs {settings.get(key)!r} (now)"
              for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
    if differ:
        raise ConfigError(f"{path.parent} holds {what} of other settings ({'; '.join(differ)}); they would be "
                          "replaced. Pass --out for another folder, or the same settings to recompute them.")
