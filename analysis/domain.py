"""Domain similarity between unpaired sets of image features, with references and nulls.

Source and target images are different images, so CKA's sample pairing does not exist: under
random pairings debiased CKA has expectation 0 and biased CKA ``sqrt(PR_s PR_t) / (n - 1)``
(PR = (tr C)^2 / ||C||_F^2, a domain's effective rank), which depends on each domain alone. The
estimators here compare two *sets* (``list_domain_estimators()`` says what each sees and misses):

================== ================================================================ ==========
name               value                                                            similar is
================== ================================================================ ==========
feature-cka        cosine of the two covariance matrices <C_s, C_t>_F / (|C_s| |C_t|)  high (1)
                   after standardising every channel with the pooled mean and std
mmd                unbiased MMD^2, Gaussian kernel, bandwidth = median pairwise          low (0)
                   distance of the pooled sample; permutation p-value
mean-shift         |mu_s - mu_t|^2 / (tr C_s + tr C_t)                                   low (0)
frechet            |mu_s - mu_t|^2 + tr(C_s + C_t - 2 (C_s^1/2 C_t C_s^1/2)^1/2)          low (0)
random-pairing-cka biased linear CKA of randomly paired images, mean over pairings: a    (none)
                   labelled negative control, printed beside its predicted value
================== ================================================================ ==========

:func:`domain_estimate` is one number for two feature matrices. :func:`domain_table` adds,
per layer and beside every target, the references computed the same way on the same number of
images n (every target subsampled to the smallest, fixed seed): two random halves of the source
(the noise floor), two class-disjoint halves of the source (the right baseline: every target has
other classes), a permutation null (source and target images pooled and split at random), and
bootstrap intervals. Costs: feature-cka, mean-shift and random-pairing-cka are O(n d min(n, d)),
frechet O(n d^2 + d^3), mmd O(n^2 d) (a kernel between all pairs is what it is).

Shapes: ``source`` [n_s, d] and ``target`` [n_t, d], tensors or arrays; n_s and n_t may differ.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cdfsl_core.errors import ConfigError
from cdfsl_core.stats import median_gaussian_kernel

__all__ = ["COMPARISONS", "DEFAULT_ESTIMATOR", "DomainEstimator", "DomainPlan", "compare_domains", "domain_estimate", "domain_table",
           "list_domain_estimators", "plan_comparisons", "random_pairing_prediction", "register_domain_estimator"]

COMPARISONS = ("target", "within-source", "class-disjoint", "permutation-null")  # not a bare "null": pandas reads it as missing
# Chosen by measurement on the embedded world (docs/concepts/diagnostics.md, Domain similarity): it ranks the four
# targets in the order of their zero-shot accuracy at every block, puts the most of them outside
# the class-disjoint band, sees any kind of difference and comes with a permutation p-value.
DEFAULT_ESTIMATOR = "mmd"
MIN_IMAGES = 4


class _Pool:
    """The images of one comparison, [N, d] float64, with the Gaussian kernel computed once."""

    def __init__(self, features: torch.Tensor) -> None:
        self.x = features
        self._kernel: torch.Tensor | None = None

    def kernel(self) -> torch.Tensor:
        if self._kernel is None:
            self._kernel = median_gaussian_kernel(self.x)[0]
        return self._kernel


Value = Callable[[_Pool, torch.Tensor, torch.Tensor, torch.Generator], float]


@dataclass(frozen=True)
class DomainEstimator:
    """A comparison of two sets of rows of a pool: ``value(pool, a, b, generator)``."""

    name: str
    value: Value
    sees: str  # one line: what a difference in it means
    blind_to: str  # one line: what it cannot see
    higher_is_similar: bool | None  # None: no direction (the negative control)
    resample: bool = True  # bootstrap intervals and a permutation null (False: its own spread)


_ESTIMATORS: dict[str, DomainEstimator] = {}


def register_domain_estimator(estimator: DomainEstimator) -> None:
    """Make ``estimator.name`` available to :func:`domain_estimate`, the tables and the command."""
    _ESTIMATORS[estimator.name] = estimator


def list_domain_estimators() -> dict[str, str]:
    """Every estimator by name, with one line on what it sees and what it is blind to."""
    return {name: f"sees {e.sees}; blind to {e.blind_to}" for name, e in _ESTIMATORS.items()}


def _estimator(name: str) -> DomainEstimator:
    if name not in _ESTIMATORS:
        raise ConfigError(f"unknown domain estimator {name!r}; expected one of {sorted(_ESTIMATORS)} "
                          "(list_domain_estimators() says what each sees).")
    return _ESTIMATORS[name]


# --------------------------------------------------------------------------- the estimators
def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=0)


def _cov_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<A^T A, B^T B>_F for centred a [n_a, d], b [n_b, d], via whichever product is smaller."""
    if a.shape[1] <= max(len(a), len(b)):
        return ((a.T @ a) * (b.T @ b)).sum()
    return (a @ b.T).pow(2).sum()  # tr(A^T A B^T B) = |A B^T|_F^2


def _feature_cka(pool: _Pool, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator,
                 standardize: bool = True) -> float:
    xa, xb = pool.x[a], pool.x[b]
    if standardize:
        both = torch.cat([xa, xb])
        mean, std = both.mean(dim=0), both.std(dim=0, unbiased=False)
        scale = torch.where(std > 1e-12 * std.max().clamp_min(1e-300), std, torch.ones_like(std))
        xa, xb = (xa - mean) / scale, (xb - mean) / scale
    xa, xb = _centred(xa), _centred(xb)
    return float(_cov_inner(xa, xb) / (_cov_inner(xa, xa).sqrt() * _cov_inner(xb, xb).sqrt()))


def _mmd(pool: _Pool, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> float:
    kernel = pool.kernel()

    def within(index: torch.Tensor) -> torch.Tensor:
        distinct = index.unsqueeze(0) != index.unsqueeze(1)  # a U-statistic: no pair of one image with itself
        return (kernel[index][:, index] * distinct).sum() / distinct.sum()

    return float(within(a) + within(b) - 2 * kernel[a][:, b].mean())


def _mean_shift(pool: _Pool, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> float:
    xa, xb = pool.x[a], pool.x[b]
    shift = (xa.mean(dim=0) - xb.mean(dim=0)).pow(2).sum()
    return float(shift / (xa.var(dim=0).sum() + xb.var(dim=0).sum()))


def _frechet(pool: _Pool, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> float:
    xa, xb = pool.x[a], pool.x[b]
    ca, cb = torch.cov(xa.T).reshape(xa.shape[1], -1), torch.cov(xb.T).reshape(xb.shape[1], -1)
    values, vectors = torch.linalg.eigh(ca)
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T  # C_a^(1/2)
    cross = torch.linalg.eigvalsh(root @ cb @ root).clamp_min(0).sqrt().sum()  # tr (C_a^1/2 C_b C_a^1/2)^1/2
    shift = (xa.mean(dim=0) - xb.mean(dim=0)).pow(2).sum()
    return float(shift + torch.trace(ca) + torch.trace(cb) - 2 * cross)


def _linear_cka(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    xa, xb = _centred(xa), _centred(xb)
    return (xa.T @ xb).pow(2).sum() / (_cov_inner(xa, xa).sqrt() * _cov_inner(xb, xb).sqrt())


def _random_pairing_cka(pool: _Pool, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator,
                        pairings: int = 20) -> float:
    return float(np.mean(_random_pairing_values(pool, a, b, generator, pairings)))


def _random_pairing_values(pool: _Pool, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator,
                           pairings: int = 20) -> list[float]:
    m = min(len(a), len(b))
    values = []
    for _ in range(pairings):
        pa = a[torch.randperm(len(a), generator=generator)[:m]]
        pb = b[torch.randperm(len(b), generator=generator)[:m]]
        values.append(float(_linear_cka(pool.x[pa], pool.x[pb])))
    return values


def random_pairing_prediction(source: Any, target: Any) -> float:
    """What biased linear CKA of randomly paired images averages to: tr(C_s) tr(C_t) /
    ((m - 1) |C_s|_F |C_t|_F) = sqrt(PR_s PR_t) / (m - 1), m = min(n_s, n_t). It depends on each
    domain alone, not on how they relate (the expectation over pairings of all m images of each)."""
    s, t = _check_pair(source, target)
    m = min(len(s), len(t))
    s, t = _centred(s), _centred(t)
    return float(s.pow(2).sum() * t.pow(2).sum() / ((m - 1) * _cov_inner(s, s).sqrt() * _cov_inner(t, t).sqrt()))


for _estimator_spec in (
    DomainEstimator("feature-cka", _feature_cka,
                    "where the variance lies (which channels vary together), each channel standardised with the "
                    "pooled mean and std so a few massive channels do not decide it",
                    "a pure mean shift, and any difference that keeps the covariance", True),
    DomainEstimator("mmd", _mmd, "any difference between the two distributions the Gaussian kernel resolves "
                    "(means, spreads, shapes), with a permutation p-value",
                    "differences far below or above the median pairwise distance (the bandwidth)", False),
    DomainEstimator("mean-shift", _mean_shift, "how much of the difference is a shift of the mean, relative "
                    "to the spread", "any change of covariance or shape with the same mean", False),
    DomainEstimator("frechet", _frechet, "means and covariances together (a Gaussian fit of each domain), in "
                    "squared feature units", "anything beyond the first two moments; unreliable unless n >> d",
                    False),
    DomainEstimator("random-pairing-cka", _random_pairing_cka, "nothing about how the domains relate (negative "
                    "control): each domain's effective rank, sqrt(PR_s PR_t) / (n - 1)",
                    "the shift itself, by construction", None, resample=False),
):
    register_domain_estimator(_estimator_spec)


# --------------------------------------------------------------------------- inputs
def _matrix(x: Any, name: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach()
    if x.ndim != 2:
        raise ConfigError(f"{name} features have shape {tuple(x.shape)}; expected [images, width].")
    x = x.double().cpu()
    if not torch.isfinite(x).all():
        raise ConfigError(f"{name} features hold {int((~torch.isfinite(x)).sum())} NaN or infinite values; check the "
                          "model's outputs (a diverged run? fp16 overflow?) before comparing domains.")
    if len(x) < MIN_IMAGES:
        raise ConfigError(f"{name} has {len(x)} images; domain similarity needs at least {MIN_IMAGES} per side. "
                          "Use more images.")
    return x


def _check_pair(source: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    s, t = _matrix(source, "source"), _matrix(target, "target")
    if s.shape[1] != t.shape[1]:
        raise ConfigError(f"source features have width {s.shape[1]}, target {t.shape[1]}: compare the same layer "
                          "of the same model.")
    return s, t


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(1)[0]))


def domain_estimate(source: Any, target: Any, estimator: str = DEFAULT_ESTIMATOR, seed: int = 0,
                      **options: Any) -> float:
    """One estimator's value for two feature matrices, source [n_s, d] and target [n_t, d].
    ``options`` go to the estimator: ``standardize=False`` for feature-cka (the plain covariance
    cosine, invariant to a common rotation of both domains), ``pairings=`` for random-pairing-cka."""
    spec = _estimator(estimator)
    s, t = _check_pair(source, target)
    pool = _Pool(torch.cat([s, t]))
    a, b = torch.arange(len(s)), len(s) + torch.arange(len(t))
    if estimator == "frechet" and min(len(s), len(t)) < s.shape[1]:
        warnings.warn(f"frechet on {min(len(s), len(t))} images of width {s.shape[1]}: the covariances are "
                      "rank-deficient (it needs n >> d); prefer feature-cka or mmd.", stacklevel=2)
    return spec.value(pool, a, b, _generator(seed), **options)


# --------------------------------------------------------------------------- references and tables
@dataclass(frozen=True)
class DomainPlan:
    """Which images every comparison uses, drawn once (seeded) and applied at every layer."""

    n: int  # images per side of every comparison
    source_sample: np.ndarray  # n source images compared with each target
    halves: tuple[np.ndarray, np.ndarray]  # two disjoint random halves of the source
    class_halves: tuple[np.ndarray, np.ndarray]  # n images of each of two class-disjoint groups
    class_groups: tuple[list[int], list[int]]  # the source classes of each group
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # n images of each target


def plan_comparisons(source_labels: Sequence[int], target_sizes: Mapping[str, int], n: int | None = None,
                     seed: int = 0) -> DomainPlan:
    """The same n for every comparison: the smallest target, half the source, and each class-disjoint
    group, capped at ``n``; every draw from ``seed``."""
    labels = np.asarray(source_labels)
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    if len(classes) < 2:
        raise ConfigError(f"the source has {len(classes)} class(es); the class-disjoint reference needs at least 2.")
    groups = (sorted(classes[: len(classes) // 2].tolist()), sorted(classes[len(classes) // 2:].tolist()))
    members = [np.flatnonzero(np.isin(labels, group)) for group in groups]
    limits = {"half of the source": len(labels) // 2, "class group A": len(members[0]), "class group B": len(members[1]),
              **{f"target {name}": size for name, size in target_sizes.items()}}
    size = min(limits.values()) if n is None else min(n, *limits.values())
    if size < MIN_IMAGES:
        short = ", ".join(f"{k}: {v}" for k, v in limits.items() if v < MIN_IMAGES) or f"n={n}"
        raise ConfigError(f"domain similarity needs at least {MIN_IMAGES} images per side of every comparison (the "
                          f"source split in halves, each class-disjoint half, each target); too few here ({short}). "
                          "Use more images per domain.")
    halves = rng.permutation(len(labels))
    return DomainPlan(
        n=size,
        source_sample=np.sort(rng.choice(len(labels), size, replace=False)),
        halves=(np.sort(halves[:size]), np.sort(halves[size:2 * size])),
        class_halves=(np.sort(rng.choice(members[0], size, replace=False)),
                      np.sort(rng.choice(members[1], size, replace=False))),
        class_groups=groups,
        targets={name: np.sort(rng.choice(count, size, replace=False)) for name, count in target_sizes.items()},
    )


def _interval(values: Sequence[float]) -> tuple[float, float]:
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _compare(spec: DomainEstimator, pool: _Pool, a: torch.Tensor, b: torch.Tensor, bootstrap: int, key: tuple,
             pairings: int) -> dict[str, float]:
    """The value and its interval: bootstrap percentiles, or for the negative control the spread over pairings."""
    generator = _generator(*key)
    if not spec.resample:
        values = _random_pairing_values(pool, a, b, generator, pairings)
        low, high = _interval(values)
        return {"value": float(np.mean(values)), "ci_low": low, "ci_high": high}
    value = spec.value(pool, a, b, generator)
    draws = [spec.value(pool, a[torch.randint(len(a), (len(a),), generator=generator)],
                        b[torch.randint(len(b), (len(b),), generator=generator)], generator) for _ in range(bootstrap)]
    low, high = _interval(draws) if draws else (np.nan, np.nan)
    return {"value": value, "ci_low": low, "ci_high": high}


def _null(spec: DomainEstimator, pool: _Pool, a: torch.Tensor, b: torch.Tensor, observed: float, permutations: int,
          key: tuple) -> dict[str, float]:
    """The permutation null: both sets pooled and split at random; its mean, 95% band, and the p-value of the
    observed value in the direction of a difference."""
    generator = _generator(*key)
    joined = torch.cat([a, b])
    values = []
    for _ in range(permutations):
        order = joined[torch.randperm(len(joined), generator=generator)]
        values.append(spec.value(pool, order[:len(a)], order[len(a):], generator))
    low, high = _interval(values)
    further = [v <= observed for v in values] if spec.higher_is_similar else [v >= observed for v in values]
    return {"value": float(np.mean(values)), "ci_low": low, "ci_high": high,
            "p_value": (1 + sum(further)) / (1 + permutations)}


def domain_table(source: Mapping[int, Any], targets: Mapping[str, Mapping[int, Any]], source_labels: Sequence[int],
                 estimators: Sequence[str] = (DEFAULT_ESTIMATOR,), n: int | None = None, bootstrap: int = 50,
                 permutations: int = 100, pairings: int = 20, seed: int = 0, progress: bool = False,
                 labels: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Per layer and estimator: every target's similarity to the source beside the references.

    ``source`` and each of ``targets`` map a layer to features [images, width] (all images of the
    domain; :func:`plan_comparisons` draws the same n of each); ``source_labels`` are the source
    images' classes (for the class-disjoint halves). One row per (estimator, layer, comparison,
    target) with ``value``, ``ci_low``, ``ci_high`` (bootstrap percentiles; for the null its 95%
    band; for the negative control the spread over pairings), ``p_value`` (target rows: the
    permutation test against the null), ``predicted`` (random-pairing-cka) and ``n``; ``labels``
    (source, model, pool, ...) become columns.
    """
    from tqdm import tqdm

    specs = [_estimator(name) for name in estimators]
    layers = sorted(source)
    for name, features in targets.items():
        missing = sorted(set(layers) - set(features))
        if missing:
            raise ConfigError(f"target {name!r} has no features for layers {missing}.")
    if len(source_labels) != len(source[layers[0]]):
        raise ConfigError(f"{len(source_labels)} source labels for {len(source[layers[0]])} source images.")
    plan = plan_comparisons(source_labels, {name: len(f[layers[0]]) for name, f in targets.items()}, n, seed)
    rows = []
    steps = tqdm(total=len(layers) * (len(targets) + 1), desc="domain similarity per layer", disable=not progress,
                 leave=False)
    for layer in layers:
        src = _matrix(source[layer], f"source (layer {layer})")
        base = {**(labels or {}), "layer": layer, "n": plan.n}
        references = {"within-source": plan.halves, "class-disjoint": plan.class_halves}
        for comparison, (first, second) in references.items():
            pool = _Pool(src[np.concatenate([first, second])])
            a, b = torch.arange(plan.n), plan.n + torch.arange(plan.n)
            for k, spec in enumerate(specs):
                result = _compare(spec, pool, a, b, bootstrap, (seed, layer, k, COMPARISONS.index(comparison)), pairings)
                rows.append({**base, "estimator": spec.name, "comparison": comparison, "target": None, **result})
        steps.update()
        for t, (name, features) in enumerate(targets.items()):
            tgt = _matrix(features[layer], f"target {name} (layer {layer})")
            if tgt.shape[1] != src.shape[1]:
                raise ConfigError(f"target {name!r} has width {tgt.shape[1]} at layer {layer}, the source "
                                  f"{src.shape[1]}: compare the same layer of the same model.")
            pool = _Pool(torch.cat([src[plan.source_sample], tgt[plan.targets[name]]]))
            a, b = torch.arange(plan.n), plan.n + torch.arange(plan.n)
            for k, spec in enumerate(specs):
                result = _compare(spec, pool, a, b, bootstrap, (seed, layer, k, 0, t), pairings)
                row = {**base, "estimator": spec.name, "comparison": "target", "target": name, **result}
                if spec.resample:
                    null = _null(spec, pool, a, b, result["value"], permutations, (seed, layer, k, 3, t))
                    row["p_value"] = null.pop("p_value")
                    rows.append(row)
                    rows.append({**base, "estimator": spec.name, "comparison": "permutation-null", "target": name, **null})
                else:
                    row["predicted"] = random_pairing_prediction(pool.x[a], pool.x[b])
                    rows.append(row)
            steps.update()
    steps.close()
    table = pd.DataFrame(rows)
    for column in ("p_value", "predicted"):
        if column not in table:
            table[column] = np.nan
    table["higher_is_similar"] = table["estimator"].map({s.name: s.higher_is_similar for s in specs})
    return table


def compare_domains(model: Any, source_dataset: Any, target_datasets: Mapping[str, Any], transform: Any, images: int = 500,
                    pool: str = "cls", estimators: Sequence[str] = (DEFAULT_ESTIMATOR,), layers: Sequence[int] | None = None,
                    bootstrap: int = 50, permutations: int = 100, pairings: int = 20, seed: int = 0,
                    progress: bool = False, bundle: Any = None, labels: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """:func:`domain_table` for datasets: ``images`` images of the source and of each target (drawn
    from ``seed``) through ``model`` (a CLIP, a vision tower or a FewShotCLIP), pooled per layer.
    ``pool='mean-no-simple'`` computes each domain's Sum scores against its own class names (needs
    ``bundle`` for the text tower) and adds the mean number of tokens it left out per image
    (``excluded_tokens``)."""
    from analysis.features import class_readout, sample_indices, sample_layer_features
    from analysis.poolings import pooling

    spec = pooling(pool)
    for name in estimators:
        _estimator(name)
    if spec.needs_text and bundle is None:
        raise ConfigError(f"pool={pool!r} needs the bundle (for the class text features): compare_domains(..., bundle=...).")

    def features(dataset: Any) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
        text = class_readout(bundle, dataset.classes) if spec.needs_text else None
        excluded: dict[int, float] = {}
        result = sample_layer_features(model, dataset, images, transform, seed, pool, progress, text, layers, excluded)
        return result, excluded

    source_features, excluded = features(source_dataset)
    source_labels = [source_dataset.targets[i] for i in sample_indices(len(source_dataset), images, seed)]
    target_features, target_excluded = {}, {}
    for name, dataset in target_datasets.items():
        target_features[name], target_excluded[name] = features(dataset)
    table = domain_table(source_features, target_features, source_labels, estimators, None, bootstrap, permutations,
                         pairings, seed, progress, {**(labels or {}), "pool": pool})
    if pool == "mean-no-simple":
        table["excluded_tokens_source"] = table["layer"].map(excluded)
        table["excluded_tokens_target"] = [target_excluded[t][layer] if isinstance(t, str) else np.nan
                                           for t, layer in zip(table["target"], table["layer"])]
    return table
