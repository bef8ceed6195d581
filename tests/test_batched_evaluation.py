"""E episodes evaluated in one forward give each episode what its one-episode evaluation gives.

The reference is the one-episode evaluation (``evaluate`` inside ``intervention.measuring()``, as
the earlier tests pin it): for each of the 12 methods, after a few training steps that make the
episodes differ, the batched evaluation must give the same logits (1e-5, fp32), the same accuracy
and the same per-episode intervention statistics, and a run must write the same lines at E = 1 and
E = 3 (trajectories included). The positive controls show the comparisons can fail: the episodes'
results differ from one another, and a batch whose query sets are handed over in another order
gives other numbers. The step loop reads nothing back from the device per step: the number of
host reads during training does not grow with the number of steps.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest
import torch
from test_episode_batch import TOL, E, _assert_same_lines, _config, _episodes, _lines

from cdfsl_core.episode_batch import (
    EpisodeBatch,
    episode_footprint,
    episodes_that_fit,
    generator_like_global,
    train_batch,
)
from cdfsl_core.episode_loop import evaluate, prepare_episode, train_episode
from cdfsl_core.errors import ConfigError
from cdfsl_core.models import load_clip
from cdfsl_core.names import ADAPTATIONS, INTERVENTIONS
from cdfsl_core.runner import measure_footprint, prepare_run, resolve_episode_batch, run


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_clip("cdfsl-test-vit")


def _trained(config, bundle):
    """E methods, each trained alone for a few steps (so that they differ), with their queries."""
    dataset, episodes, transform = _episodes(config, bundle)
    methods, queries, labels = [], [], []
    for i in range(E):
        method, support, y, query, query_labels = prepare_episode(config, bundle, dataset, episodes, i, None, transform)
        train_episode(method, support, y, config.train)
        methods.append(method), queries.append(query), labels.append(query_labels)
    return methods, queries, labels


def _alone(method, query, labels, batch_size):
    with method.intervention.measuring() as stats:
        accuracy = evaluate(method, query, labels, batch_size, "fp32")
    return accuracy, stats


def _close_stats(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for block in a:
        assert set(a[block]) == set(b[block])
        for key, value in a[block].items():
            assert b[block][key] == pytest.approx(value, abs=TOL, rel=TOL, nan_ok=True), (block, key)


@pytest.mark.parametrize("adaptation", ADAPTATIONS)
@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_every_method_evaluates_batched_as_alone(bundle, adaptation, intervention):
    config = _config(adaptation, intervention, 1, steps=3)
    methods, queries, labels = _trained(config, bundle)
    alone = [_alone(m, q, y, 256) for m, q, y in zip(methods, queries, labels)]
    batch = EpisodeBatch(methods)
    # batch size 4 over 3 episodes: one query of each episode per forward, six forwards
    for size in (256, 4):
        accuracies, stats = batch.evaluate(queries, labels, size, "fp32", measure=True)
        assert accuracies == [a for a, _ in alone]
        for (_, expected), got in zip(alone, stats):
            _close_stats(expected, got)
    with torch.no_grad():
        together = batch.eval()(torch.cat(queries))  # [E, n, C]
        for e, (method, query) in enumerate(zip(methods, queries)):
            assert (together[e] - method(query)).abs().max() < TOL
    if intervention == "atha":  # the statistics are each episode's own: trained episodes differ
        assert len({stats[e][0]["alpha"] for e in range(E)}) == E


def test_positive_control_query_sets_swapped_are_caught(bundle):
    """Handing episode 0 the queries of episode 1 (and back) changes the logits and statistics far
    beyond the tolerance: the comparison above is one that can fail."""
    config = _config("coop+lora", "atha", 1, steps=3)
    methods, queries, labels = _trained(config, bundle)
    batch = EpisodeBatch(methods)
    _, right = batch.evaluate(queries, labels, 256, "fp32", measure=True)
    swapped = [queries[1], queries[0], queries[2]]
    _, wrong = batch.evaluate(swapped, labels, 256, "fp32", measure=True)
    block = max(right[0])
    assert abs(right[0][block]["token_norm"] - wrong[0][block]["token_norm"]) > 100 * TOL
    assert right[2] == wrong[2]  # the episode that kept its queries is unchanged


def test_batched_evaluation_refuses_unequal_query_sets(bundle):
    config = _config("coop+lora", "none", 1)
    methods, queries, labels = _trained(config, bundle)
    with pytest.raises(ConfigError, match="same size"):
        EpisodeBatch(methods).evaluate([queries[0], queries[1][:-1], queries[2]], labels, 256)


@pytest.mark.parametrize("adaptation", ADAPTATIONS)
@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_every_method_writes_the_same_lines_batched(tmp_path, bundle, adaptation, intervention):
    """Every line field, trajectories and intervention statistics included, at E = 1 and E = 3
    (evaluated together, in forwards of one query per episode: eval_batch_size 3)."""
    config = _config(adaptation, intervention, 1, steps=2, trajectory_steps=(0, 2), eval_batch_size=3)
    run(config, tmp_path / "one", bundle=bundle, progress=False)
    run(config, tmp_path / "three", bundle=bundle, progress=False, episode_batch=3)
    one, three = _lines(tmp_path / "one"), _lines(tmp_path / "three")
    _assert_same_lines(one, three)
    assert [row["episode_batch"] for row in three] == [3] * E
    trains = adaptation != "zeroshot" or intervention == "atha"  # else only step 0 is measured, as alone
    assert all(len(row["trajectory"]) == (2 if trains else 1) for row in three)


def _host_reads(monkeypatch) -> list[str]:
    """Record every read of a tensor's value by the host (what waits for a device), except torch's
    optimisers reading their step counters, which live on the host unless the optimiser is fused
    or capturable (and are fused on CUDA: ``protocol_optimisers``)."""
    reads: list[str] = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.endswith(os.path.join("torch", "optim", "optimizer.py")):
                reads.append(f"{_name} in {os.path.basename(caller)}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_the_step_loop_reads_nothing_back_per_step(bundle, monkeypatch, intervention):
    """The host reads during a batched training do not grow with its steps (2 or 6 steps: the same
    count), while a loop that read each step's losses would add E or more per step; the reads of
    the one-episode loop, which reads its loss every step, do grow (the control)."""
    counts, alone = {}, {}
    for steps in (2, 6):
        config = _config("coop+lora", intervention, 1, steps=steps)
        dataset, episodes, transform = _episodes(config, bundle)
        prepared = [prepare_episode(config, bundle, dataset, episodes, i, None, transform) for i in range(E)]
        generators = [generator_like_global(p[1].device) for p in prepared]
        with monkeypatch.context() as patch:
            reads = _host_reads(patch)
            train_batch([p[0] for p in prepared], [p[1] for p in prepared], [p[2] for p in prepared], config.train,
                        "fp32", generators)
            counts[steps] = len(reads)
            reads.clear()
            train_episode(prepared[0][0], prepared[0][1], prepared[0][2], config.train, "fp32")
            alone[steps] = len(reads)
    assert counts[2] == counts[6]
    assert alone[6] >= alone[2] + 4


def test_a_stopped_episode_is_not_measured_after_it_stopped(bundle):
    """With a trajectory, an episode stopped by a non-finite loss gets no later trajectory point,
    and the others get all of theirs."""
    config = _config("coop+lora", "none", 1, steps=2, trajectory_steps=(0, 1, 2))
    dataset, episodes, transform = _episodes(config, bundle)
    prepared = [prepare_episode(config, bundle, dataset, episodes, i, None, transform) for i in range(E)]
    supports = [p[1] for p in prepared]
    supports[1] = supports[1].clone().fill_(float("nan"))
    seen: dict[int, list[int]] = {e: [] for e in range(E)}
    probes = [lambda step, e=e: seen[e].append(step) for e in range(E)]
    results = train_batch([p[0] for p in prepared], supports, [p[2] for p in prepared],
                          replace(config.train), "fp32", [generator_like_global(s.device) for s in supports], probes)
    assert seen == {0: [0, 1, 2], 1: [0], 2: [0, 1, 2]}
    assert str(results[1]) == "loss is nan at step 0 of 2"


GIB = 2**30


def test_episodes_that_fit_by_hand():
    # 0.6 of 80 GiB free at 1 GiB per episode: 48; at 100 MiB: 491, capped at 256; too little: 1
    assert episodes_that_fit(80 * GIB, GIB, 0.6, 256) == 48
    assert episodes_that_fit(80 * GIB, 100 * 2**20, 0.6, 256) == 256
    assert episodes_that_fit(GIB, 4 * GIB, 0.6, 256) == 1
    assert episodes_that_fit(GIB, 0, 0.6, 256) == 256  # nothing measured per episode (one-episode run)
    assert episodes_that_fit(80 * GIB, GIB) == 48  # the protocol's defaults: 0.6 and 256


def _footprint(bundle, shots):
    config = _config("coop+lora", "atha", shots, augment=False)
    dataset, episodes, transform = _episodes(config, bundle)
    prepared = [prepare_episode(config, bundle, dataset, episodes, i, None, transform) for i in (0, 1)]
    before = [p[0].trainable_state() for p in prepared]
    size = episode_footprint([p[0] for p in prepared], [p[1] for p in prepared], [p[2] for p in prepared], "fp32")
    for p, state in zip(prepared, before):  # measuring trains nothing
        assert all(torch.equal(state[k], v) for k, v in p[0].trainable_state().items())
    return size


def test_the_footprint_of_an_episode_grows_with_its_images(bundle):
    """One more episode's bytes: positive, and five times the support images cost more than twice
    (the class prompts are the same), less than five times."""
    one, five = _footprint(bundle, 1), _footprint(bundle, 5)
    assert one > 0
    assert 2 * one < five < 5 * one


def test_auto_on_a_gpu_is_sized_by_free_memory(monkeypatch, tmp_path, bundle):
    """'auto' on CUDA: the share of the free memory over the measured footprint (the device's memory
    query stubbed: no GPU needed), a sweep worker's share of the device scaling it down."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 80 * GIB))
    cuda = torch.device("cuda")
    assert resolve_episode_batch("auto", cuda, footprint=lambda: GIB // 10) == 60
    assert resolve_episode_batch("auto", cuda, footprint=lambda: GIB // 10, device_share=0.25) == 15
    assert resolve_episode_batch(3, cuda, footprint=lambda: GIB) == 3  # a number is taken as it is
    plan = prepare_run(_config("coop+lora", "tir", 1), tmp_path / "run")
    measured = measure_footprint(plan, bundle)
    assert measured > 0
    assert resolve_episode_batch("auto", cuda, footprint=lambda: measured) == episodes_that_fit(10 * GIB, measured)


@pytest.mark.parametrize("adaptation", ["coop", "coop+lora"])
def test_every_attention_takes_the_fused_path(bundle, adaptation):
    """A training forward of an episode batch runs PyTorch's scaled-dot-product attention in every
    block of both towers, with LoRA swapped in (its own attention) or not (open_clip's
    nn.MultiheadAttention): the profiler counts one fused attention call per block."""
    from torch.profiler import ProfilerActivity, profile

    from cdfsl_core.towers import text_tower, vision_tower

    config = _config(adaptation, "tir", 1)
    dataset, episodes, transform = _episodes(config, bundle)
    prepared = [prepare_episode(config, bundle, dataset, episodes, i, None, transform) for i in range(2)]
    batch = EpisodeBatch([p[0] for p in prepared]).train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        batch(torch.cat([p[1] for p in prepared])).sum().backward()
    batch.eval()
    fused = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")
                and "backward" not in e.key)
    blocks = vision_tower(bundle.model).n_blocks + len(text_tower(bundle.model).blocks)
    assert fused == blocks
