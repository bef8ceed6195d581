"""Episode files: determinism, independence from global RNG, hashing, policies and bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from helpers import LabelsOnly

from cdfsl_core.episodes import EpisodeConfig, generate_episodes, load_episodes, main, save_episodes
from cdfsl_core.errors import EpisodeError


@pytest.fixture
def dataset():
    return LabelsOnly([30, 25, 40, 20, 22, 35, 50])


def test_same_arguments_give_a_byte_identical_file(dataset, tmp_path):
    config = EpisodeConfig(n_way=5, k_shot=1, n_query=15, n_episodes=20, seed=3)
    a = save_episodes(generate_episodes(dataset, config), tmp_path / "a.json")
    np.random.seed(123), random.seed(7), torch.manual_seed(99)  # global state must not matter
    np.random.rand(10)
    b = save_episodes(generate_episodes(dataset, config), tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    c = save_episodes(generate_episodes(dataset, EpisodeConfig(5, 1, 15, 20, seed=4)), tmp_path / "c.json")
    assert c.read_bytes() != a.read_bytes()


def test_episodes_have_the_configured_shape_and_disjoint_sets(dataset):
    eps = generate_episodes(dataset, EpisodeConfig(n_way=5, k_shot=5, n_query=15, n_episodes=30, seed=0))
    targets = np.asarray(dataset.targets)
    for ep in eps.episodes:
        assert len(set(ep.classes)) == 5
        assert [len(s) for s in ep.support] == [5] * 5 and [len(q) for q in ep.query] == [15] * 5
        assert not set(ep.support_ids) & set(ep.query_ids)
        assert len(set(ep.query_ids)) == 75
        for j, c in enumerate(ep.classes):
            assert (targets[ep.support[j]] == c).all() and (targets[ep.query[j]] == c).all()
        assert ep.support_labels == [j for j in range(5) for _ in range(5)]
    assert len({tuple(ep.classes) for ep in eps.episodes}) > 1


def test_a_longer_file_starts_with_the_shorter_one(dataset):
    short = generate_episodes(dataset, EpisodeConfig(n_episodes=5, seed=1))
    long = generate_episodes(dataset, EpisodeConfig(n_episodes=12, seed=1))
    assert long.episodes[:5] == short.episodes


def test_round_trip_and_dataset_check(dataset, tmp_path):
    eps = generate_episodes(dataset, EpisodeConfig(n_episodes=4))
    path = save_episodes(eps, tmp_path / "e.json")
    loaded = load_episodes(path, dataset=dataset)
    assert loaded.episodes == eps.episodes and loaded.sha256 == eps.sha256
    assert loaded.class_names(loaded.episodes[0]) == [f"class {c}" for c in eps.episodes[0].classes]


def test_edited_file_fails_the_hash_check(dataset, tmp_path):
    path = save_episodes(generate_episodes(dataset, EpisodeConfig(n_episodes=3)), tmp_path / "e.json")
    raw = json.loads(path.read_text())
    raw["episodes"][0]["query"][0][0] = raw["episodes"][0]["support"][0][0]
    path.write_text(json.dumps(raw))
    with pytest.raises(EpisodeError, match=r"e.json: content hash .* does not match"):
        load_episodes(path)


def test_episodes_of_another_dataset_are_refused(dataset, tmp_path):
    path = save_episodes(generate_episodes(dataset, EpisodeConfig(n_episodes=3)), tmp_path / "e.json")
    other = LabelsOnly([30, 25, 40, 20, 22, 35, 51])
    with pytest.raises(EpisodeError, match="Image ids would point at other images"):
        load_episodes(path, dataset=other)


def test_too_few_images_is_an_error_naming_the_class():
    ds = LabelsOnly([30, 10, 30, 30, 30, 30])
    with pytest.raises(EpisodeError, match=r"'class 1' \(10\).*--short-class-policy"):
        generate_episodes(ds, EpisodeConfig(n_way=5, k_shot=1, n_query=15, n_episodes=2))


def test_skip_policy_leaves_short_classes_out_and_records_them():
    ds = LabelsOnly([30, 10, 30, 30, 30, 30])
    eps = generate_episodes(ds, EpisodeConfig(5, 1, 15, 10, short_class_policy="skip"))
    assert all(1 not in ep.classes for ep in eps.episodes)
    assert eps.short_classes == ["class 1"] and eps.content()["config"]["short_class_policy"] == "skip"


def test_cycle_policy_repeats_queries_but_never_support():
    ds = LabelsOnly([6, 6, 6, 6, 6])
    eps = generate_episodes(ds, EpisodeConfig(5, 1, 15, 3, short_class_policy="cycle"))
    for ep in eps.episodes:
        for s, q in zip(ep.support, ep.query):
            assert len(q) == 15 and len(set(q)) == 5 and not set(s) & set(q)
    assert eps.short_classes == [f"class {c}" for c in range(5)]


def test_n_way_larger_than_the_classes():
    with pytest.raises(EpisodeError, match=r"ways = 8 but only 7"):
        generate_episodes(LabelsOnly([30] * 7), EpisodeConfig(n_way=8, n_episodes=1))


@pytest.mark.parametrize("field, value", [("k_shot", 0), ("n_query", -1), ("n_way", 1), ("short_class_policy", "x")])
def test_invalid_settings(field, value):
    config = EpisodeConfig(**{field: value})
    with pytest.raises(EpisodeError, match=field):
        generate_episodes(LabelsOnly([30] * 7), config)


def test_cli_writes_a_verified_file(eurosat_root, tmp_path, capsys):
    out = tmp_path / "eurosat_5w1s.json"
    argv = ["--dataset", "eurosat", "--data-root", str(eurosat_root), "--shots", "1", "--queries", "2",
            "--episodes", "3", "--out", str(out)]
    assert main(argv) == 0
    assert "sha256" in capsys.readouterr().out
    from cdfsl_core.data import load_dataset

    assert len(load_episodes(out, dataset=load_dataset("eurosat", eurosat_root))) == 3
