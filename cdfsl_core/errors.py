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
