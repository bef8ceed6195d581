"""What every command of the project shares: argument types checked at the edge, help with
defaults, and plain messages for known errors.

- :func:`command` wraps a ``main(argv)``: a known error (:class:`~cdfsl_core.errors.CDFSLError`:
  bad data, bad episode file, bad argument or config, missing or broken weights, a device that
  cannot be had, a run folder that would mix) prints one line, ``error: ...``, and exits 1,
  without a traceback; ``--debug`` (or ``CDFSL_DEBUG=1``) shows the traceback. Ctrl-C prints one
  line saying what finished and how to resume, and exits 130; a closed pipe (``| head``) stops
  quietly with 141, as Unix tools do.
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
from typing import Any, Callable, Sequence

from cdfsl_core.errors import CDFSLError

__all__ = ["HelpFormatter", "add_episode_arguments", "command", "episode_batch_arg", "fraction", "logit_scale", "non_negative_int", "parser", "positive_float", "positive_int"]

DEBUG_ENV = "CDFSL_DEBUG"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help line ends with its default; descriptions keep their line breaks."""


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the project's help format and a ``--debug`` flag."""
    result = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    result.add_argument("--debug", action="store_true", help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    return result


def _number(text: str, convert: Callable[[str], float], valid: Callable[[float], bool], expected: str) -> Any:
    """``text`` converted and checked, or an argparse error saying what was expected."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer (1 or more)")


def episode_batch_arg(text: str) -> int | str:
    """Episodes trained together: ``auto`` or an integer >= 1."""
    return "auto" if text == "auto" else _number(text, int, lambda v: v >= 1, "'auto' or a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, lambda v: 0 < v < float("inf"), "a finite positive number")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def share(text: str) -> float:
    """A number in [0, 1] (a probability, a share)."""
    return _number(text, float, lambda v: 0 <= v <= 1, "a share between 0 and 1 (both included)")


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    return _number(text, float, lambda v: 0 < v < 1, "a fraction between 0 and 1")


RANDOM_WEIGHTS = "none"  # the one spelling of "random weights" for --pretrained, grids, studies and notebooks


def pretrained_value(value: str | None) -> str | None:
    """``--pretrained`` as ``load_clip`` takes it: ``"none"`` (any case) or ``None`` means random
    weights (``None``); anything else (a tag or a weights file) is kept."""
    if value is None or str(value).strip().lower() == RANDOM_WEIGHTS:
        return None
    return str(value)


def pretrained_arg(text: str) -> str:
    """An argparse type for ``--pretrained``: a tag, a weights file, or ``none`` (random weights);
    kept as written (``pretrained_value`` turns ``none`` into ``None``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a tag, a weights file or 'none' (random weights), got ''")
    return text


def logit_scale(text: str) -> float | str:
    """A positive number, ``learned`` or ``auto``."""
    if text in ("learned", "auto"):
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive number, 'learned' or 'auto', got {text!r}") from None


def add_episode_arguments(group: Any) -> None:
    """The flags that draw episodes (``--ways --shots --queries --episodes --seed
    --short-class-policy``), with the protocol's defaults, for every command that draws them."""
    from cdfsl_core import protocol
    from cdfsl_core.names import SHORT_CLASS_POLICIES

    def ways(text: str) -> int:
        return _number(text, int, lambda v: v >= 2, "at least 2 classes per episode")

    group.add_argument("--ways", type=ways, default=protocol.WAYS, help="classes per episode")
    group.add_argument("--shots", type=positive_int, default=protocol.SHOTS[0], help="support images per class")
    group.add_argument("--queries", type=positive_int, default=protocol.QUERIES, help="query images per class")
    group.add_argument("--episodes", type=positive_int, default=None,
                       help="episodes (None: the papers' count for the shots, 800 for 1-shot, 400 for 5)")
    group.add_argument("--seed", type=non_negative_int, default=0, help="episode i is drawn from SeedSequence([seed, i])")
    group.add_argument("--short-class-policy", choices=SHORT_CLASS_POLICIES, default="error",
                       help="a class with fewer than shots + queries images: fail, skip it, or cycle its queries")


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
        except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            except (OSError, ValueError):
                pass
            return 141
        except KeyboardInterrupt as err:
            if _debug(argv):
                traceback.print_exc()
            message = str(err) or "nothing was lost that had finished; rerun the same command to resume."
            print(f"\ninterrupted: {message}", file=sys.stderr)
            return 130

    return wrapped
