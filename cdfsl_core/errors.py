"""Exceptions for bad input. Every message names the file or value, what was expected, and the fix."""

from __future__ import annotations


class CDFSLError(Exception):
    """Base class of the project's input errors."""


class DatasetError(CDFSLError, ValueError):
    """A dataset root, CSV, image list or image is not what the loader expects."""


class ImageReadError(DatasetError, OSError):
    """An image file exists but cannot be decoded (unreadable or truncated)."""


class EpisodeError(CDFSLError, ValueError):
    """Episodes cannot be drawn with the requested settings, or an episode file is invalid."""


class CheckpointError(CDFSLError, FileNotFoundError):
    """Model weights are missing, not cached, or do not fit the architecture."""


class DeviceError(CDFSLError, ValueError):
    """The requested device or precision is not available on this machine, or differs from a run's."""


class ConfigError(CDFSLError, ValueError):
    """A setting (an argument, a config field, a method or analysis option) has a value that cannot work."""


class RunFolderError(CDFSLError, ValueError):
    """A run folder holds another run (another config, episode file, device or precision), or its
    files disagree among themselves; using it would mix results."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what finished and how to resume."""
