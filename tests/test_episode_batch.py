"""E episodes trained in one forward give each episode what the sequential runner gives it.

The reference is the sequential runner itself (``train_episode``, one episode at a time, as every
earlier test pins it): for each of the 12 methods, at 1 and 5 shots, the batched route must end
with the same learned parameters, logits and losses (to 1e-5 in fp32) and the same episode lines.
The positive control shows the comparison can fail: drawing the dropout masks from one shared
generator instead of each episode's own changes the learned parameters far beyond the tolerance.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY

from cdfsl_core.cli import episode_batch_arg
from cdfsl_core.config import LoRAConfig, MethodConfig, TrainConfig
from cdfsl_core.data import load_dataset
from cdfsl_core.episode_batch import EpisodeBatch, NonFiniteLoss, generator_like_global, train_batch
from cdfsl_core.episode_loop import prepare_episode, train_episode
from cdfsl_core.episodes import generate_episodes
from cdfsl_core.errors import ConfigError
from cdfsl_core.lora import dropout
from cdfsl_core.models import load_clip
from cdfsl_core.names import ADAPTATIONS, INTERVENTIONS
from cdfsl_core.preprocess import protocol_transform
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.runner import prepare_run, resolve_episode_batch, run, run_episodes

E = 3
TOL = 1e-5


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_clip("cdfsl-test-vit")


def _config(adaptation: str, intervention: str, shots: int, **train):
    return replace(TINY, method=MethodConfig(adaptation, intervention, lora=LoRAConfig(rank=2)),
                   episodes=replace(TINY.episodes, k_shot=shots, n_episodes=E),
                   train=TrainConfig(steps=train.pop("steps", 4), **train))


def _episodes(config, bundle):
    dataset = load_dataset(config.data.dataset, None, **config.data.options)
    return dataset, generate_episodes(dataset, config.episodes), protocol_transform(bundle, config.train.resize_ratio)


def _sequential(config, bundle):
    dataset, episodes, transform = _episodes(config, bundle)
    out = []
    for i in range(E):
        method, support, labels, query, _ = prepare_episode(config, bundle, dataset, episodes, i, None, transform)
        try:
            result = train_episode(method, support, labels, config.train)
        except NonFiniteLoss as err:
            result = err
        with torch.no_grad():
            out.append((method.trainable_state(), result, method(query)))
    return out


def _batched(config, bundle, shared_generator: bool = False, poison: int | None = None):
    dataset, episodes, transform = _episodes(config, bundle)
    methods, supports, labels, queries, generators = [], [], [], [], []
    for i in range(E):
        method, support, y, query, _ = prepare_episode(config, bundle, dataset, episodes, i, None, transform)
        generators.append(generator_like_global(support.device))
        if poison == i:
            support = support.clone().fill_(float("nan"))
        methods.append(method), supports.append(support), labels.append(y), queries.append(query)
    results = train_batch(methods, supports, labels, config.train,
                          generators=[generators[0]] * E if shared_generator else generators)
    out = []
    for method, result, query in zip(methods, results, queries):
        with torch.no_grad():
            out.append((method.trainable_state(), result, method(query)))
    return out


def _max_difference(a, b) -> float:
    worst = 0.0
    for (state_a, _, logits_a), (state_b, _, logits_b) in zip(a, b):
        assert set(state_a) == set(state_b)
        for name in state_a:
            worst = max(worst, float((state_a[name] - state_b[name]).abs().max()))
        worst = max(worst, float((logits_a - logits_b).abs().max()))
    return worst


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("adaptation", ADAPTATIONS)
@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_every_method_trains_batched_as_alone(bundle, adaptation, intervention, shots):
    config = _config(adaptation, intervention, shots, augment=shots == 1)
    alone, together = _sequential(config, bundle), _batched(config, bundle)
    assert _max_difference(alone, together) < TOL
    for (_, a, _), (_, b, _) in zip(alone, together):
        assert a["steps"] == b["steps"]
        if a["loss_first"] is None:
            assert b["loss_first"] is None and b["loss_last"] is None
        else:
            assert b["loss_first"] == pytest.approx(a["loss_first"], abs=TOL)
            assert b["loss_last"] == pytest.approx(a["loss_last"], abs=TOL)
    if adaptation != "zeroshot" or intervention == "atha":  # something trained: the parameters moved
        dataset, episodes, transform = _episodes(config, bundle)
        initial = prepare_episode(config, bundle, dataset, episodes, 0, None, transform)[0].trainable_state()
        assert any(not torch.equal(initial[name], together[0][0][name]) for name in initial)


def test_positive_control_shared_dropout_masks_are_caught(bundle):
    """Episodes drawing their dropout masks from one generator differ from their sequential runs by
    far more than the tolerance: the equality above is not a comparison that cannot fail."""
    config = _config("coop+lora", "tir", 5)
    assert _max_difference(_sequential(config, bundle), _batched(config, bundle, shared_generator=True)) > 100 * TOL


def test_dropout_equals_torch_dropout_bit_for_bit():
    x = torch.randn(4, 9, 16)
    torch.manual_seed(3)
    expected = F.dropout(x, 0.25, training=True)
    assert torch.equal(dropout(x, 0.25, True, torch.Generator().manual_seed(3)), expected)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.25, True), expected)
    assert dropout(x, 0.25, False) is x


def test_a_non_finite_loss_stops_that_episode_only(bundle):
    config = _config("coop+lora", "atha", 1)
    alone = _sequential(config, bundle)
    together = _batched(config, bundle, poison=1)
    assert isinstance(together[1][1], NonFiniteLoss)
    assert str(together[1][1]) == "loss is nan at step 0 of 4"
    assert _max_difference([alone[0], alone[2]], [together[0], together[2]]) < TOL
    # the stopped episode keeps the parameters it had when it stopped (its initial ones)
    dataset, episodes, transform = _episodes(config, bundle)
    fresh = prepare_episode(config, bundle, dataset, episodes, 1, None, transform)[0].trainable_state()
    assert all(torch.equal(fresh[name], together[1][0][name]) for name in fresh)


def _lines(folder: Path) -> list[dict]:
    lines = RunFolder(folder).lines()[0]
    return sorted(lines, key=lambda row: row["episode"])


def _assert_same_lines(a: list[dict], b: list[dict]) -> None:
    def close(x, y, where):
        if isinstance(x, dict):
            assert set(x) == set(y), where
            for key in x:
                close(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                close(u, v, f"{where}[{i}]")
        elif isinstance(x, float) and isinstance(y, float) and math.isfinite(x):
            assert y == pytest.approx(x, abs=TOL, rel=TOL), where
        else:
            assert x == y, where

    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        skip = {"seconds", "episode_batch", "timestamp"}
        close({k: v for k, v in row_a.items() if k not in skip}, {k: v for k, v in row_b.items() if k not in skip},
              f"episode {row_a['episode']}")


def test_runs_give_the_same_lines_and_resume_with_another_batch(tmp_path, bundle):
    """A run at E = 1 and the same run started at E = 2 and resumed at E = 3 write the same lines,
    trajectories, intervention statistics and logs included; the batched lines say how many trained
    together."""
    config = _config("coop+lora", "atha", 1, trajectory_steps=(0, 2, 4))
    config = replace(config, episodes=replace(config.episodes, n_episodes=5))
    run(config, tmp_path / "one", bundle=bundle, progress=False)
    plan = prepare_run(config, tmp_path / "mixed")
    assert run_episodes(plan, bundle, [0, 1], progress=False, episode_batch=2) == 2
    run(config, tmp_path / "mixed", bundle=bundle, progress=False, episode_batch=3)
    one, mixed = _lines(tmp_path / "one"), _lines(tmp_path / "mixed")
    _assert_same_lines(one, mixed)
    assert [row.get("episode_batch") for row in mixed] == [2, 2, 3, 3, 3]
    assert "episode_batch" not in one[0] and len(one[0]["trajectory"]) == 3 and "intervention_stats" in one[0]


def test_episode_batch_values_are_checked():
    # auto: on the CPU as many episodes as keep a step at or under 40 support images, at most 8
    assert resolve_episode_batch("auto", torch.device("cpu"), 5) == 8
    assert resolve_episode_batch("auto", torch.device("cpu"), 10) == 4
    assert resolve_episode_batch("auto", torch.device("cpu"), 25) == 1
    assert resolve_episode_batch("auto", torch.device("cpu"), 125) == 1
    assert resolve_episode_batch("auto", torch.device("cuda"), 125) == 256  # unmeasured: the largest
    assert resolve_episode_batch(4, torch.device("cpu")) == 4
    for bad in (0, -2, 1.5, "8", True):
        with pytest.raises(ConfigError, match="episode batch"):
            resolve_episode_batch(bad, torch.device("cpu"))
    assert episode_batch_arg("auto") == "auto" and episode_batch_arg("16") == 16
    with pytest.raises(Exception, match="positive integer"):
        episode_batch_arg("0")


def test_batch_refuses_mixed_methods(bundle):
    config = _config("coop+lora", "tir", 1)
    dataset, episodes, transform = _episodes(config, bundle)
    a = prepare_episode(config, bundle, dataset, episodes, 0, None, transform)[0]
    other = replace(config, method=MethodConfig("lora", "tir", lora=LoRAConfig(rank=2)))
    b = prepare_episode(other, bundle, dataset, episodes, 1, None, transform)[0]
    with pytest.raises(ConfigError, match="one model and one config"):
        EpisodeBatch([a, b])
