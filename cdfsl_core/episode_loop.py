"""One episode: reset the method, train it on the support set, evaluate the queries.

Everything random is seeded from ``(seed, index)``, so an episode computes the same whenever and
wherever it runs (a resumed run, a sweep's worker). :mod:`cdfsl_core.runner` runs many of them
into a run folder.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from tqdm import tqdm

from cdfsl_core.atomic import atomic_path
from cdfsl_core.config import RunConfig, TrainConfig
from cdfsl_core.episodes import EpisodeFile
from cdfsl_core.methods import FewShotCLIP
from cdfsl_core.models import ClipBundle
from cdfsl_core.preprocess import load_images, protocol_transform
from cdfsl_core.zeroshot import autocast_for

__all__ = ["NonFiniteLoss", "episode_seed", "evaluate", "load_state", "prepare_episode", "run_episode", "save_state",
           "train_episode"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite during an episode."""


def check_labels(method: FewShotCLIP, labels: torch.Tensor) -> None:
    """The episode's labels must index the method's classes."""
    n_way = int(labels.max().item()) + 1 if len(labels) else 0
    if n_way != len(method.class_names):
        raise ValueError(
            f"The method has {len(method.class_names)} class names {method.class_names}, but the "
            f"episode's labels are 0..{n_way - 1} ({n_way}-way). Pass one name per episode class."
        )


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
    groups = method.parameter_groups()
    optimisers: list[torch.optim.Optimizer] = []
    if groups["lora"] or groups["scale"]:
        optimisers.append(torch.optim.AdamW(groups["lora"] + groups["scale"], lr=train.lr_lora))
    if groups["context"]:
        optimisers.append(torch.optim.SGD(groups["context"], lr=train.lr_context, momentum=train.momentum,
                                          weight_decay=train.weight_decay_context))
    if groups["intervention"]:
        optimisers.append(torch.optim.SGD(groups["intervention"], lr=train.lr_intervention))
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

    def at_step(step: int) -> None:
        with method.intervention.measuring() as stats:
            accuracy = evaluate(method, query, query_labels, config.train.eval_batch_size, precision)
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
    method: FewShotCLIP | None = None, transform: T.Compose | None = None,
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
    transform = transform or protocol_transform(bundle, config.train.resize_ratio)
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


def run_episode(config: RunConfig, bundle: ClipBundle, dataset: Any, episodes: EpisodeFile, index: int,
                method: FewShotCLIP | None, transform: T.Compose, precision: str,
                save_state_to: Path | None = None) -> tuple[FewShotCLIP, dict[str, Any]]:
    """Train and evaluate episode ``index`` (the method is reset, or built when None); its line
    without the run folder's fields. ``save_state_to``: keep the trained parameters there (before
    the line exists, so a listed episode has its state)."""
    start = time.perf_counter()
    method, support, support_labels, query, query_labels = prepare_episode(
        config, bundle, dataset, episodes, index, method, transform)
    row: dict[str, Any] = {"episode": index, "classes": episodes.class_names(episodes.episodes[index])}
    trajectory: list[dict[str, Any]] = []  # kept up to a non-finite loss too
    try:
        # the queries at the initial state: the method's accuracy before training, and what the
        # intervention measures about its own action (ATHA: its edit size per block)
        with method.intervention.measuring() as before:
            row["accuracy_init"] = evaluate(method, query, query_labels, config.train.eval_batch_size, precision)
        at_step = _trajectory_probe(config, method, query, query_labels, precision, trajectory) \
            if config.train.trajectory_steps else None
        row.update(train_episode(method, support, support_labels, config.train, precision, at_step))
        with method.intervention.measuring() as after:
            row["accuracy"] = evaluate(method, query, query_labels, config.train.eval_batch_size, precision)
        if before or after:
            row["intervention_stats"] = {"init": _rounded(before), "trained": _rounded(after)}
        row["status"] = "ok"
    except NonFiniteLoss as err:
        row.update(status="non-finite-loss", accuracy=None, message=str(err))
        tqdm.write(f"episode {index}: stopped, {err}; recorded as failed, not averaged")
    if trajectory:
        row["trajectory"] = trajectory
    if save_state_to is not None and row["status"] == "ok" and method.trainable_state():
        save_state(method, save_state_to)
    logged = method.intervention.episode_log()  # what the intervention says of itself (ATHA: alpha, beta)
    if logged:
        row["intervention_log"] = logged
    row["precision"] = precision
    row["episode_file_sha256"] = episodes.sha256
    row["seconds"] = round(time.perf_counter() - start, 3)
    return method, row
