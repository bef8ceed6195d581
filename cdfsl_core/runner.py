"""One episodic runner for every method: plan a run folder, run its episodes, summarise.

Load the model once; for each episode of an episode file, train and evaluate it
(:func:`cdfsl_core.episode_loop.run_episode`) and append one line to the run folder
(:class:`cdfsl_core.run_folder.RunFolder`, which owns the folder's files and its resume checks).
A run that is interrupted resumes after its last finished episode, with the same results as an
uninterrupted one: episode ``i`` seeds torch from ``(seed, i)`` before anything random happens.
"""

from __future__ import annotations

import os
import platform
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cdfsl_core import protocol
from cdfsl_core.config import RunConfig
from cdfsl_core.data import load_dataset
from cdfsl_core.episode_batch import batchable, episode_footprint, episodes_that_fit
from cdfsl_core.episode_loop import (
    load_state,
    prepare_episode,
    run_episode_batch,
    train_episode,
)
from cdfsl_core.episodes import EpisodeFile, generate_episodes, load_episodes, save_episodes
from cdfsl_core.errors import ConfigError, EpisodeError, RunFolderError, RunInterrupted
from cdfsl_core.methods import FewShotCLIP
from cdfsl_core.models import (
    ClipBundle,
    checkpoint_file,
    load_clip,
    resolve_device,
    resolve_precision,
    weights_identity,
)
from cdfsl_core.names import adaptation
from cdfsl_core.paths import check_writable_folder
from cdfsl_core.preprocess import ImageCache, protocol_transform
from cdfsl_core.run_folder import RunFolder, short_identity
from cdfsl_core.stats import json_number, mean_ci95

__all__ = [
    "LoadedEpisode", "RunPlan", "load_episode", "load_plan", "load_run", "measure_footprint", "prepare_run",
    "resolve_episode_batch", "run", "run_episodes", "state_path", "summarize", "summary_of_lines", "support_images",
]


def state_path(folder: str | os.PathLike[str], index: int) -> Path:
    """Where a run folder keeps the trained parameters of episode ``index``."""
    return RunFolder(folder).state_path(index)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _manifest(config: RunConfig, episodes: EpisodeFile, device: torch.device, precision: str,
              checkpoint: str | None, weights: str) -> dict[str, Any]:
    import open_clip

    from cdfsl_core import __version__

    return {
        "package_version": __version__,
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available()
        else platform.processor() or platform.machine(),
        "precision": precision,
        "checkpoint": checkpoint,
        "weights": weights,  # sha256 of the weights file, or random:<arch>:seed<s>
        "episode_file": str(episodes.path) if episodes.path else None,
        "episode_file_sha256": episodes.sha256,
        "dataset_fingerprint": episodes.dataset_fingerprint,
        "short_class_policy": episodes.config.short_class_policy,
        "short_classes": episodes.short_classes,
    }


def _episode_file(config: RunConfig, dataset: Any, out: Path) -> tuple[EpisodeFile, Path, bool]:
    """The run's episodes (verified against the dataset), their path, and whether they are new
    (drawn now, to be written once everything else has been checked)."""
    path = Path(config.data.episode_file) if config.data.episode_file else out / "episodes.json"
    if path.exists():
        episodes = load_episodes(path, dataset)
        if episodes.config != config.episodes:
            raise EpisodeError(
                f"Episode file {path} was drawn with {episodes.config}, but the run asks for "
                f"{config.episodes}. Point --episode-file elsewhere or match the settings."
            )
        return episodes, path, False
    return generate_episodes(dataset, config.episodes), path, True


def _check_lora_rank(config: RunConfig) -> None:
    """A LoRA rank above the width of the layers it adapts is no low-rank adapter (and at
    --lora-rank 100000 fills memory): refused, naming the widths."""
    if not adaptation(config.method.adaptation).lora:
        return
    from cdfsl_core.checkpoints import architecture_widths

    widths = architecture_widths(config.model.name)
    if widths and config.method.lora.rank > min(widths.values()):
        described = ", ".join(f"{tower} {width}" for tower, width in widths.items())
        raise ConfigError(f"lora rank {config.method.lora.rank} is above the width of the layers it adapts ({described} "
                          f"in {config.model.name}); a rank-r adapter needs r <= {min(widths.values())}. Pass a smaller "
                          f"--lora-rank (the papers' is {protocol.LORA_RANK}).")


def summary_of_lines(rows: list[dict[str, Any]], episodes: EpisodeFile) -> dict[str, Any]:
    """Mean accuracy and 95% CI of the finished episode lines ``rows`` (failed ones listed, not
    averaged); :func:`summarize` writes it into the run folder."""
    ok = [r["accuracy"] for r in rows if r["status"] == "ok"]
    mean, ci = mean_ci95(ok)
    return {
        "mean_accuracy": json_number(mean),  # null with no finished episode
        "ci95": json_number(ci),  # null with fewer than 2 (undefined, not 0)
        "episodes": len(ok),
        "failed_episodes": [r["episode"] for r in rows if r["status"] != "ok"],
        "episodes_in_file": len(episodes),
        "episode_file_sha256": episodes.sha256,
    }


def load_run(folder: str | os.PathLike[str], bundle: ClipBundle | None = None) -> tuple[RunConfig, ClipBundle, Any, EpisodeFile]:
    """A finished (or partial) run's config, its model (freshly loaded, or ``bundle``), its dataset and episodes."""
    folder = Path(folder)
    run_folder = RunFolder(folder)
    config = RunConfig.from_dict(run_folder.config_dict())
    dataset = load_dataset(config.data.dataset, config.data.root, **config.data.options)
    path = Path(config.data.episode_file) if config.data.episode_file else folder / "episodes.json"
    episodes = load_episodes(path, dataset)
    recorded = run_folder.recorded_episode_file()
    if recorded is not None and recorded != episodes.sha256:
        raise RunFolderError(f"{folder} was run on an episode file with sha256 {recorded[:16]}..., but {path} now has "
                             f"sha256 {episodes.sha256[:16]}...; its episodes cannot be rebuilt. Restore the file.")
    weights = weights_identity(config.model.name, config.model.pretrained, config.episodes.seed)
    saved = run_folder.recorded_weights()
    if saved is not None and saved != weights:
        raise RunFolderError(f"{folder} was run with weights {short_identity(saved)}, but {config.model.pretrained} now holds "
                             f"{short_identity(weights)}; its fine-tuned models cannot be rebuilt. Restore the original weights.")
    if bundle is None:
        if config.model.pretrained is None:
            torch.manual_seed(config.episodes.seed)
        bundle = load_clip(config.model.name, config.model.pretrained, device=resolve_device(config.model.device),
                           tokenizer=config.model.tokenizer)
    return config, bundle, dataset, episodes


@dataclass
class LoadedEpisode:
    """Episode ``index`` of a run folder rebuilt (:func:`load_episode`): its method in the initial
    state the run started it from, and its support and query tensors as the run saw them.
    :meth:`fine_tune` brings the method to the run's trained parameters."""

    folder: Path
    index: int
    config: RunConfig
    bundle: ClipBundle
    method: FewShotCLIP
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor

    @property
    def state(self) -> Path:
        """Where the run keeps this episode's trained parameters (``--save-states``)."""
        return RunFolder(self.folder).state_path(self.index)

    def fine_tune(self, retrain: bool = True) -> str:
        """The method's trained parameters: the run's saved state when it kept one, else trained
        again as the run trained it (the same seed, so the same parameters); returns ``"saved
        state"`` or ``"re-trained"``. ``retrain=False``: a missing state is an error."""
        if self.state.exists():
            load_state(self.method, self.state)
            return "saved state"
        if not retrain:
            raise RunFolderError(f"{self.state} does not exist: episode {self.index} of {self.folder} kept no trained "
                                 "parameters. Run it with --save-states (a finished run is not recomputed; use a new "
                                 "--out folder).")
        train_episode(self.method, self.support, self.support_labels, self.config.train, self.config.model.precision)
        return "re-trained"


def load_episode(folder: str | os.PathLike[str], index: int, bundle: ClipBundle | None = None,
                 method: FewShotCLIP | None = None,
                 loaded: tuple[RunConfig, ClipBundle, Any, EpisodeFile] | None = None) -> LoadedEpisode:
    """Episode ``index`` of the run folder ``folder`` rebuilt, its method reset to the initial state
    (``method``: one of the run's to reuse; ``loaded``: what :func:`load_run` returned for the
    folder, to load it once for many episodes; else the run is loaded, on ``bundle`` if given).
    The one way every command rebuilds an episode from a run."""
    folder = Path(folder)
    config, bundle, dataset, episodes = loaded if loaded is not None else load_run(folder, bundle)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(episodes):
        raise ConfigError(f"episode {index!r} out of range: {folder} has episodes 0..{len(episodes) - 1}.")
    method, support, support_labels, query, query_labels = prepare_episode(config, bundle, dataset, episodes, index,
                                                                         method)
    return LoadedEpisode(folder, index, config, bundle, method, support, support_labels, query, query_labels)


@dataclass
class RunPlan:
    """A run folder checked and ready: its config (paths absolute), device, precision, data and
    episodes. :func:`prepare_run` makes one; :func:`run_episodes` and :func:`summarize` use it."""

    config: RunConfig
    out: Path
    device: torch.device
    precision: str
    dataset: Any
    episodes: EpisodeFile
    weights: str = ""  # the model's identity (cdfsl_core.models.weights_identity), recorded in every line

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.out)

    @property
    def results(self) -> Path:
        return self.folder.results

    def finished(self) -> dict[int, dict[str, Any]]:
        return self.folder.finished()

    def todo(self) -> list[int]:
        finished = self.finished()
        return [i for i in range(len(self.episodes)) if i not in finished]

    def load_model(self) -> ClipBundle:
        if self.config.model.pretrained is None:
            torch.manual_seed(self.config.episodes.seed)  # random weights, the same in every process
        return load_clip(self.config.model.name, self.config.model.pretrained, device=self.device,
                         tokenizer=self.config.model.tokenizer)


def prepare_run(config: RunConfig, out: str | os.PathLike[str], allow_mixed_precision: bool = False,
                device: torch.device | None = None) -> RunPlan:
    """Check everything, then write the run folder's config, episode file and manifest.

    Checked before anything is written: the config's values, the device and precision, the run
    folder (a folder with finished episodes resumes only with the same config, the same episode
    file, the same device type and precision), the data, the episode file and the weights (found
    and readable; they are loaded by whoever runs episodes). A folder without finished episodes
    accepts a corrected command. ``device``: the device the episodes will run on when it is not
    this process's (a sweep's driver plans for its GPU workers)."""
    out = Path(out)
    config = config.with_absolute_paths()
    config.validate()
    folder = RunFolder(out)
    finished = folder.finished() if out.is_dir() else {}
    if len(finished) < config.episodes.n_episodes:  # a finished run is only summarised: it may be read-only
        check_writable_folder(out, "run folder (--out)")
    device = device if device is not None else resolve_device(config.model.device)
    precision = resolve_precision(device, config.model.precision) if device.type != "cuda" or torch.cuda.is_available() \
        else ("bf16" if config.model.precision == "auto" else config.model.precision)
    folder.check_config(config.json_dict(), finished)
    folder.check_precision(device.type, precision, finished, allow_mixed_precision)
    dataset = load_dataset(config.data.dataset, config.data.root, **config.data.options)
    episodes, episode_path, new_episodes = _episode_file(config, dataset, out)
    folder.check_episode_file(episodes.sha256, episodes.path, finished)
    # every image the episodes name, read to its header (a missing, empty or foreign file fails
    # here, before the folder is written; a body truncated midway fails when it is decoded)
    dataset.check_images([i for episode in episodes.episodes for i in (*episode.support_ids, *episode.query_ids)])
    checkpoint = checkpoint_file(config.model.name, config.model.pretrained)
    _check_lora_rank(config)
    weights = weights_identity(config.model.name, config.model.pretrained, config.episodes.seed)
    folder.check_weights(weights, finished)

    # ---- everything checked: from here on the run folder is written
    out.mkdir(parents=True, exist_ok=True)
    if not finished:
        folder.write_config(config.to_dict())
    if new_episodes:
        save_episodes(episodes, episode_path)
    folder.write_manifest(_manifest(config, episodes, device, precision, checkpoint, weights), finished,
                          allow_mixed_precision)
    return RunPlan(config, out, device, precision, dataset, episodes, weights)


def load_plan(out: str | os.PathLike[str], device: torch.device | None = None) -> RunPlan:
    """The plan of a prepared run folder, written by :func:`prepare_run` (in another process: a
    sweep's worker); checks the episode file against the run's record, writes nothing."""
    out = Path(out)
    folder = RunFolder(out)
    if not folder.is_prepared():
        raise RunFolderError(f"{out} is not a prepared run folder: config.json is missing.")
    config = RunConfig.from_dict(folder.config_dict())
    device = device if device is not None else resolve_device(config.model.device)
    precision = resolve_precision(device, config.model.precision)
    dataset = load_dataset(config.data.dataset, config.data.root, **config.data.options)
    episodes, _, new = _episode_file(config, dataset, out)
    if new:
        raise RunFolderError(f"{out}: its episode file is missing; prepare the run again.")
    finished = folder.finished()
    folder.check_episode_file(episodes.sha256, episodes.path, finished)
    weights = weights_identity(config.model.name, config.model.pretrained, config.episodes.seed)
    planned = folder.manifest().get("weights")
    if planned is not None and planned != weights:
        raise RunFolderError(f"{out} was prepared for weights {short_identity(planned)}, but the model now is {short_identity(weights)} "
                             "(the weights file changed since); prepare the run again.")
    folder.check_weights(weights, finished)
    return RunPlan(config, out, device, precision, dataset, episodes, weights)


def resolve_episode_batch(value: int | str, device: torch.device, support_images: int = 1,
                          footprint: Callable[[], int] | None = None, device_share: float = 1.0) -> int:
    """Episodes trained together: a positive number, or ``"auto"``: on a GPU as many as fit
    (:func:`~cdfsl_core.episode_batch.episodes_that_fit`) in its free memory at ``footprint()``
    bytes per episode (:func:`measure_footprint`; without ``footprint``, the largest,
    ``protocol.EPISODE_BATCH["cuda"]``); on the CPU as many episodes (up to
    ``EPISODE_BATCH["cpu"]``) as keep ``protocol.CPU_BATCH_IMAGES`` support images or fewer in a
    step, since a larger batch already fills the cores (``support_images``: one episode's, views
    included). ``device_share``: the part of the GPU this process may use (a sweep's worker
    holding 0.25 GPU: 0.25)."""
    if value == "auto":
        if device.type == "cuda":
            if footprint is None:
                return protocol.EPISODE_BATCH["cuda"]
            free, _ = torch.cuda.mem_get_info(device)
            return episodes_that_fit(free, footprint(), protocol.CUDA_MEMORY_SHARE * min(1.0, device_share))
        return max(1, min(protocol.EPISODE_BATCH["cpu"], protocol.CPU_BATCH_IMAGES // max(1, support_images)))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"episode batch {value!r}; expected a positive number of episodes trained together, or 'auto'.")
    return value


def measure_footprint(plan: RunPlan, bundle: ClipBundle) -> int:
    """Bytes one more episode of this run adds to a training step
    (:func:`~cdfsl_core.episode_batch.episode_footprint` on its first two episodes; 0 when the
    run has one episode or its method cannot be batched)."""
    if len(plan.episodes) < 2:
        return 0
    transform = protocol_transform(bundle, plan.config.train.resize_ratio)
    prepared = [prepare_episode(plan.config, bundle, plan.dataset, plan.episodes, i, None, transform) for i in (0, 1)]
    if batchable(prepared[0][0]) is not None:
        return 0
    return episode_footprint([p[0] for p in prepared], [p[1] for p in prepared], [p[2] for p in prepared],
                             plan.precision)


def support_images(config: RunConfig) -> int:
    """One episode's support images per training step (the authors' 5 views each with augment)."""
    return config.episodes.n_way * config.episodes.k_shot * (5 if config.train.augment else 1)


def run(config: RunConfig, out: str | os.PathLike[str], bundle: ClipBundle | None = None, progress: bool = True,
        save_states: bool = False, allow_mixed_precision: bool = False, episode_batch: int | str = 1) -> dict[str, Any]:
    """Run (or resume) every episode of a run folder; returns the summary.

    :func:`prepare_run` checks everything before the folder is written; the model is loaded (or
    ``bundle`` used) only when episodes are left, so a finished run rerun only summarises and writes
    nothing. Paths are stored absolute, so the folder works from any working folder. Several
    processes may run the same folder at once: each episode is claimed (an OS file lock, released
    if its process dies) and recorded exactly once. ``save_states`` also keeps each episode's
    trained parameters (:func:`state_path`); it does not change results. ``episode_batch``: how many
    episodes train together in one forward (:func:`resolve_episode_batch`); the lines are the same
    for any value, so a run may resume with another. Ctrl-C raises :class:`RunInterrupted`, whose
    message says what finished."""
    plan = prepare_run(config, out, allow_mixed_precision)
    batch = resolve_episode_batch(episode_batch, plan.device, support_images(plan.config))  # checked before loading
    todo = plan.todo()
    if todo:
        bundle = bundle if bundle is not None else plan.load_model()
        if episode_batch == "auto" and plan.device.type == "cuda":  # sized by the device's free memory
            batch = resolve_episode_batch("auto", plan.device, footprint=lambda: measure_footprint(plan, bundle))
        run_episodes(plan, bundle, todo, progress, save_states, episode_batch=batch)
    return summarize(plan)


def summarize(plan: RunPlan) -> dict[str, Any]:
    """The run's summary from its episode lines; ``summary.json`` is written only when it changed."""
    finished = plan.finished()
    summary = summary_of_lines([finished[i] for i in sorted(finished)], plan.episodes)
    plan.folder.write_summary(summary)
    return summary


def run_episodes(plan: RunPlan, bundle: ClipBundle, indices: Sequence[int], progress: bool = True,
                 save_states: bool = False, on_episode: Callable[[int], None] | None = None,
                 episode_batch: int = 1) -> int:
    """Run the episodes ``indices`` of a prepared run that are not finished yet, each claimed
    first so that concurrent processes (two commands, a sweep's tasks) never compute or record one
    twice; episodes another process holds are waited for at the end (and run here if it died).
    ``episode_batch``: train up to that many episodes together in one forward
    (:func:`~cdfsl_core.episode_loop.run_episode_batch`; the same lines as one at a time).
    Returns how many this call recorded; ``on_episode(index)`` is called after each one."""
    if not isinstance(episode_batch, int) or episode_batch < 1:
        raise ConfigError(f"episode_batch={episode_batch!r}; expected a positive number of episodes trained together.")
    config, episodes = plan.config, plan.episodes
    # each image decoded and resized once for all the episodes that show it, kept on the model's device
    transform = ImageCache(plan.dataset, protocol_transform(bundle, config.train.resize_ratio), plan.device)
    methods: list[FewShotCLIP] = []
    label = f"{config.method.adaptation}/{config.method.intervention} on {config.data.dataset}"
    recorded = 0
    pending = [i for i in indices if i not in plan.finished()]
    bar = tqdm(total=len(pending), desc=label, disable=not progress)

    def done(index: int) -> None:
        bar.update()
        if on_episode is not None:
            on_episode(index)

    try:
        for wait in (False, True):  # first what nobody holds, then wait for what others hold
            # (waiting, claims are taken one at a time: holding some while waiting for others could deadlock)
            size = episode_batch if not wait else 1
            busy = []
            position = 0
            while position < len(pending):
                with ExitStack() as claims:
                    batch = []
                    while len(batch) < size and position < len(pending):
                        index = pending[position]
                        position += 1
                        if not claims.enter_context(plan.folder.claim(index, wait)):
                            busy.append(index)
                        elif index in plan.finished():  # another process finished it meanwhile
                            done(index)
                        else:
                            batch.append(index)
                    if not batch:
                        continue
                    paths = [plan.folder.state_path(i) if save_states else None for i in batch]
                    methods, rows = run_episode_batch(config, bundle, plan.dataset, episodes, batch, methods, transform,
                                                      plan.precision, paths)
                    for index, row in zip(batch, rows):
                        row["device"], row["weights"] = plan.device.type, plan.weights
                        recorded += plan.folder.append(index, row)
                        done(index)
            pending = busy
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"{len(plan.finished())} of {len(episodes)} episodes finished and are saved in {plan.out}; "
            "rerun the same command to resume."
        ) from None
    finally:
        bar.close()
    return recorded
