"""The embedded world: determinism, classes, shipped weights, retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdfsl_core.data import list_datasets, load_dataset
from cdfsl_core.data.synthetic import COLOUR_NAMES, DOMAINS, PATTERNS, SOURCE_COMBOS, TARGET_COMBOS, render
from cdfsl_core.errors import DatasetError
from cdfsl_core.models import EMBEDDED_MODEL, load_clip
from cdfsl_core.world_report import feature_similarity
from cdfsl_core.zeroshot import accuracy, image_features, text_features


def test_world_is_registered():
    assert set(DOMAINS) <= set(list_datasets())


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_same_pixels_other_seed_other_pixels(domain):
    a = load_dataset(domain, images_per_class=3, seed=5)
    b = load_dataset(domain, images_per_class=3, seed=5)
    c = load_dataset(domain, images_per_class=3, seed=6)
    assert np.array_equal(a.array(4), b.array(4))
    assert not np.array_equal(a.array(4), c.array(4))
    image, label = a[4]
    assert image.size == (64, 64) and image.mode == "RGB" and label == 1


def test_class_counts_and_names():
    counts = {d: len(load_dataset(d, images_per_class=1).classes) for d in DOMAINS}
    assert counts == {"synthetic": 64, "synthetic-crops": 12, "synthetic-satellite": 10,
                      "synthetic-lesions": 7, "synthetic-xray": 7, "synthetic-organism": 64}
    source = load_dataset("synthetic", images_per_class=2)
    assert len(source) == 128 and source.targets[:3] == [0, 0, 1]
    assert source.classes[0] == "grid red shape"
    assert all(len(name.split()) == 3 and name.endswith(" shape") for name in source.classes)


def test_target_classes_are_novel_but_use_source_words():
    source = set(SOURCE_COMBOS)
    seen_colours = {c for c, _ in SOURCE_COMBOS}
    seen_patterns = {p for _, p in SOURCE_COMBOS}
    assert seen_colours == set(range(len(COLOUR_NAMES))) and seen_patterns == set(range(len(PATTERNS)))
    all_targets = [combo for combos in TARGET_COMBOS.values() for combo in combos]
    assert len(all_targets) == len(set(all_targets)) == 36  # disjoint between targets
    assert not source & set(all_targets)
    for domain in ("synthetic-lesions", "synthetic-xray"):  # solvable by pattern alone
        assert len({s for _, s in TARGET_COMBOS[domain]}) == len(TARGET_COMBOS[domain])


def test_test_split_renders_other_images_of_the_same_classes():
    train = load_dataset("synthetic", images_per_class=2)
    test = load_dataset("synthetic", images_per_class=2, split="test")
    assert train.classes == test.classes
    assert not np.array_equal(train.array(0), test.array(0))
    assert train.fingerprint() != test.fingerprint()


def test_xray_is_grey_and_low_contrast():
    image = render("synthetic-xray", 0, 0).astype(float)
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
    assert image.std() < render("synthetic", 0, 0).astype(float).std()


def test_bad_synthetic_options():
    with pytest.raises(DatasetError, match="split='val'"):
        load_dataset("synthetic", split="val")
    with pytest.raises(DatasetError, match="images_per_class=0"):
        load_dataset("synthetic-crops", images_per_class=0)


@pytest.fixture(scope="module")
def embedded():
    return load_clip(*EMBEDDED_MODEL)


def test_shipped_weights_load_by_name_and_beat_chance_widely(embedded):
    assert embedded.info["checkpoint"].endswith("cdfsl-synth-vit_synthetic.safetensors")
    visual = embedded.model.visual
    assert len(visual.transformer.resblocks) >= 4
    assert visual.grid_size[0] * visual.grid_size[1] >= 49
    held_out = load_dataset("synthetic", split="test", images_per_class=5)  # 320 images
    logits = image_features(embedded, held_out) @ text_features(embedded, held_out.classes).T
    assert accuracy(logits, held_out.targets) > 0.5  # chance is 1/64
    assert held_out.transform is None  # the model's preprocess was used for that call only


def test_domain_similarity_is_one_for_the_same_features_and_lower_for_shifted():
    x = torch.nn.functional.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert feature_similarity(x, x) == pytest.approx(1.0)
    shifted = torch.nn.functional.normalize(y + 1.5, dim=-1)
    assert feature_similarity(x, y) > feature_similarity(x, shifted)


def test_retraining_a_few_steps_runs_and_writes_loadable_weights(tmp_path):
    from cdfsl_core.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(steps=2, images_per_class=2, batch_size=8, warmup=1)
    weights = pretrain(config, tmp_path)
    assert weights.stat().st_size < 20e6
    reloaded = load_clip(config.arch, weights)
    assert reloaded.info["checkpoint"] == str(weights)
    assert (tmp_path / "pretrain_config.json").exists()


@pytest.mark.slow
def test_zero_shot_accuracy_and_similarity_fall_with_the_designed_shift():
    from cdfsl_core.world_report import measure

    report = measure(*EMBEDDED_MODEL, episodes=30, n_similarity=300)
    assert report["source_zero_shot_accuracy"] >= 0.8
    targets = report["targets"]
    order = ["synthetic-crops", "synthetic-satellite", "synthetic-lesions", "synthetic-xray"]
    assert targets[order[0]]["zero_shot_5way_accuracy"] > targets[order[-1]]["zero_shot_5way_accuracy"]
    similarity = [targets[d]["domain_similarity"] for d in order]
    assert similarity == sorted(similarity, reverse=True)


def test_rewriting_the_model_card_keeps_its_organism_section(tmp_path):
    from cdfsl_core.world_report import ORGANISM_SECTION, write_card

    report = {"model": "cdfsl-synth-vit", "pretrained": "synthetic", "source_zero_shot_accuracy": 0.9,
              "source_classes": 64, "source_test_images": 640, "episodes": 1,
              "targets": {"synthetic-crops": {"zero_shot_5way_accuracy": 0.9, "ci95": 0.01, "domain_similarity": 0.98}}}
    card = tmp_path / "MODEL_CARD.md"
    write_card(report, card)
    first = card.read_text()
    assert ORGANISM_SECTION not in first
    card.write_text(first + f"\n{ORGANISM_SECTION}: measured\n| a | table |\n")
    write_card(report, card)
    again = card.read_text()
    assert again.startswith(first) and again.count(ORGANISM_SECTION) == 1 and again.endswith("| a | table |\n")
