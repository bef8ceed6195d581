"""One episode: reset the method, train it on the support set, evaluate the queries.

Everything random is seeded from ``(seed, index)``, so an episode computes the same whenever and
wherever it runs (a resumed run, a sweep's worker). :mod:`cdfsl_core.runner` runs many of them
into a run folder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from tqdm import tqdm

from cdfsl_core.atomic import atomic_path
from cdfsl_core.config import RunConfig, TrainConfig
from cdfsl_core.episode_batch import (
    EpisodeBatch,
    NonFiniteLoss,
    batchable,
    check_labels,
    generator_like_global,
    protocol_optimisers,
    train_batch,
)
from cdfsl_core.episodes import EpisodeFile
from cdfsl_core.methods import FewShotCLIP
from cdfsl_core.models import ClipBundle
from cdfsl_core.preprocess import ImageCache, load_images, protocol_transform
from cdfsl_core.zeroshot import autocast_for

__all__ = ["NonFiniteLoss", "episode_seed", "evaluate", "load_state", "prepare_episode", "run_episode",
           "run_episode_batch", "save_state", "train_episode"]


def train_episode(
    method: FewShotCLIP, images: torch.Tensor, labels: torch.Tensor, train: TrainConfig, precision: str = "auto",
    at_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Full-batch training on the support set, ``images`` [n, 3, H, W] and ``labels`` [n] (forwards
    under ``precision``'s autocast, see :func:`~cdfsl_core.models.resolve_precision`); returns the
    first and last loss. ``at_step(s)`` is called after s optimiser steps for each s in
    ``train.trajectory_steps`` (0: before the first, ``train.steps``: after the last), with the
    method in eval mode; training resumes in train mode, and nothing random is drawn by a call."""
    wanted = set(train.trajectory_steps) if at_step is not None else set()

    def measure(step: int) -> None:
        if step in wanted:
            method.eval()
            at_step(step)
            method.train()

    check_labels(method, labels)
    optimisers = protocol_optimisers(method.parameter_groups(), train)
    if not optimisers or train.steps == 0:
        if 0 in wanted:
            method.eval()
            at_step(0)
        return {"steps": 0, "loss_first": None, "loss_last": None}
    device = images.device
    method.train()
    first = last = None
    try:
        for step in range(train.steps):
            measure(step)
            with autocast_for(device, precision):
                logits = method(images)
            loss = F.cross_entropy(logits.float(), labels)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at step {step} of {train.steps}")
            first = value if first is None else first
            last = value
            for optimiser in optimisers:
                optimiser.zero_grad(set_to_none=True)
            loss.backward()
            for optimiser in optimisers:
                optimiser.step()
        measure(train.steps)
    finally:
        method.eval()
    return {"steps": train.steps, "loss_first": first, "loss_last": last}


@torch.no_grad()
def evaluate(method: FewShotCLIP, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             precision: str = "auto") -> float:
    """Accuracy on ``images`` (forwards under ``precision``'s autocast)."""
    check_labels(method, labels)
    method.eval()
    device = images.device
    with autocast_for(device, precision):
        text, readout = method.text_features()
        correct = 0
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            logits = method.encode_image(chunk, readout) @ text.T
            correct += (logits.argmax(-1) == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


def _rounded(stats: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-block statistics for a JSON line: block keys as strings, 6 significant digits."""
    return {str(block): {k: float(f"{v:.6g}") for k, v in values.items()} for block, values in stats.items()}


def _trajectory_probe(config: RunConfig, method: FewShotCLIP, query: torch.Tensor, query_labels: torch.Tensor,
                      precision: str, into: list[dict[str, Any]]) -> Callable[[int], None]:
    """What the episode measures on its queries at each trajectory step, appended to ``into``: the
    accuracy, the intervention's statistics per block (ATHA: strengths and edit sizes) and every
    registered probe's dict (:mod:`cdfsl_core.probes`)."""
    from cdfsl_core.probes import list_probes

    probes = {name: factory(method, query, query_labels, config) for name, factory in list_probes().items()}

    def at_step(step: int, measured: tuple[float, dict] | None = None) -> None:
        """``measured``: the accuracy and intervention statistics at this step when the caller
        already has them (an episode batch evaluates its episodes together)."""
        if measured is None:
            with method.intervention.measuring() as stats:
                accuracy = evaluate(method, query, query_labels, config.train.eval_batch_size, precision)
        else:
            accuracy, stats = measured
        point: dict[str, Any] = {"step": step, "accuracy": accuracy}
        if stats:
            point["intervention"] = _rounded(stats)
        with torch.no_grad():
            for name, probe in probes.items():
                point[name] = probe(step)
        into.append(point)

    return at_step


def episode_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def prepare_episode(
    config: RunConfig, bundle: ClipBundle, dataset: Any, episodes: EpisodeFile, index: int,
    method: FewShotCLIP | None = None, transform: T.Compose | ImageCache | None = None,
) -> tuple[FewShotCLIP, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The method reset for episode ``index`` and the episode's tensors on the model's device:
    support images [N K (x5 views), 3, H, W], their labels [N K (x5)], query images [N Q, 3, H, W],
    their labels [N Q]. Everything random is seeded from (seed, index), so an episode computes the
    same whenever and wherever it is prepared."""
    episode = episodes.episodes[index]
    names = episodes.class_names(episode)
    if method is None:
        method = FewShotCLIP(bundle, names, config.method)
    else:
        method.set_classes(names)
    # Seed after building the method (its construction draws random numbers), so that an
    # episode computes the same whether the run started at it or before it.
    seed = episode_seed(config.episodes.seed, index)
    torch.manual_seed(seed)
    method.reset_parameters(torch.Generator().manual_seed(seed))
    device = next(bundle.model.parameters()).device
    transform = transform if transform is not None else protocol_transform(bundle, config.train.resize_ratio)
    support = load_images(dataset, episode.support_ids, transform, config.train.augment).to(device)
    views = 5 if config.train.augment else 1
    support_labels = torch.tensor(episode.support_labels, device=device).repeat_interleave(views)
    query = load_images(dataset, episode.query_ids, transform).to(device)
    query_labels = torch.tensor(episode.query_labels, device=device)
    return method, support, support_labels, query, query_labels


def save_state(method: FewShotCLIP, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(method.trainable_state(), str(tmp))


def load_state(method: FewShotCLIP, path: Path) -> None:
    from safetensors.torch import load_file

    device = next(method.model.parameters()).device
    method.load_trainable_state(load_file(str(path), device=str(device)))


@dataclass
class _Episode:
    """One episode on its way to its line: what :func:`prepare_episode` returned, the generator its
    dropout draws from (batched), and the line as far as it has got."""

    index: int
    method: FewShotCLIP
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    generator: torch.Generator | None = None
    row: dict[str, Any] = field(default_factory=dict)
    before: dict = field(default_factory=dict)  # what the intervention measured at the initial state
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # kept up to a non-finite loss too
    at_step: Callable | None = None  # the trajectory probe (None without trajectory steps)

    @classmethod
    def prepared(cls, index: int, prepared: tuple, generator: torch.Generator | None = None) -> "_Episode":
        return cls(index, *prepared[:5], generator=generator)


def _start_row(config: RunConfig, episodes: EpisodeFile, episode: _Episode, precision: str,
               measured: tuple[float, dict] | None = None) -> None:
    """An episode's line before training: its accuracy at the initial state and what the
    intervention measures of its own action there (ATHA: its edit size per block; ``measured``:
    both, when an episode batch evaluated them), and its trajectory probe."""
    episode.row = {"episode": episode.index, "classes": episodes.class_names(episodes.episodes[episode.index])}
    if measured is None:
        with episode.method.intervention.measuring() as before:
            measured = (evaluate(episode.method, episode.query, episode.query_labels, config.train.eval_batch_size,
                                 precision), before)
    episode.row["accuracy_init"], episode.before = measured
    if config.train.trajectory_steps:
        episode.at_step = _trajectory_probe(config, episode.method, episode.query, episode.query_labels, precision,
                                            episode.trajectory)


def _finish_row(config: RunConfig, episodes: EpisodeFile, episode: _Episode, outcome: dict[str, Any] | NonFiniteLoss,
                precision: str, save_state_to: Path | None, measured: tuple[float, dict] | None = None,
                ) -> dict[str, Any]:
    """The line of a trained episode (``outcome``: what training returned, or the NonFiniteLoss it
    raised; ``measured``: the trained accuracy and intervention statistics, when an episode batch
    evaluated them); keeps the trained parameters at ``save_state_to``."""
    row, method = episode.row, episode.method
    if isinstance(outcome, NonFiniteLoss):
        row.update(status="non-finite-loss", accuracy=None, message=str(outcome))
        tqdm.write(f"episode {episode.index}: stopped, {outcome}; recorded as failed, not averaged")
    else:
        row.update(outcome)
        if measured is None:
            with method.intervention.measuring() as after:
                measured = (evaluate(method, episode.query, episode.query_labels, config.train.eval_batch_size,
                                     precision), after)
        row["accuracy"], after = measured
        if episode.before or after:
            row["intervention_stats"] = {"init": _rounded(episode.before), "trained": _rounded(after)}
        row["status"] = "ok"
    if episode.trajectory:
        row["trajectory"] = episode.trajectory
    if save_state_to is not None and row["status"] == "ok" and method.trainable_state():
        save_state(method, save_state_to)
    logged = method.intervention.episode_log()  # what the intervention says of itself (ATHA: alpha, beta)
    if logged:
        row["intervention_log"] = logged
    row["precision"] = precision
    row["episode_file_sha256"] = episodes.sha256
    return row


def run_episode(config: RunConfig, bundle: ClipBundle, dataset: Any, episodes: EpisodeFile, index: int,
                method: FewShotCLIP | None, transform: T.Compose | ImageCache, precision: str,
                save_state_to: Path | None = None) -> tuple[FewShotCLIP, dict[str, Any]]:
    """Train and evaluate episode ``index`` (the method is reset, or built when None); its line
    without the run folder's fields. ``save_state_to``: keep the trained parameters there (before
    the line exists, so a listed episode has its state)."""
    start = time.perf_counter()
    episode = _Episode.prepared(index, prepare_episode(config, bundle, dataset, episodes, index, method, transform))
    return episode.method, _run_alone(config, episodes, episode, precision, save_state_to, start)


def _run_alone(config: RunConfig, episodes: EpisodeFile, episode: _Episode, precision: str,
               save_state_to: Path | None, start: float) -> dict[str, Any]:
    """The line of a prepared episode trained alone."""
    _start_row(config, episodes, episode, precision)
    try:
        outcome: dict[str, Any] | NonFiniteLoss = train_episode(episode.method, episode.support, episode.support_labels,
                                                            config.train, precision, episode.at_step)
    except NonFiniteLoss as err:
        outcome = err
    row = _finish_row(config, episodes, episode, outcome, precision, save_state_to)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _set_global_state(generator: torch.Generator) -> None:
    if generator.device.type == "cuda":
        torch.cuda.set_rng_state(generator.get_state(), generator.device)
    else:
        torch.set_rng_state(generator.get_state())


def run_episode_batch(config: RunConfig, bundle: ClipBundle, dataset: Any, episodes: EpisodeFile,
                      indices: Sequence[int], methods: Sequence[FewShotCLIP | None], transform: T.Compose | ImageCache,
                      precision: str, save_state_to: Sequence[Path | None] | None = None,
                      ) -> tuple[list[FewShotCLIP], list[dict[str, Any]]]:
    """:func:`run_episode` for the episodes ``indices`` trained together in one forward
    (:mod:`cdfsl_core.episode_batch`): the same lines, to float rounding, plus ``episode_batch``
    (how many trained together) and ``seconds`` (the batch's time shared equally). ``methods``:
    one per episode to reuse (None: built). Episodes the batch cannot hold (an intervention that
    edits one episode at a time, support sets of different sizes) run one after another."""
    save_state_to = list(save_state_to) if save_state_to is not None else [None] * len(indices)
    methods = list(methods) + [None] * (len(indices) - len(methods))
    if len(indices) == 1:
        method, row = run_episode(config, bundle, dataset, episodes, indices[0], methods[0], transform, precision,
                                  save_state_to[0])
        return [method], [row]
    start = time.perf_counter()
    batch: list[_Episode] = []
    for index, method in zip(indices, methods):
        prepared = prepare_episode(config, bundle, dataset, episodes, index, method, transform)
        # the state dropout draws from when this episode trains alone (the next episode reseeds)
        batch.append(_Episode.prepared(index, prepared, generator_like_global(prepared[1].device)))
    built = [episode.method for episode in batch]
    if batchable(built[0]) is not None or len({len(episode.support) for episode in batch}) != 1:
        rows = []
        for episode, path in zip(batch, save_state_to):
            _set_global_state(episode.generator)  # the global generator as this episode left it, for its dropout
            rows.append(_run_alone(config, episodes, episode, precision, path, time.perf_counter()))
        return built, rows
    rows = _train_together(config, episodes, batch, precision, save_state_to)
    seconds = round((time.perf_counter() - start) / len(indices), 3)
    for row in rows:
        row["episode_batch"] = len(indices)
        row["seconds"] = seconds
    return built, rows


def _train_together(config: RunConfig, episodes: EpisodeFile, batch: list[_Episode], precision: str,
                    save_state_to: Sequence[Path | None]) -> list[dict[str, Any]]:
    """The lines of prepared episodes trained in one episode batch, their queries evaluated together
    (before, at each trajectory step, after) when the intervention measures E episodes at once."""
    stacked = EpisodeBatch([episode.method for episode in batch], [episode.generator for episode in batch])
    queries, labels = [episode.query for episode in batch], [episode.query_labels for episode in batch]
    together = _evaluates_together(stacked, queries)
    size = config.train.eval_batch_size

    def evaluated() -> list[tuple[float, dict] | None]:
        if not together:
            return [None] * len(batch)
        return _per_episode(stacked.evaluate(queries, labels, size, precision, measure=True))

    for episode, measured in zip(batch, evaluated()):
        _start_row(config, episodes, episode, precision, measured)
    at_step = [episode.at_step for episode in batch]
    if together and any(probe is not None for probe in at_step):
        at_step = _shared_evaluation(stacked, queries, labels, size, precision, at_step)
    outcomes = train_batch(stacked.methods, [episode.support for episode in batch],
                           [episode.support_labels for episode in batch], config.train, precision,
                           generators=[episode.generator for episode in batch], at_step=at_step, batch=stacked)
    return [_finish_row(config, episodes, episode, outcome, precision, path, measured)
            for episode, outcome, path, measured in zip(batch, outcomes, save_state_to, evaluated())]


def _evaluates_together(batch: EpisodeBatch, queries: Sequence[torch.Tensor]) -> bool:
    """Whether the batch's episodes can be evaluated in one forward (:meth:`EpisodeBatch.evaluate`):
    query sets of one size, and an intervention that measures E episodes at once."""
    return len({len(q) for q in queries}) == 1 and batch.methods[0].intervention.measures_episodes()


def _per_episode(evaluated: tuple[list[float], list[dict]]) -> list[tuple[float, dict]]:
    accuracies, stats = evaluated
    return list(zip(accuracies, stats))


def _shared_evaluation(batch: EpisodeBatch, queries: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                       size: int, precision: str, probes: Sequence[Callable | None]) -> list[Callable | None]:
    """Trajectory probes that take their accuracy and intervention statistics from one batched
    evaluation per step, done when the first episode is measured at that step (the stacked
    parameters are the episodes' own then; a stopped episode's result is never read)."""
    done: dict[int, list[tuple[float, dict]]] = {}

    def probe_for(e: int, probe: Callable) -> Callable[[int], None]:
        def at_step(step: int) -> None:
            if step not in done:
                done.clear()
                done[step] = _per_episode(batch.evaluate(queries, labels, size, precision, measure=True))
            probe(step, done[step][e])

        return at_step

    return [probe_for(e, probe) if probe is not None else None for e, probe in enumerate(probes)]
