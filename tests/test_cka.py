"""CKA properties with exact expected values."""

from __future__ import annotations

import warnings

import pytest
import torch

from analysis.cka import CKAAccumulator, cka, gram, hsic, hsic_linear


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


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_linear_cka_from_feature_products_equals_the_gram_formula(estimator):
    x, y = _x(50, 80, seed=13) + 2.0, torch.tanh(_x(50, 140, seed=14))  # d > n and d_x != d_y; not centred
    k, l = gram(x), gram(y)
    expected = float(hsic(k, l, estimator) / (hsic(k, k, estimator) * hsic(l, l, estimator)).sqrt())
    assert cka(x, y, "linear", estimator) == pytest.approx(expected, rel=1e-9)
    assert float(hsic_linear(x, y, estimator)) == pytest.approx(float(hsic(k, l, estimator)), rel=1e-9)


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


def test_layer_features_match_the_recorder():
    from analysis.features import layer_features
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


def test_layer_features_of_a_method_are_measured_in_eval_mode(bundle):
    """A method fresh from prepare_episode is in training mode; its LoRA dropout must not reach
    the features (the paired CKA of fine-tuning read noisy features this way)."""
    from analysis.features import layer_features
    from cdfsl_core.lora import LoRAConfig
    from cdfsl_core.methods import create_method

    method = create_method(bundle, ["a", "b", "c"], "coop+lora", "none", lora=LoRAConfig(rank=2))
    with torch.no_grad():
        for b in (b for m in method.lora.adapters for b in m.lora_B.values()):
            b.normal_(0, 0.5)
    method.train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first, second = layer_features(method, images=images), layer_features(method, images=images)
    assert all(torch.equal(first[layer], second[layer]) for layer in first)
    assert method.training  # the mode is given back
