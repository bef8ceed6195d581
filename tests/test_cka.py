"""CKA properties with exact expected values."""

from __future__ import annotations

import warnings

import pytest
import torch

from analysis.cka import CKAAccumulator, cka, domain_cka, gram, hsic


def _x(n=60, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_a_representation_against_itself_is_one(kernel, estimator):
    assert cka(_x(), _x(), kernel, estimator) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_invariant_to_rotation_and_isotropic_scaling(kernel):
    x, y = _x(), _x(seed=1) + 0.5 * _x()
    q, _ = torch.linalg.qr(_x(8, 8, seed=3))
    base = cka(x, y, kernel)
    assert cka(x @ q * 3.7, y, kernel) == pytest.approx(base, abs=1e-9)


def test_debiased_cka_of_independent_data_is_near_zero_while_biased_is_not():
    x, y = _x(200, 300, seed=4), _x(200, 300, seed=5)  # n < d: biased is inflated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert abs(cka(x, y, "linear", "debiased")) < 0.05
        assert cka(x, y, "linear", "biased") > 0.3


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_streaming_with_one_batch_equals_the_plain_reference(kernel, estimator):
    x, y = _x(), torch.tanh(_x(seed=2) + _x())
    acc = CKAAccumulator(kernel, estimator)
    acc.update(x, y)
    assert acc.value() == pytest.approx(cka(x, y, kernel, estimator), abs=1e-6)


def test_linear_biased_hsic_matches_the_feature_space_formula():
    x, y = _x(), _x(seed=7)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).pow(2).sum() / (len(x) - 1) ** 2
    assert float(hsic(gram(x), gram(y))) == pytest.approx(float(expected), rel=1e-9)


def test_streaming_sums_hsic_terms_not_per_batch_cka():
    x, y = _x(120), torch.tanh(_x(120, seed=2) + _x(120))
    acc = CKAAccumulator("linear", "debiased")
    for start in range(0, 120, 40):
        acc.update(x[start:start + 40], y[start:start + 40])
    sums = [0.0, 0.0, 0.0]
    for start in range(0, 120, 40):
        k, l = gram(x[start:start + 40]), gram(y[start:start + 40])
        for i, v in enumerate((hsic(k, l, "debiased"), hsic(k, k, "debiased"), hsic(l, l, "debiased"))):
            sums[i] += float(v)
    assert acc.value() == pytest.approx(sums[0] / (sums[1] * sums[2]) ** 0.5, abs=1e-12)


def test_debiased_hsic_is_the_u_statistic_written_out_with_loops():
    """HSIC_u = (n)_2^-1 sum_{i!=j} k_ij l_ij + (n)_4^-1 sum_{i,j,q,r distinct} k_ij l_qr
    - 2 (n)_3^-1 sum_{i,j,q distinct} k_ij l_iq (the U-statistic of Song et al. 2012)."""
    from itertools import permutations

    n = 7
    k, l = gram(_x(n, 3, seed=11)), gram(torch.tanh(_x(n, 3, seed=12)), "rbf")
    two = sum(float(k[i, j] * l[i, j]) for i, j in permutations(range(n), 2)) / (n * (n - 1))
    three = sum(float(k[i, j] * l[i, q]) for i, j, q in permutations(range(n), 3)) / (n * (n - 1) * (n - 2))
    four = sum(float(k[i, j] * l[q, r]) for i, j, q, r in permutations(range(n), 4)) / (n * (n - 1) * (n - 2) * (n - 3))
    assert float(hsic(k, l, "debiased")) == pytest.approx(two + four - 2 * three, rel=1e-9)


def test_random_pairing_cka_has_its_predicted_value_and_no_information():
    """Source and target unpaired: averaged over random pairings of all n images, biased linear CKA
    is tr(Kc) tr(Lc) / ((n - 1) ||Kc|| ||Lc||) = sqrt(PR_s PR_t) / (n - 1), whatever relates the two
    sets (derived: E over permutations of tr(Kc P Lc P^T)); debiased CKA averages to about 0."""
    n = 40
    source = _x(n, 6, seed=20) * torch.tensor([3.0, 2, 1, 1, 0.5, 0.5], dtype=torch.float64)
    same = source + 0.01 * _x(n, 6, seed=21)  # nearly the same images, in another order below
    shifted = _x(n, 6, seed=22) * torch.tensor([0.5, 0.5, 1, 1, 2, 3], dtype=torch.float64) + 4.0

    def predicted(a, b):
        ac, bc = a - a.mean(0), b - b.mean(0)
        kc, lc = ac @ ac.T, bc @ bc.T
        return float(torch.trace(kc) * torch.trace(lc) / ((n - 1) * kc.norm() * lc.norm()))

    for target in (same[torch.randperm(n, generator=torch.Generator().manual_seed(0))], shifted):
        biased = domain_cka(source, target, "linear", "biased", pairings=400, seed=1)
        assert biased["cka_mean"] == pytest.approx(predicted(source, target), rel=0.05)
        debiased = domain_cka(source, target, "linear", "debiased", pairings=400, seed=1)
        assert abs(debiased["cka_mean"]) < 0.02


def test_bad_input():
    with pytest.raises(ValueError, match="kernel='cosine'"):
        cka(_x(), _x(), kernel="cosine")
    with pytest.raises(ValueError, match="estimator='unbiased'"):
        CKAAccumulator("linear", "unbiased")
    with pytest.raises(ValueError, match="at least 4 examples.*n = 3"):
        cka(_x(3), _x(3), estimator="debiased")
    bad = _x()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="x holds NaN"):
        cka(bad, _x())
    with pytest.raises(ValueError, match="60 rows, y has 59"):
        cka(_x(), _x(59))


def test_warns_when_samples_are_few_for_the_dimension():
    acc = CKAAccumulator()
    acc.update(_x(20, 50), _x(20, 50, seed=1))
    with pytest.warns(UserWarning, match="n < d"):
        acc.value()


def test_layer_features_match_the_recorder_and_the_command_writes_its_outputs(tmp_path, capsys):
    from analysis.cka import layer_features, main
    from cdfsl_core.models import load_clip

    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    images = torch.randn(5, 3, 32, 32)
    feats = layer_features(bundle.model, images=images, batch_size=2)
    with torch.no_grad():
        native = bundle.model.visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True)
    assert torch.allclose(feats[1], native["image_intermediates_prefix"][1][:, 0], atol=1e-6)
    pooled = layer_features(bundle.model, images=images, pool="mean")[0]
    assert torch.allclose(pooled, native["image_intermediates"][0].mean(dim=1), atol=1e-6)
    argv = ["--model", "cdfsl-test-vit", "--pretrained", str(_save_tiny(bundle, tmp_path)), "--source", "synthetic",
            "--target", "synthetic-xray", "--images", "12", "--pairings", "3", "--device", "cpu",
            "--out", str(tmp_path / "cka")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cka_mean" in out and "noise_floor_mean" in out
    for suffix in ("csv", "json", "png", "pdf"):
        assert (tmp_path / "cka" / f"cka_synthetic_synthetic-xray.{suffix}").exists()


def _save_tiny(bundle, tmp_path):
    from cdfsl_core.models import save_checkpoint

    return save_checkpoint(bundle.model, tmp_path / "tiny.safetensors")
