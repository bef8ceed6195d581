"""What every command of the project shares: argument types checked at the edge, help with
defaults, and plain messages for known errors.

- :func:`command` wraps a ``main(argv)``: a known error (:class:`~cdfsl_core.errors.CDFSLError`:
  bad data, bad episode file, bad argument or config, missing or broken weights, a device that
  cannot be had, a run folder that would mix) prints one line, ``error: ...``, and exits 1,
  without a traceback; ``--debug`` (or ``CDFSL_DEBUG=1``) shows the traceback. Ctrl-C prints one
  line saying what finished and how to resume, and exits 130.
- :func:`positive_int`, :func:`non_negative_int`, :func:`positive_float`, :func:`logit_scale` are
  argparse types: a bad value fails in argparse with the flag's name and what was expected.

This module imports nothing heavy, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from typing import Callable, Sequence

from cdfsl_core.errors import CDFSLError

__all__ = ["HelpFormatter", "command", "fraction", "logit_scale", "non_negative_int", "parser", "positive_float", "positive_int"]

DEBUG_ENV = "CDFSL_DEBUG"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help line ends with its default; descriptions keep their line breaks."""


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the project's help format and a ``--debug`` flag."""
    result = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    result.add_argument("--debug", action="store_true", help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    return result


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1 or more), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


def logit_scale(text: str) -> float | str:
    """A positive number, ``learned`` or ``auto``."""
    if text in ("learned", "auto"):
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive number, 'learned' or 'auto', got {text!r}") from None


def _debug(argv: Sequence[str] | None) -> bool:
    arguments = sys.argv[1:] if argv is None else argv
    return "--debug" in arguments or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's ``main(argv)``: known errors as one line and exit 1, Ctrl-C as one line
    and exit 130; with ``--debug`` or ``CDFSL_DEBUG=1`` the traceback is printed too."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except CDFSLError as err:
            if _debug(argv):
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as err:
            if _debug(argv):
                traceback.print_exc()
            message = str(err) or "nothing was lost that had finished; rerun the same command to resume."
            print(f"\ninterrupted: {message}", file=sys.stderr)
            return 130

    return wrapped
