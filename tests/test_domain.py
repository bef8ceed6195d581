"""Domain similarity for unpaired sets: closed forms, invariances, references, the embedded world,
the command on real layouts, and bad input."""

from __future__ import annotations

import csv
from itertools import permutations as ordered_pairs

import pandas as pd
import pytest
import torch

from analysis.domain import (
    domain_estimate,
    domain_table,
    list_domain_estimators,
    plan_comparisons,
    random_pairing_prediction,
)
from cdfsl_core.errors import ConfigError
from cdfsl_core.stats import median_gaussian_kernel


def _gaussian(n: int, covariance: torch.Tensor, mean: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    factor = torch.linalg.cholesky(covariance)
    x = torch.randn(n, len(covariance), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ factor.T
    return x + (mean if mean is not None else 0)


def _correlation(d: int = 6) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = a @ a.T + d * torch.eye(d, dtype=torch.float64)
    scale = c.diagonal().rsqrt()
    return c * scale[:, None] * scale[None, :]  # unit diagonal


def test_every_estimator_is_listed_with_what_it_sees_and_misses():
    listed = list_domain_estimators()
    assert set(listed) == {"feature-cka", "mmd", "mean-shift", "frechet", "random-pairing-cka"}
    assert all("sees" in line and "blind to" in line for line in listed.values())


# --------------------------------------------------------------------------- closed forms
def test_feature_cka_is_the_cosine_of_the_two_covariances():
    # C with unit diagonal and a permutation P: the pooled per-channel std is 1, so standardising
    # changes nothing and the value is <C, P C P^T> / |C|^2
    c = _correlation()
    p = torch.eye(6, dtype=torch.float64)[[3, 0, 5, 1, 4, 2]]
    expected = float((c * (p @ c @ p.T)).sum() / (c * c).sum())
    source, target = _gaussian(20000, c, seed=2), _gaussian(20000, p @ c @ p.T, seed=3)
    assert domain_estimate(source, target, "feature-cka") == pytest.approx(expected, abs=0.01)
    # and for a rotation R without standardisation: <C, R C R^T> / (|C| |R C R^T|)
    r, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    rotated = _gaussian(20000, r @ c @ r.T, seed=5)
    expected = float((c * (r @ c @ r.T)).sum() / (c.norm() * (r @ c @ r.T).norm()))
    assert domain_estimate(source, rotated, "feature-cka", standardize=False) == pytest.approx(expected, abs=0.01)


def test_feature_cka_invariances_and_its_blindness_to_a_mean_shift():
    source = _gaussian(300, _correlation(), seed=6)
    target = _gaussian(250, torch.diag(torch.tensor([1.0, 2, 3, 1, 2, 3], dtype=torch.float64)), seed=7)
    base = domain_estimate(source, target, "feature-cka")
    assert domain_estimate(3.7 * source, 3.7 * target, "feature-cka") == pytest.approx(base, rel=1e-9)
    scales = torch.tensor([0.1, 5.0, 1.0, 30.0, 2.0, 0.7], dtype=torch.float64)
    assert domain_estimate(source * scales, target * scales, "feature-cka") == pytest.approx(base, rel=1e-9)
    r, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    plain = domain_estimate(source, target, "feature-cka", standardize=False)
    assert domain_estimate(source @ r, target @ r, "feature-cka", standardize=False) == pytest.approx(plain, rel=1e-9)
    assert domain_estimate(source, source + 10.0, "feature-cka") == pytest.approx(1.0, abs=1e-12)


def test_mean_shift_of_a_known_shift():
    source = _gaussian(500, _correlation(), seed=9)
    shift = torch.tensor([3.0, 0, -1, 0, 0, 2], dtype=torch.float64)
    # the same images moved by v: |v|^2 / (2 tr C)
    expected = float(shift.pow(2).sum() / (2 * source.var(dim=0).sum()))
    assert domain_estimate(source, source + shift, "mean-shift") == pytest.approx(expected, rel=1e-9)
    # independent samples of N(0, I) and N(2 e_1, I) in 4 dimensions: 4 / (2 x 4) = 0.5
    eye = torch.eye(4, dtype=torch.float64)
    value = domain_estimate(_gaussian(20000, eye, seed=10), _gaussian(20000, eye, torch.tensor([2.0, 0, 0, 0]), seed=11),
                              "mean-shift")
    assert value == pytest.approx(0.5, abs=0.01)


def test_frechet_of_two_known_gaussians():
    # diagonal covariances: |mu_1 - mu_2|^2 + sum_i (sigma_1i - sigma_2i)^2 = 1 + (1 + 0 + 1) = 3
    first = _gaussian(40000, torch.diag(torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64)), seed=12)
    second = _gaussian(40000, torch.diag(torch.tensor([4.0, 4.0, 0.0 + 1e-12], dtype=torch.float64)),
                       torch.tensor([0.0, 1.0, 0.0]), seed=13)
    assert domain_estimate(first, second, "frechet") == pytest.approx(3.0, abs=0.05)


def test_unbiased_mmd_is_the_u_statistic_written_out_with_loops():
    source = _gaussian(6, torch.eye(3, dtype=torch.float64), seed=14)
    target = _gaussian(5, torch.eye(3, dtype=torch.float64), torch.tensor([1.0, 0, 0]), seed=15)
    kernel, _ = median_gaussian_kernel(torch.cat([source, target]))
    k = kernel.tolist()
    ss = sum(k[i][j] for i, j in ordered_pairs(range(6), 2)) / (6 * 5)
    tt = sum(k[6 + i][6 + j] for i, j in ordered_pairs(range(5), 2)) / (5 * 4)
    st = sum(k[i][6 + j] for i in range(6) for j in range(5)) / 30
    assert domain_estimate(source, target, "mmd") == pytest.approx(ss + tt - 2 * st, rel=1e-12)


def test_random_pairing_cka_averages_to_its_predicted_value_whatever_relates_the_domains():
    """Biased linear CKA of randomly paired images: E = tr(Kc) tr(Lc) / ((n - 1) |Kc| |Lc|) over
    pairings of all n images (derived: E over permutations of tr(Kc P Lc P^T))."""
    source = _gaussian(40, torch.diag(torch.tensor([9.0, 4, 1, 1, 0.25, 0.25], dtype=torch.float64)), seed=16)
    same = source[torch.randperm(40, generator=torch.Generator().manual_seed(0))] + 0.01 * _gaussian(
        40, torch.eye(6, dtype=torch.float64), seed=17)
    shifted = _gaussian(40, torch.diag(torch.tensor([0.25, 0.25, 1, 1, 4, 9], dtype=torch.float64)), seed=18) + 4.0
    for target in (same, shifted):
        average = domain_estimate(source, target, "random-pairing-cka", pairings=400)
        assert average == pytest.approx(random_pairing_prediction(source, target), rel=0.05)


# --------------------------------------------------------------------------- references and nulls
def _table(source, target, labels, estimators=("mmd",), **settings):
    return domain_table({0: source}, {"t": {0: target}}, labels, estimators, **{"bootstrap": 20, "permutations": 50,
                                                                              **settings})


def test_mmd_of_a_distribution_with_itself_is_near_zero_and_not_significant():
    eye = torch.eye(5, dtype=torch.float64)
    source, labels = _gaussian(400, eye, seed=19), [i % 4 for i in range(400)]
    table = _table(source, _gaussian(200, eye, seed=20), labels, permutations=100)
    target = table[table["comparison"] == "target"].iloc[0]
    assert abs(target["value"]) < 0.01 and target["p_value"] > 0.05
    assert target["ci_low"] <= 0 <= target["ci_high"]
    # the positive control: a shifted target is far from the null
    shifted = _table(source, _gaussian(200, eye, torch.full((5,), 0.5), seed=21), labels, permutations=100)
    row = shifted[shifted["comparison"] == "target"].iloc[0]
    null = shifted[shifted["comparison"] == "permutation-null"].iloc[0]
    assert row["p_value"] == pytest.approx(1 / 101) and row["value"] > null["ci_high"]


def test_every_comparison_uses_the_same_n_and_the_class_halves_share_no_class():
    labels = [i % 10 for i in range(300)]
    plan = plan_comparisons(labels, {"big": 500, "small": 90}, seed=3)
    assert plan.n == 90 and all(len(v) == 90 for v in plan.targets.values())
    assert len(plan.source_sample) == len(plan.halves[0]) == len(plan.class_halves[1]) == 90
    assert not set(plan.halves[0]) & set(plan.halves[1])
    first, second = ({labels[i] for i in half} for half in plan.class_halves)
    assert not first & second and first <= set(plan.class_groups[0]) and second <= set(plan.class_groups[1])


def test_the_table_is_tidy_with_references_beside_every_target():
    eye = torch.eye(4, dtype=torch.float64)
    source, labels = _gaussian(120, eye, seed=22), [i % 6 for i in range(120)]
    table = domain_table({0: source, 1: 2 * source}, {"a": {0: _gaussian(80, eye, seed=23), 1: _gaussian(80, eye, seed=24)},
                                                      "b": {0: _gaussian(60, eye, seed=25), 1: _gaussian(60, eye, seed=26)}},
                         labels, ("mmd", "feature-cka", "random-pairing-cka"), bootstrap=5, permutations=5,
                         labels={"model": "m"})
    assert {"estimator", "layer", "comparison", "target", "value", "ci_low", "ci_high", "p_value", "n"} <= set(table)
    assert set(table["comparison"]) == {"target", "within-source", "class-disjoint", "permutation-null"}
    assert table["n"].eq(60).all() and table["model"].eq("m").all()
    counts = table.groupby(["estimator", "comparison"]).size()
    assert counts[("mmd", "target")] == 4 and counts[("mmd", "permutation-null")] == 4 and counts[("mmd", "class-disjoint")] == 2
    control = table[(table["estimator"] == "random-pairing-cka") & (table["comparison"] == "target")]
    assert control["predicted"].notna().all() and ("random-pairing-cka", "permutation-null") not in counts


# --------------------------------------------------------------------------- the embedded world
def test_on_the_embedded_world_the_default_estimator_ranks_the_targets_by_their_accuracy():
    from analysis.domain import DEFAULT_ESTIMATOR, compare_domains
    from cdfsl_core.data import load_dataset
    from cdfsl_core.data.synthetic import SYNTHETIC_TARGETS
    from cdfsl_core.models import EMBEDDED_MODEL, load_clip
    from cdfsl_core.preprocess import protocol_transform

    bundle = load_clip(*EMBEDDED_MODEL)
    source = load_dataset("synthetic", split="test", images_per_class=8)
    targets = {name: load_dataset(name, images_per_class=60, seed=0) for name in SYNTHETIC_TARGETS}
    table = compare_domains(bundle.model, source, targets, protocol_transform(bundle, 1.15), images=300,
                            layers=[5], bootstrap=30, permutations=30)
    assert DEFAULT_ESTIMATOR == "mmd"
    rows = table[table["comparison"] == "target"].set_index("target")["value"]
    # zero-shot accuracy falls crops > satellite > lesions > xray; the distance must grow in that order
    assert list(rows.sort_values().index) == list(SYNTHETIC_TARGETS)
    band = table[table["comparison"] == "class-disjoint"].iloc[0]
    assert (rows > band["ci_high"]).sum() >= 3


def test_mean_without_simple_tokens_leaves_out_exactly_a_planted_one():
    from analysis.controls import Plant, planted
    from analysis.features import class_readout, layer_features
    from cdfsl_core.data import load_dataset
    from cdfsl_core.models import EMBEDDED_MODEL, load_clip
    from cdfsl_core.preprocess import protocol_transform

    bundle = load_clip(*EMBEDDED_MODEL)
    dataset = load_dataset("synthetic", split="test", images_per_class=1)
    transform = protocol_transform(bundle, 1.15)
    images = torch.stack([transform(dataset.load_image(i)) for i in (0, 9, 20, 41)])
    text = class_readout(bundle, dataset.classes[:5])
    excluded: dict[int, float] = {}
    with planted(bundle.model, [Plant("every-class-top", 3, token=7)], text=text):
        without = layer_features(bundle.model, images=images, layers=[3], pool="mean-no-simple", text=text,
                                 excluded=excluded)[3]
        from analysis.recorder import record
        with record(bundle.model, layers=[3], what=("resid_post",)) as cache, torch.no_grad():
            bundle.model.encode_image(images)
        patches = cache["blocks.3.resid_post"][:, 1:]
    from cdfsl_core.token_text import project_tokens, sum_score

    cosines = torch.nn.functional.normalize(project_tokens(bundle.model.visual, patches), dim=-1) @ \
        torch.nn.functional.normalize(text, dim=-1).T
    simple = sum_score(cosines, 0.3) == 5  # in the top set of all 5 classes
    assert simple[:, 7].all()  # the planted token is simple in every image
    expected = torch.stack([patches[i][~simple[i]].mean(dim=0) for i in range(len(patches))])
    assert excluded[3] == pytest.approx(float(simple.sum(dim=1).float().mean()))
    assert torch.allclose(without, expected, atol=1e-5)
    assert not torch.allclose(without, patches.mean(dim=1), atol=1e-3)


# --------------------------------------------------------------------------- the command
def _real_layouts(root):
    from helpers import write_image

    for c, wnid in enumerate(["n01532829", "n01558993", "n01704323", "n01749939"]):
        for i in range(6):
            write_image(root / "miniImageNet" / "train" / wnid / f"{wnid}_{i}.JPEG", seed=c * 10 + i, size=16)
    base = root / "chestX"
    (base / "images").mkdir(parents=True)
    findings = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax"]
    with (base / "Data_Entry_2017.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels", "Patient ID"])
        for i in range(21):
            name = f"{i:08d}_000.png"
            writer.writerow([name, findings[i % 7], i])
            write_image(base / "images" / name, seed=100 + i, size=16)


def test_the_command_on_the_real_layouts(tmp_path, capsys):
    from analysis.cka import main

    _real_layouts(tmp_path / "data")
    out = tmp_path / "domain.csv"
    assert main(["--source", "miniimagenet", "--target", "chestx", "--data-root", str(tmp_path / "data"),
                 "--images", "24", "--bootstrap", "5", "--permutations", "5", "--estimator", "all", "--device", "cpu",
                 "--out", str(out), "--figure", str(tmp_path / "domain.png")]) == 0
    printed = capsys.readouterr().out
    assert "mmd (lower = more similar; n = 12 images per side" in printed and "blind to" in printed
    assert "random-pairing-cka (no direction" in printed and "predicted" in printed
    table = pd.read_csv(out)  # read as a user would: no label may turn into a missing value
    assert {"estimator", "layer", "comparison", "target", "value", "ci_low", "ci_high"} <= set(table)
    assert set(table["comparison"]) == {"target", "within-source", "class-disjoint", "permutation-null"}
    assert set(table["target"].dropna()) == {"chestx"} and set(table["estimator"]) == set(list_domain_estimators())
    assert (tmp_path / "domain_mmd.png").exists() and (tmp_path / "domain_feature-cka.pdf").exists()


def test_the_command_keeps_paired_cka_between_two_models(tmp_path, capsys):
    from analysis.cka import main
    from cdfsl_core.models import EMBEDDED_MODEL, load_clip, save_checkpoint

    bundle = load_clip(*EMBEDDED_MODEL)
    with torch.no_grad():
        bundle.model.visual.transformer.resblocks[4].mlp.c_fc.weight.mul_(1.5)  # another model, from block 4 on
    other = save_checkpoint(bundle.model, tmp_path / "other.safetensors")
    assert main(["--compare-with", str(other), "--target", "synthetic-crops", "--images", "40", "--device", "cpu",
                 "--out", str(tmp_path / "paired.csv")]) == 0
    table = pd.read_csv(tmp_path / "paired.csv")
    debiased = table[table["estimator"] == "cka (linear, debiased)"].set_index("layer")["value"]
    assert debiased[[0, 1, 2, 3]].round(9).eq(1.0).all() and debiased[5] < 0.999  # identical up to block 3


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error():
    eye = torch.eye(3, dtype=torch.float64)
    source, target = _gaussian(50, eye, seed=30), _gaussian(40, eye, seed=31)
    with pytest.raises(ConfigError, match="target has 3 images; .* at least 4"):
        domain_estimate(source, target[:3])
    bad = source.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ConfigError, match="source features hold 1 NaN or infinite"):
        domain_estimate(bad, target)
    with pytest.raises(ConfigError, match="width 3, target 5"):
        domain_estimate(source, torch.randn(40, 5))
    with pytest.raises(ConfigError, match="unknown domain estimator 'kl'.*'mmd'"):
        domain_estimate(source, target, "kl")
    with pytest.raises(ConfigError, match="too few here .*class group B: 2"):
        plan_comparisons([0] * 48 + [1] * 2, {"t": 40})
    with pytest.raises(ConfigError, match="class-disjoint reference needs at least 2"):
        plan_comparisons([0] * 50, {"t": 40})


def test_bad_pool_and_layer_are_clear_errors(tmp_path, capsys):
    from analysis.cka import main
    from analysis.features import layer_features
    from cdfsl_core.models import load_clip

    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    with pytest.raises(ConfigError, match="pool='max'"):
        layer_features(bundle.model, images=torch.randn(2, 3, 32, 32), pool="max")
    assert main(["--layers", "9", "--images", "20", "--target", "synthetic-crops", "--device", "cpu"]) == 1
    assert "layers [9] out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--pool", "max"])
    assert "argument --pool: invalid choice: 'max'" in capsys.readouterr().err
