"""Fixed few-shot episodes: generated once from a seed, saved as a hashed JSON file.

Every method is evaluated on the same episode file, so differences between methods are paired.
Episode ``i`` is drawn from its own random stream, ``SeedSequence([seed, i])``: it never touches
global RNG state, and the first 100 episodes of a 600-episode file are those of a 100-episode file.

File format (``format: cdfsl-episodes/1``), keys sorted, with ``sha256`` the hash of the canonical
JSON of every other key::

    {"dataset": "eurosat", "dataset_fingerprint": "...", "n_images": 27000,
     "classes": ["Annual Crop Land", ...],
     "config": {"n_way": 5, "k_shot": 1, "n_query": 15, "n_episodes": 600, "seed": 0,
                "short_class_policy": "error"},
     "short_classes": [], "episodes": [{"classes": [3, 7, ...], "support": [[ids], ...],
     "query": [[ids], ...]}, ...], "sha256": "..."}

``classes`` of an episode are dataset labels; label ``j`` inside the episode is position ``j``.
Image ids are indices into the dataset, whose order the fingerprint pins.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdfsl_core.atomic import write_text
from cdfsl_core.config import EpisodeConfig, episode_config
from cdfsl_core.errors import EpisodeError

FORMAT = "cdfsl-episodes/1"


@dataclass(frozen=True)
class Episode:
    """One N-way episode: dataset labels and per-class image ids."""

    classes: list[int]  # dataset label of episode class j
    support: list[list[int]]  # [n_way][k_shot] image ids
    query: list[list[int]]  # [n_way][n_query] image ids

    @property
    def n_way(self) -> int:
        return len(self.classes)

    @property
    def support_ids(self) -> list[int]:
        return [i for ids in self.support for i in ids]

    @property
    def support_labels(self) -> list[int]:
        return [j for j, ids in enumerate(self.support) for _ in ids]

    @property
    def query_ids(self) -> list[int]:
        return [i for ids in self.query for i in ids]

    @property
    def query_labels(self) -> list[int]:
        return [j for j, ids in enumerate(self.query) for _ in ids]


@dataclass
class EpisodeFile:
    """A loaded (and verified) episode file."""

    dataset: str
    dataset_fingerprint: str
    n_images: int
    classes: list[str]  # readable names of all dataset classes
    config: EpisodeConfig
    episodes: list[Episode]
    short_classes: list[str] = field(default_factory=list)  # classes below k_shot + n_query images
    sha256: str = ""
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.episodes)

    def class_names(self, episode: Episode) -> list[str]:
        """Readable names of an episode's classes, in episode-label order."""
        return [self.classes[c] for c in episode.classes]

    def content(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "dataset_fingerprint": self.dataset_fingerprint,
            "n_images": self.n_images,
            "classes": list(self.classes),
            "config": asdict(self.config),
            "short_classes": list(self.short_classes),
            "episodes": [asdict(e) for e in self.episodes],
        }

    def check_dataset(self, dataset: Any) -> None:
        """Fail if ``dataset`` is not the one these episodes were drawn from."""
        if len(dataset) != self.n_images or dataset.fingerprint() != self.dataset_fingerprint:
            raise EpisodeError(
                f"Episode file {self.path or '(in memory)'} was drawn from {self.dataset!r} with "
                f"{self.n_images} images (fingerprint {self.dataset_fingerprint[:12]}), but the "
                f"dataset given has {len(dataset)} images (fingerprint {dataset.fingerprint()[:12]}). "
                "Image ids would point at other images. Use the same data, or regenerate the "
                "episodes with `python -m cdfsl_core.episodes`."
            )


def content_hash(content: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``content``."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _episode_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


def generate_episodes(dataset: Any, config: EpisodeConfig) -> EpisodeFile:
    """Draw ``config.n_episodes`` episodes from ``dataset`` (anything with ``targets``, ``classes``,
    ``name`` and ``fingerprint()``)."""
    config.validate()
    targets = np.asarray(dataset.targets)
    by_class = [np.flatnonzero(targets == c) for c in range(len(dataset.classes))]
    need = config.k_shot + config.n_query
    short = [c for c, ids in enumerate(by_class) if len(ids) < need]
    if short and config.short_class_policy == "error":
        listing = ", ".join(f"{dataset.classes[c]!r} ({len(by_class[c])})" for c in short[:5])
        raise EpisodeError(
            f"{dataset.name}: {len(short)} class(es) have fewer than shots + queries = {config.k_shot} + "
            f"{config.n_query} = {need} images: {listing}. Fix: fewer --shots or --queries, or --short-class-policy "
            "skip (leave them out) or cycle (repeat their query images); the policy is recorded in the episode file."
        )
    if config.short_class_policy == "cycle":
        too_small = [c for c in short if len(by_class[c]) <= config.k_shot]
        if too_small:
            raise EpisodeError(
                f"{dataset.name}: class(es) {[dataset.classes[c] for c in too_small]} have at most "
                f"shots = {config.k_shot} images, so no query image is left even with cycling. "
                "Use --short-class-policy skip or fewer --shots."
            )
    eligible = [c for c in range(len(by_class)) if len(by_class[c]) > 0]
    if config.short_class_policy == "skip":
        eligible = [c for c in eligible if c not in short]
    if config.n_way > len(eligible):
        raise EpisodeError(
            f"{dataset.name}: ways = {config.n_way} but only {len(eligible)} class(es) can be drawn "
            f"(of {len(dataset.classes)}; short-class policy {config.short_class_policy!r}). Use --ways <= {len(eligible)}."
        )
    episodes = []
    for index in range(config.n_episodes):
        rng = _episode_rng(config.seed, index)
        chosen = rng.choice(np.asarray(eligible), size=config.n_way, replace=False)
        support, query = [], []
        for c in chosen:
            perm = rng.permutation(by_class[c])
            support.append([int(i) for i in perm[: config.k_shot]])
            rest = perm[config.k_shot :]
            query.append([int(rest[j % len(rest)]) for j in range(config.n_query)])
        episodes.append(Episode([int(c) for c in chosen], support, query))
    result = EpisodeFile(
        dataset=dataset.name,
        dataset_fingerprint=dataset.fingerprint(),
        n_images=len(dataset),
        classes=list(dataset.classes),
        config=config,
        episodes=episodes,
        short_classes=[dataset.classes[c] for c in short],
    )
    result.sha256 = content_hash(result.content())
    return result


def save_episodes(episodes: EpisodeFile, path: str | os.PathLike[str]) -> Path:
    """Write the episode file atomically; the same episodes always give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = episodes.content()
    episodes.sha256 = content_hash(content)
    text = json.dumps({**content, "sha256": episodes.sha256}, sort_keys=True, separators=(",", ":"))
    write_text(path, text + "\n")
    episodes.path = path
    return path


def load_episodes(path: str | os.PathLike[str], dataset: Any | None = None) -> EpisodeFile:
    """Read and verify an episode file (its hash; the dataset's fingerprint if one is given)."""
    path = Path(path)
    if not path.is_file():
        raise EpisodeError(f"Episode file {path} does not exist. Create it with `python -m cdfsl_core.episodes`.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EpisodeError(f"Episode file {path} is not valid JSON ({err}). Regenerate it.") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise EpisodeError(
            f"Episode file {path}: format {raw.get('format') if isinstance(raw, dict) else None!r}, "
            f"expected {FORMAT!r}. Regenerate it with `python -m cdfsl_core.episodes`."
        )
    stored = raw.pop("sha256", None)
    actual = content_hash(raw)
    if stored != actual:
        raise EpisodeError(
            f"Episode file {path}: content hash {actual[:16]}... does not match the stored sha256 "
            f"{str(stored)[:16]}...; the file was edited or damaged. Regenerate it with the command "
            "that made it (same seed gives the same file) instead of editing it."
        )
    try:
        episodes = EpisodeFile(
            dataset=raw["dataset"],
            dataset_fingerprint=raw["dataset_fingerprint"],
            n_images=raw["n_images"],
            classes=raw["classes"],
            config=EpisodeConfig(**raw["config"]),
            episodes=[Episode(**e) for e in raw["episodes"]],
            short_classes=raw.get("short_classes", []),
            sha256=actual,
            path=path,
        )
    except (KeyError, TypeError) as err:
        raise EpisodeError(f"Episode file {path} lacks a field or has a wrong one ({err}). Regenerate it.") from None
    if dataset is not None:
        episodes.check_dataset(dataset)
    return episodes


def build_parser() -> argparse.ArgumentParser:
    from cdfsl_core.cli import add_episode_arguments, parser

    result = parser("python -m cdfsl_core.episodes", "Write a fixed episode file (hashed; the same arguments "
                    "always write the same bytes).")
    result.add_argument("--dataset", required=True, help="registered dataset (python -m cdfsl_core.data list)")
    result.add_argument("--data-root", default=None, help="folder holding the datasets (None: $CDFSL_DATA_ROOT)")
    add_episode_arguments(result)
    result.add_argument("--out", required=True, help="episode file to write (.json)")
    return result


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m cdfsl_core.episodes --dataset eurosat --data-root DIR --shots 1 --out FILE``."""
    from cdfsl_core.data import load_dataset
    from cdfsl_core.paths import check_writable_file

    args = build_parser().parse_args(argv)
    check_writable_file(args.out, "--out")  # before the data are read
    dataset = load_dataset(args.dataset, args.data_root)
    config = episode_config(args.shots, args.episodes, args.seed, args.ways, args.queries,
                                     args.short_class_policy)
    episodes = generate_episodes(dataset, config)
    path = save_episodes(episodes, args.out)
    print(f"wrote {len(episodes)} episodes of {args.dataset} to {path} (sha256 {episodes.sha256})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from cdfsl_core.cli import command

    return command(_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
