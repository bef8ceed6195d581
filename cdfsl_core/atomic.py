"""Atomic file writes: a reader sees the old file or the new one, never half of one, and any
number of processes may write the same path at the same moment.

Every write goes to a temporary file with a **unique** name in the destination's folder (so the
final rename is atomic on one file system) and is then renamed over the destination. A fixed
temporary name (``summary.json.tmp``) is not enough: two processes finishing a run folder
together would both write it, the first rename would succeed and the second would find nothing
to rename. With unique names the last rename wins, and both writers hold the same content when
the content is a function of what is on disk (a run's summary of its finished episodes).

Every file the project writes for a user goes through :func:`atomic_path` (a test checks that no
source file spells a fixed temporary name).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "write_json", "write_table", "write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A unique temporary path beside ``path`` to write to; renamed over ``path`` when the block
    ends without an exception, removed when it raises. The folder is created if missing.

    >>> with atomic_path("table.csv") as tmp:      # doctest: +SKIP
    ...     frame.to_csv(tmp, index=False)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str, only_if_changed: bool = False) -> bool:
    """Write ``text`` to ``path`` atomically; with ``only_if_changed`` a file that already holds
    ``text`` is left untouched (its modification time too). Returns whether it wrote."""
    path = Path(path)
    if only_if_changed and path.is_file() and path.read_text() == text:
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def write_json(path: str | os.PathLike[str], content: Any, only_if_changed: bool = False) -> bool:
    """``content`` as indented JSON (a final newline), atomically; see :func:`write_text`. NaN and
    infinities are refused: JSON has no spelling for them (use ``None``)."""
    return write_text(path, json.dumps(content, indent=2, allow_nan=False) + "\n", only_if_changed)


def write_table(table: Any, path: str | os.PathLike[str]) -> None:
    """A pandas DataFrame as CSV (no index), atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
