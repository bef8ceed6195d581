"""A study's context: its settings, its folder (``study.json``, the one caching rule for every
table), and what every step shares (the model, the datasets, the run configurations).

The steps (``runs``, ``inside``, ``domains``, ``gallery``) take a :class:`StudyContext` and import
only downward; :class:`analysis.study.facade.Study` puts them together on top.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from analysis.config import AnalysisConfig
from analysis.study.settings import StudyData, StudyGrid
from cdfsl_core.atomic import write_table, write_text
from cdfsl_core.cli import pretrained_value
from cdfsl_core.config import ModelConfig, RunConfig, episode_config, episode_file_name, run_config
from cdfsl_core.data import load_dataset
from cdfsl_core.errors import ConfigError
from cdfsl_core.models import EMBEDDED_MODEL, ClipBundle, load_clip
from cdfsl_core.paths import check_writable_folder, read_json_file
from cdfsl_core.preprocess import protocol_transform
from cdfsl_core.run_folder import RunFolder

__all__ = ["StudyContext"]


@dataclass
class StudyContext:
    """What to run and measure, where its results live, and what the steps share; :meth:`create`
    takes flat keywords."""

    out: Path  # the study folder
    model: ModelConfig = field(default_factory=lambda: ModelConfig(*EMBEDDED_MODEL, device="cpu"))
    data: StudyData = field(default_factory=StudyData)
    grid: StudyGrid = field(default_factory=StudyGrid)
    analysis: AnalysisConfig = field(default_factory=lambda: AnalysisConfig(attribution_steps=8))
    progress: bool = True  # progress bars
    episode_batch: int | str = "auto"  # episodes trained together in one forward (results do not depend on it)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.grid.diagnose_shots not in self.grid.shots:
            raise ConfigError(f"diagnose_shots={self.grid.diagnose_shots} is not among shots={self.grid.shots}.")
        if self.grid.baseline not in [label for label, _, _ in self.grid.methods]:
            raise ConfigError(f"baseline={self.grid.baseline!r} is not among the methods' labels.")
        self._checked = False
        self._bundle: ClipBundle | None = None

    @classmethod
    def create(cls, out: str | os.PathLike[str], **settings: Any) -> "StudyContext":
        """A study from flat keywords: ``model``, ``pretrained``, ``device``, ``precision``, ``data_root``
        (or ``root``), ``source``, ``targets``, ``domain_images``, ``shots``, ``episodes``, ``steps``,
        ``seed``, ``methods``, ``baseline``, ``diagnose_shots``, any :class:`AnalysisConfig` field, ``progress``,
        ``episode_batch``."""
        if "data_root" in settings:
            settings["root"] = settings.pop("data_root")
        if "model" in settings:
            settings["name"] = settings.pop("model")
        if "pretrained" in settings:  # 'none' or None: random weights, as on the command line
            settings["pretrained"] = pretrained_value(settings["pretrained"])
        parts: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "grid": {}, "analysis": {}}
        kinds = {"model": ModelConfig, "data": StudyData, "grid": StudyGrid, "analysis": AnalysisConfig}
        progress = settings.pop("progress", True)
        episode_batch = settings.pop("episode_batch", "auto")
        for key, value in settings.items():
            part = next((p for p, kind in kinds.items() if key in {f.name for f in fields(kind)}), None)
            if part is None:
                raise ConfigError(f"Study setting {key!r} is unknown; expected one of "
                                  f"{sorted(f.name for kind in kinds.values() for f in fields(kind))}.")
            parts[part][key] = tuple(value) if isinstance(value, list) else value
        model = ModelConfig(**{"name": EMBEDDED_MODEL[0], "pretrained": EMBEDDED_MODEL[1], "device": "cpu",
                               **parts["model"]})
        analysis = AnalysisConfig(**{"attribution_steps": 8, **parts["analysis"]})
        return cls(out, model, StudyData(**parts["data"]), StudyGrid(**parts["grid"]), analysis, progress,
                   episode_batch)

    # ------------------------------------------------------------------ the folder
    def settings(self) -> dict[str, Any]:
        """What determines the study's results (``study.json`` in the folder)."""
        return json.loads(json.dumps({"model": asdict(self.model), "data": asdict(self.data), "grid": asdict(self.grid),
                                      "analysis": asdict(self.analysis)}))

    def check_folder(self) -> None:
        """A study folder holds one study: its tables are reused only for the same settings."""
        if self._checked:
            return
        path = self.out / "study.json"
        if path.exists():
            saved = read_json_file(path, "a study's settings (an object)",
                                   "Restore it, or run the study into a new folder (nothing in it is reused then).")
            now = self.settings()
            differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if differ and self.has_results():
                raise ConfigError(f"{self.out} holds a study with other settings (differs in {differ}: "
                                  f"{ {k: saved.get(k) for k in differ} }). Use another folder, or the same settings "
                                  "to reuse its results.")
            if differ:  # nothing finished there yet (a failed start): the corrected settings take the folder
                write_text(path, json.dumps(now, indent=2) + "\n")
        else:
            check_writable_folder(self.out, "the study folder")
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(self.settings(), indent=2) + "\n")
        self._checked = True

    def has_results(self) -> bool:
        """Whether anything finished in the folder: a table, or an episode line of a run."""
        if any(self.out.rglob("*.csv")):
            return True
        return any(RunFolder(path.parent).lines()[0] for path in (self.out / "runs").rglob("config.json"))

    def cached(self, name: str, make: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """The table ``out/name`` (CSV), made once and reused: the one caching rule of every table
        of a study (a table is written whole, atomically, after everything it needs finished)."""
        self.check_folder()
        path = self.out / name
        if path.exists():
            return pd.read_csv(path)
        table = make()
        write_table(table, path)
        return table

    def cached_tables(self, folder: str, names: tuple[str, ...], make: Callable[[], dict[str, pd.DataFrame]]
                      ) -> dict[str, pd.DataFrame]:
        """The tables ``out/folder/<name>.csv`` made together, by the same rule as :meth:`cached`."""
        self.check_folder()
        paths = {name: self.out / folder / f"{name}.csv" for name in names}
        if all(path.exists() for path in paths.values()):
            return {name: pd.read_csv(path) for name, path in paths.items()}
        tables = make()
        for name, table in tables.items():
            write_table(table, self.out / folder / f"{name}.csv")
        return tables

    # ------------------------------------------------------------------ what the steps share
    @property
    def bundle(self) -> ClipBundle:
        """The study's model, loaded once; every method built on it owns its adapters."""
        if self._bundle is None:
            self._bundle = load_clip(self.model.name, self.model.pretrained, device=self.model.device,
                                     tokenizer=self.model.tokenizer)
        return self._bundle

    @cached_property
    def transform(self):
        return protocol_transform(self.bundle)

    def dataset_options(self, name: str) -> dict[str, Any]:
        """Loader options: the embedded source's held-out split, the embedded targets' size."""
        if name == self.data.source == "synthetic":
            return {"split": "test", "images_per_class": 8}  # 512 held-out source images
        return {"images_per_class": 60, "seed": self.grid.seed} if name.startswith("synthetic-") else {}

    def load(self, name: str) -> Any:
        return load_dataset(name, self.data.root, **self.dataset_options(name))

    def run_folder(self, target: str, shots: int, label: str) -> Path:
        """One folder per cell; the episode count is in the name, so another count never meets it."""
        return self.out / "runs" / target / f"{shots}shot_{self.grid.episodes}ep" / label

    def run_config(self, target: str, shots: int, adaptation: str, intervention: str) -> RunConfig:
        """The papers' protocol for one cell (:func:`cdfsl_core.protocol.run_config`), on the study's
        shared episode file of the target and shot setting."""
        episodes = episode_config(shots, self.grid.episodes, self.grid.seed)
        measured = shots == self.grid.diagnose_shots and adaptation != "zeroshot"
        return run_config(
            target, shots, adaptation, intervention, episodes=self.grid.episodes, steps=self.grid.steps,
            seed=self.grid.seed, model=self.model.name, pretrained=self.model.pretrained, device=self.model.device,
            precision=self.model.precision, tokenizer=self.model.tokenizer, data_root=self.data.root,
            data_options=self.dataset_options(target),
            episode_file=str(self.out / "episodes" / episode_file_name(target, episodes)),
            trajectory_steps=self.grid.trajectory_steps() if measured else ())

    @property
    def fine_tuned(self) -> list[str]:
        return [label for label, adaptation, _ in self.grid.methods if adaptation != "zeroshot"]
