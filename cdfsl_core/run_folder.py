"""A run folder, and the only code that knows its files.

```
RUN/
  config.json         everything needed to rerun it (RunConfig)
  manifest.json       versions, git revision, device and precision, episode-file hash, weights
  episodes.jsonl      one line per finished episode, appended under a lock, flushed and synced
  summary.json        mean accuracy and 95% CI
  states/             each episode's trained parameters (with save_states)
  diagnostics/        run_diagnostics' tables and their settings.json
  .claims/            one OS lock per episode being computed (released when its process dies)
```
:class:`RunFolder` reads and writes them (atomically, :mod:`cdfsl_core.atomic`), reads
``episodes.jsonl`` in one place (tolerant of a half-written last line: a writer killed midway),
and holds the resume checks: a folder with finished episodes resumes only with the same config,
episode file, model, device type and precision. It imports no torch.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypedDict

from cdfsl_core.atomic import write_json
from cdfsl_core.errors import DeviceError, RunFolderError
from cdfsl_core.paths import read_json_file

__all__ = ["EPISODE_LINE_REQUIRED", "EpisodeLine", "RunFolder", "check_episode_line", "config_differences",
           "short_identity"]


class EpisodeLine(TypedDict, total=False):
    """One line of ``episodes.jsonl``: one finished episode, written by :meth:`RunFolder.append`
    only (which checks it against this declaration, :func:`check_episode_line`) and read by
    :meth:`RunFolder.lines`. The fields of :data:`EPISODE_LINE_REQUIRED` are in every line."""

    episode: int  # its index in the run's episode file
    classes: list[str]  # its class names, in label order
    status: str  # "ok", or "non-finite-loss" (stopped; not averaged)
    accuracy_init: float  # query accuracy before training (the method's initial state)
    accuracy: float | None  # query accuracy after training; None when stopped
    steps: int  # optimiser steps taken
    loss_first: float | None  # the loss at the first step (None: nothing trained)
    loss_last: float | None  # the loss at the last step
    message: str  # why a stopped episode stopped
    intervention_stats: dict[str, Any]  # {"init" | "trained": {block: {statistic: value}}}: what the intervention measures
    intervention_log: dict[str, Any]  # what the intervention records of itself (ATHA: alpha and beta per block)
    trajectory: list[dict[str, Any]]  # {"step", "accuracy", "intervention"?, probe name: its dict} per trajectory step
    precision: str  # "fp32" or "bf16"
    episode_file_sha256: str  # the episode file it was drawn from
    seconds: float  # wall time (an equal share of its batch's when trained with others)
    episode_batch: int  # how many episodes trained together with it (absent: alone)
    device: str  # "cpu" or "cuda"
    weights: str  # the model's weights identity


EPISODE_LINE_REQUIRED = ("episode", "classes", "status", "accuracy_init", "accuracy", "precision",
                         "episode_file_sha256", "device", "weights")
_STATUSES = ("ok", "non-finite-loss")


def check_episode_line(row: dict[str, Any]) -> None:
    """``row`` is an :class:`EpisodeLine`: its required fields present, no field it does not
    declare, a known status. A ValueError names what is wrong (a bug of the writer, not of the user)."""
    missing = [key for key in EPISODE_LINE_REQUIRED if key not in row]
    unknown = sorted(set(row) - set(EpisodeLine.__annotations__))
    if missing or unknown:
        raise ValueError(f"not an episode line: missing {missing}, undeclared {unknown} (declare a new field in "
                         "cdfsl_core.run_folder.EpisodeLine).")
    if row["status"] not in _STATUSES or type(row["episode"]) is not int:
        raise ValueError(f"not an episode line: status {row['status']!r} (expected one of {_STATUSES}), "
                         f"episode {row['episode']!r} (expected an integer).")


def short_identity(identity: str) -> str:
    """A weights identity for a message: ``sha256:`` and 16 hex digits, or the whole random tag."""
    return identity[:23] + "..." if identity.startswith("sha256:") else identity


def config_differences(saved: Any, new: Any, prefix: str = "") -> list[str]:
    """Every field that differs between two config dicts, with both values:
    ``data.root: '/a' (the run) vs '/b' (now)``."""
    if isinstance(saved, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(saved) | set(new)):
            found += config_differences(saved.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if saved == new else [f"{prefix.rstrip('.')}: {saved!r} (the run) vs {new!r} (now)"]


_DAMAGED_FIX = "run the command into a new --out folder."
_DAMAGED = "The run folder is damaged: restore the file, or " + _DAMAGED_FIX


class RunFolder:
    """One run folder's files (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------ the files
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def manifest_file(self) -> Path:
        return self.path / "manifest.json"

    @property
    def results(self) -> Path:
        return self.path / "episodes.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def diagnostics(self) -> Path:
        return self.path / "diagnostics"

    def state_path(self, index: int) -> Path:
        """Where the trained parameters of episode ``index`` are kept."""
        return self.path / "states" / f"episode_{index:04d}.safetensors"

    def is_prepared(self) -> bool:
        return self.config_file.is_file()

    def is_run(self) -> bool:
        """Whether it has what a finished or partial run has (a manifest and episode lines)."""
        return self.manifest_file.is_file() and self.results.is_file()

    # ------------------------------------------------------------------ reading
    def config_dict(self) -> dict[str, Any]:
        if not self.config_file.is_file():
            raise RunFolderError(f"{self.path} is not a run folder: config.json is missing. Pass the --out folder of "
                                 "python -m cdfsl_core.finetune.")
        return read_json_file(self.config_file, "a run's config (an object)", _DAMAGED, RunFolderError)

    def manifest(self) -> dict[str, Any]:
        """The manifest, or ``{}`` when none was written yet."""
        if not self.manifest_file.is_file():
            return {}
        return read_json_file(self.manifest_file, "a run's manifest (an object)", _DAMAGED, RunFolderError)

    def lines(self) -> tuple[list[EpisodeLine], bool]:
        """Every episode line in file order, and whether a torn line (a write killed midway) was
        skipped. The one reader of ``episodes.jsonl``."""
        if not self.results.is_file():
            return [], False
        rows, torn = [], False
        for number, line in enumerate(self.results.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if line.lstrip().startswith("{"):  # a line cut short by a writer killed midway
                    torn = True
                    continue
                raise RunFolderError(f"{self.results}, line {number}: not an episode line ({line[:40]!r}). "
                                     f"Remove that line, or {_DAMAGED_FIX}") from None
            if not isinstance(row, dict) or type(row.get("episode")) is not int or "status" not in row:
                raise RunFolderError(f"{self.results}, line {number}: a JSON line that is not an episode line "
                                     f"(an episode line has an integer 'episode' and a 'status'). Remove that line, "
                                     f"or {_DAMAGED_FIX}")
            rows.append(row)
        return rows, torn

    def finished(self) -> dict[int, EpisodeLine]:
        """Finished episodes by index (the last line of an episode wins)."""
        return {row["episode"]: row for row in self.lines()[0]}

    def recorded_episode_file(self, finished: dict[int, dict[str, Any]] | None = None) -> str | None:
        """The sha256 of the episode file the finished lines came from (None when nothing finished);
        lines (or a manifest) that disagree are an error."""
        finished = self.finished() if finished is None else finished
        if not finished:
            return None
        recorded = self.manifest().get("episode_file_sha256")
        shas = {row.get("episode_file_sha256", recorded) for row in finished.values()}
        if len(shas) > 1 or (recorded is not None and shas != {recorded}):
            raise RunFolderError(
                f"{self.path} mixes episodes of different episode files (sha256 "
                f"{', '.join(sorted(str(s)[:12] for s in shas | {recorded}))}). Its mean pairs with nothing; rerun it "
                "into a new --out folder.")
        return next(iter(shas))

    def recorded_weights(self, finished: dict[int, dict[str, Any]] | None = None) -> str | None:
        """The model the folder's episodes were computed with (its manifest and lines; None when
        neither records one); two models in one folder are an error."""
        finished = self.finished() if finished is None else finished
        saved = self.manifest().get("weights")
        recorded = {row["weights"] for row in finished.values() if row.get("weights")} | ({saved} if saved else set())
        if len(recorded) > 1:
            raise RunFolderError(f"{self.path} mixes episodes of different models "
                                 f"({', '.join(sorted(short_identity(r) for r in recorded))}); its mean belongs to no "
                                 "model. Rerun it into a new --out folder.")
        return next(iter(recorded), None)

    # ------------------------------------------------------------------ resume checks
    def check_config(self, config: dict[str, Any], finished: dict[int, dict[str, Any]]) -> None:
        """A folder with finished episodes resumes only with the same config; one with none
        accepts any (a corrected command after a failed start)."""
        if not finished or not self.config_file.is_file():
            return
        differences = config_differences(self.config_dict(), config)
        if differences:
            raise RunFolderError(
                f"{self.path} holds {len(finished)} finished episode(s) of a run with another config: "
                f"{'; '.join(differences)}. Use a new --out folder, or rerun with the run's settings to resume it.")

    def check_episode_file(self, sha256: str, path: Any, finished: dict[int, dict[str, Any]]) -> None:
        """A folder with finished episodes resumes only on the episode file they came from."""
        recorded = self.recorded_episode_file(finished)
        if recorded is not None and recorded != sha256:
            raise RunFolderError(
                f"{self.path} holds {len(finished)} finished episode(s) drawn from an episode file with sha256 "
                f"{recorded[:16]}..., but {path or 'the episode file'} now has sha256 {sha256[:16]}... (regenerated, "
                "or the data changed). Resuming would mix episodes of two files. Restore the original episode file "
                "and data, or start a new run with a new --out folder.")

    def check_weights(self, weights: str, finished: dict[int, dict[str, Any]]) -> None:
        """A folder with finished episodes resumes only with the model they were computed with
        (the weights' content, not their path)."""
        if not finished:
            return
        recorded = self.recorded_weights(finished)
        if recorded is not None and recorded != weights:
            raise RunFolderError(
                f"{self.path} holds {len(finished)} finished episode(s) computed with weights "
                f"{short_identity(recorded)}, but the model now is {short_identity(weights)} (the weights file was "
                "replaced, or another model was given). Resuming would average two models. Restore the original "
                "weights, or start a new run with a new --out folder.")

    def check_precision(self, device: str, precision: str, finished: dict[int, dict[str, Any]],
                        allow_mixed: bool) -> None:
        """A resumed run computes on the device type and in the precision its first episodes did,
        unless mixing is allowed (every episode line records its own device and precision)."""
        saved = self.manifest()
        if not finished or not saved or allow_mixed:
            return
        now = {"device": device, "precision": precision}
        differ = {key: (saved.get(key), now[key]) for key in now if saved.get(key) != now[key]}
        if differ:
            described = "; ".join(f"{key}: the run has {old!r}, this process {new!r}" for key, (old, new) in differ.items())
            raise DeviceError(
                f"{self.path} holds episodes computed with another device or precision ({described}). A mean over "
                "both would mix precisions. Resume on the same kind of device and precision (--device, "
                "--precision), use a new --out folder, or pass --allow-mixed-precision to resume anyway "
                "(each episode line records its device and precision).")

    # ------------------------------------------------------------------ writing
    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.config_file, config, only_if_changed=True)

    def write_manifest(self, manifest: dict[str, Any], finished: dict[int, dict[str, Any]],
                       allow_mixed: bool = False) -> None:
        """A new manifest while nothing finished; afterwards only the mark that precisions were mixed."""
        if not finished or not self.manifest_file.is_file():
            write_json(self.manifest_file, manifest, only_if_changed=True)
        elif allow_mixed:
            saved = self.manifest()
            if (saved.get("device"), saved.get("precision")) != (manifest["device"], manifest["precision"]):
                write_json(self.manifest_file, {**saved, "mixed_precision": True}, only_if_changed=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_file, summary, only_if_changed=True)

    @contextmanager
    def claim(self, index: int, wait: bool) -> Iterator[bool]:
        """Hold episode ``index`` for this process (an exclusive OS lock on a file in ``.claims/``,
        which the OS releases when the process dies); yields False when another process holds it
        and ``wait`` is False."""
        folder = self.path / ".claims"
        folder.mkdir(exist_ok=True)
        with open(folder / f"episode_{index:05d}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")  # who computes it (a test kills that process)
                handle.flush()
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, index: int, row: EpisodeLine) -> bool:
        """Append one episode line (checked against :class:`EpisodeLine`) unless the episode is
        already there; under a lock, synced. A torn last line (a writer killed midway) is ended
        first, so the new line stands on its own."""
        check_episode_line(dict(row))
        if row["episode"] != index:
            raise ValueError(f"episode line of episode {row['episode']} appended as episode {index}.")
        with open(self.results.with_name(self.results.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if index in self.finished():
                    return False
                with self.results.open("a+b") as handle:
                    handle.seek(0, os.SEEK_END)
                    if handle.tell():
                        handle.seek(-1, os.SEEK_END)
                        if handle.read(1) != b"\n":
                            handle.write(b"\n")
                    handle.write((json.dumps(row) + "\n").encode())
                    handle.flush()
                    os.fsync(handle.fileno())
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
