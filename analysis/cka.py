"""Centred kernel alignment (CKA) between representations of the same examples, and the
domain-similarity command.

``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` for Gram matrices K of X and L of Y over the
same n examples (Kornblith et al. 2019). Over many images the HSIC terms of each batch are
*summed* and the ratio is taken at the end (minibatch CKA, Nguyen et al. 2021); per-batch CKA
values are never averaged.

- kernels: ``linear`` (K = X X^T) and ``rbf`` (exp(-d^2 / (2 sigma^2)), sigma = ``bandwidth`` x the
  median pairwise distance within the batch);
- estimators: ``biased`` (HSIC = tr(K H L H) / (n-1)^2) and ``debiased`` (Song et al. 2012,
  needs n >= 4 per batch). Biased CKA is high even for independent random data when n is small
  relative to the feature dimension; :func:`check_sample_size` warns then.
- the linear kernel never builds an n x n Gram matrix: both estimators come from d x d products,
  ``||Y^T X||_F^2`` and row-norm terms, in O(n d^2) (:func:`hsic_linear`); the RBF kernel
  needs the Gram matrices, O(n^2 d).

Paired use only: the same images through two models or two layers. Source and target images
are not paired; their similarity is :mod:`analysis.domain`, and this module's command,
``python -m analysis.cka --source X --target Y``, measures it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.poolings import list_poolings
from cdfsl_core.atomic import write_table
from cdfsl_core.cli import command, non_negative_int, parser, positive_int, pretrained_arg, pretrained_value
from cdfsl_core.paths import check_writable_file, check_writable_folder

DOMAIN_ESTIMATORS = ("mmd", "feature-cka", "mean-shift", "frechet", "random-pairing-cka")  # as analysis.domain
SYNTHETIC_TARGETS = ("synthetic-crops", "synthetic-satellite", "synthetic-lesions", "synthetic-xray")


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m analysis.cka", """Domain similarity per layer between a source and target domains.

Source and target images are different images, so sample-paired CKA does not apply; the
estimators of analysis.domain compare the two sets, beside two random halves of the source (the
noise floor), two class-disjoint halves (the baseline: targets have other classes) and a
permutation null, with bootstrap intervals, on the same number of images per side.
With --compare-with it measures paired CKA instead: the same target images through two models.""")
    result.add_argument("--source", default="synthetic", help="source dataset")
    result.add_argument("--target", action="append", default=None,
                        help="target dataset; repeat for several (None: the four embedded targets)")
    result.add_argument("--data-root", default=None, help="folder holding the datasets (None: $CDFSL_DATA_ROOT)")
    result.add_argument("--model", default="cdfsl-synth-vit", help="open_clip architecture, or a timm model name (vit_small_patch14_reg4_dinov2) for what needs no text")
    result.add_argument("--pretrained", type=pretrained_arg, default="synthetic",
                        help="tag, weights file, or 'none' (random weights)")
    result.add_argument("--images", type=positive_int, default=500, help="images drawn per domain (then every "
                        "comparison uses the same n: the smallest target, half the source, each class half)")
    result.add_argument("--estimator", choices=(*DOMAIN_ESTIMATORS, "all"), default="mmd",
                        help="what to print (the CSV holds it too); 'all' for every estimator")
    result.add_argument("--pool", choices=tuple(list_poolings()), default="cls",
                        help="; ".join(f"{name}: {spec.description}" for name, spec in list_poolings().items()))
    result.add_argument("--layers", type=non_negative_int, nargs="+", default=None, help="vision blocks (None: all)")
    result.add_argument("--bootstrap", type=non_negative_int, default=50, help="bootstrap draws for the intervals")
    result.add_argument("--permutations", type=non_negative_int, default=100, help="draws of the permutation null")
    result.add_argument("--pairings", type=positive_int, default=20, help="random pairings (random-pairing-cka)")
    result.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    result.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    result.add_argument("--compare-with", default=None,
                        help="paired mode: another tag or weights file of the same architecture; CKA per layer "
                             "between the two models on the same target images")
    result.add_argument("--out", type=Path, default=None, help="write the tidy table here (.csv)")
    result.add_argument("--figure", type=Path, default=None, help="also draw the figure here (.png and .pdf)")
    return result


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments answer here, before PyTorch is imported

import math  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cdfsl_core.errors import ConfigError  # noqa: E402

__all__ = ["CKAAccumulator", "ESTIMATORS", "KERNELS", "check_sample_size", "cka", "gram", "hsic", "hsic_linear"]

KERNELS = ("linear", "rbf")
ESTIMATORS = ("biased", "debiased")


def _check(kernel: str, estimator: str) -> None:
    if kernel not in KERNELS:
        raise ConfigError(f"kernel={kernel!r}; expected one of {KERNELS}.")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator={estimator!r}; expected one of {ESTIMATORS}.")


def _features(x: torch.Tensor, name: str) -> torch.Tensor:
    x = x.reshape(len(x), -1).double()
    if not torch.isfinite(x).all():
        raise ConfigError(f"{name} holds NaN or infinite values ({int((~torch.isfinite(x)).sum())} entries); "
                         "check the model's outputs (a diverged run?) before computing CKA.")
    return x


def gram(x: torch.Tensor, kernel: str = "linear", bandwidth: float = 1.0) -> torch.Tensor:
    """[n, d] -> [n, n] Gram matrix."""
    if kernel == "linear":
        return x @ x.T
    sq = torch.cdist(x, x).pow(2)
    n = len(x)
    off = sq[~torch.eye(n, dtype=torch.bool, device=x.device)]
    median = off.sqrt().median() if off.numel() else torch.tensor(1.0, dtype=x.dtype)
    sigma = bandwidth * median.clamp_min(1e-12)
    return torch.exp(-sq / (2 * sigma**2))


def hsic(k: torch.Tensor, l: torch.Tensor, estimator: str = "biased") -> torch.Tensor:
    """HSIC of two [n, n] Gram matrices."""
    n = len(k)
    if estimator == "biased":
        h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
        return torch.trace(k @ h @ l @ h) / (n - 1) ** 2
    if n < 4:
        raise ConfigError(f"debiased HSIC needs at least 4 examples per batch; got n = {n}. Use larger batches "
                         "or estimator='biased'.")
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)
    ones = torch.ones(n, dtype=k.dtype, device=k.device)
    term = torch.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * (ones @ k @ l @ ones)
    return term / (n * (n - 3))


def _frobenius_sq_of_gram(x: torch.Tensor) -> torch.Tensor:
    """||x^T x||_F^2 from two halves of the columns, x^T x = [[A^T A, A^T B], [B^T A, B^T B]]: three
    products of a quarter of the size instead of one full one (the symmetry halves the work)."""
    half = x.shape[1] // 2
    if half < 64:
        return (x.T @ x).pow(2).sum()
    a, b = x[:, :half], x[:, half:]
    return (a.T @ a).pow(2).sum() + 2 * (a.T @ b).pow(2).sum() + (b.T @ b).pow(2).sum()


def _hsic_from_products(cross: torch.Tensor, x_norms: torch.Tensor, y_norms: torch.Tensor, n: int,
                        estimator: str) -> torch.Tensor:
    """HSIC of centred features from ||Y^T X||_F^2 and the rows' squared norms."""
    if estimator == "biased":
        return cross / (n - 1) ** 2
    if n < 4:
        raise ConfigError(f"debiased HSIC needs at least 4 examples per batch; got n = {n}. Use larger batches "
                          "or estimator='biased'.")
    # centred features: sum_j x_j = 0, so K~ 1 = -|x_i|^2 and L~ 1 = -|y_i|^2
    paired = (x_norms * y_norms).sum()
    term = (cross - paired) + x_norms.sum() * y_norms.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * paired
    return term / (n * (n - 3))


def hsic_linear(x: torch.Tensor, y: torch.Tensor, estimator: str = "biased") -> torch.Tensor:
    """HSIC of the linear kernels of x [n, d_x] and y [n, d_y] from feature-space products, O(n d_x d_y),
    equal to :func:`hsic` of ``gram(x)``, ``gram(y)``.

    biased: ||Yc^T Xc||_F^2 / (n - 1)^2 with column-centred Xc, Yc. debiased (Song et al. 2012) with
    K~, L~ the Grams with zero diagonal: tr(K~L~) = ||X^T Y||_F^2 - sum_i |x_i|^2 |y_i|^2,
    1^T K~ 1 = |sum_i x_i|^2 - sum_i |x_i|^2, 1^T K~ L~ 1 = sum_i (x_i . s_x - |x_i|^2)(y_i . s_y - |y_i|^2)
    with s_x = sum_i x_i; on centred features (the estimator is translation invariant) s_x = 0."""
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    return _hsic_from_products((y.T @ x).pow(2).sum(), x.pow(2).sum(dim=1), y.pow(2).sum(dim=1), len(x), estimator)


def _hsic_terms(x: torch.Tensor, y: torch.Tensor, kernel: str, estimator: str, bandwidth: float) -> tuple:
    """HSIC(x, y), HSIC(x, x), HSIC(y, y); for the linear kernel with the products shared."""
    if kernel == "linear":
        n = len(x)
        x, y = x - x.mean(dim=0), y - y.mean(dim=0)
        x_norms, y_norms = x.pow(2).sum(dim=1), y.pow(2).sum(dim=1)
        return (_hsic_from_products((y.T @ x).pow(2).sum(), x_norms, y_norms, n, estimator),
                _hsic_from_products(_frobenius_sq_of_gram(x), x_norms, x_norms, n, estimator),
                _hsic_from_products(_frobenius_sq_of_gram(y), y_norms, y_norms, n, estimator))
    k, l = gram(x, kernel, bandwidth), gram(y, kernel, bandwidth)
    return hsic(k, l, estimator), hsic(k, k, estimator), hsic(l, l, estimator)


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", estimator: str = "biased",
        bandwidth: float = 1.0) -> float:
    """CKA of paired features x [n, ...] and y [n, ...] (linear: O(n d^2); rbf: O(n^2 d))."""
    _check(kernel, estimator)
    x, y = _features(x, "x"), _features(y, "y")
    if len(x) != len(y):
        raise ConfigError(f"CKA pairs examples: x has {len(x)} rows, y has {len(y)}.")
    xy, xx, yy = _hsic_terms(x, y, kernel, estimator, bandwidth)
    return float(xy / torch.sqrt(xx * yy))


def check_sample_size(n: int, dim: int, estimator: str) -> None:
    """Warn when biased CKA is unreliable: fewer examples than feature dimensions."""
    if estimator == "biased" and n < dim:
        warnings.warn(
            f"CKA on n = {n} examples of dimension {dim}: with n < d, biased CKA is high even for "
            "independent random data. Use more images, estimator='debiased', or compare with the "
            "permutation baseline.", stacklevel=3)


@dataclass
class CKAAccumulator:
    """Streams paired batches; ``value()`` is sum(HSIC_xy) / sqrt(sum(HSIC_xx) sum(HSIC_yy))."""

    kernel: str = "linear"
    estimator: str = "biased"
    bandwidth: float = 1.0  # rbf: sigma = bandwidth x median pairwise distance
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # xy, xx, yy
    n: int = 0
    dims: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        _check(self.kernel, self.estimator)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = _features(x, "x"), _features(y, "y")
        if len(x) != len(y):
            raise ConfigError(f"paired batches need equal rows: x has {len(x)}, y has {len(y)}.")
        for i, value in enumerate(_hsic_terms(x, y, self.kernel, self.estimator, self.bandwidth)):
            self.sums[i] += float(value)
        self.n += len(x)
        self.dims = (x.shape[1], y.shape[1])

    def value(self) -> float:
        if self.n == 0:
            raise ConfigError("no batch was added.")
        check_sample_size(self.n, max(self.dims), self.estimator)
        denominator = math.sqrt(max(self.sums[1], 0.0) * max(self.sums[2], 0.0))
        return self.sums[0] / denominator if denominator > 0 else float("nan")


def _format(value: float, low: float, high: float) -> str:
    return f"{value:.4f} [{low:.4f}, {high:.4f}]" if low == low else f"{value:.4f}"


def print_domain_table(table: pd.DataFrame, estimator: str) -> None:
    """One estimator's per-layer table: each target with its interval (and, '*', outside the
    class-disjoint band in the direction of a difference), the references and the null."""
    from analysis.domain import list_domain_estimators

    part = table[table["estimator"] == estimator]
    higher = part["higher_is_similar"].iloc[0]
    direction = {True: "higher = more similar", False: "lower = more similar", None: "no direction"}[
        None if higher != higher or higher is None else bool(higher)]
    print(f"\n{estimator} ({direction}; n = {int(part['n'].iloc[0])} images per side, pool {part['pool'].iloc[0]}): "
          f"{list_domain_estimators()[estimator]}")
    rows = []
    for layer, group in part.groupby("layer"):
        row = {"layer": layer}
        band = group[group["comparison"] == "class-disjoint"].iloc[0]
        for _, target in group[group["comparison"] == "target"].iterrows():
            outside = (target["value"] < band["ci_low"]) if higher is True else (target["value"] > band["ci_high"])
            mark = "*" if higher is not None and outside else ""
            p = f" p={target['p_value']:.3f}" if target["p_value"] == target["p_value"] else ""
            predicted = f" (predicted {target['predicted']:.4f})" if target["predicted"] == target["predicted"] else ""
            row[target["target"]] = _format(target["value"], target["ci_low"], target["ci_high"]) + p + mark + predicted
        for reference in ("within-source", "class-disjoint"):
            ref = group[group["comparison"] == reference].iloc[0]
            row[reference] = _format(ref["value"], ref["ci_low"], ref["ci_high"])
        nulls = group[group["comparison"] == "permutation-null"]
        if len(nulls):
            row["null (mean over targets)"] = f"{nulls['value'].mean():.4f}"
        rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False))
    if higher is not None:
        print("*: outside the class-disjoint band, toward a difference. [ ]: 95% bootstrap interval.")


@command
def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.cka --source miniimagenet --target chestx --data-root DIR``."""
    import os

    from analysis.domain import compare_domains
    from analysis.features import layer_features, sample_indices
    from analysis.poolings import pooling
    from cdfsl_core.data import load_dataset
    from cdfsl_core.models import load_clip, load_vision
    from cdfsl_core.preprocess import protocol_transform

    args = build_parser().parse_args(argv)
    if args.out is not None:
        check_writable_file(args.out, "--out")
    if args.figure is not None:
        check_writable_folder(args.figure.parent, "--figure")
    if (args.model, args.pretrained) == ("cdfsl-synth-vit", "synthetic"):
        print(f"model: {args.model} / {args.pretrained}, the embedded toy CLIP (the default); pass --model and "
              "--pretrained for another", file=sys.stderr)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    names = args.target or list(SYNTHETIC_TARGETS)
    targets = {name: load_dataset(name, args.data_root) for name in names}
    # what needs no class text loads the vision side alone: timm towers too (DINOv2 with registers)
    load = load_clip if pooling(args.pool).needs_text else load_vision
    bundle = load(args.model, pretrained_value(args.pretrained), device=args.device)
    transform = protocol_transform(bundle, 1.15)
    if args.compare_with is not None:
        other = load(args.model, pretrained_value(args.compare_with), device=args.device)
        rows = []
        for name, dataset in targets.items():
            chosen = sample_indices(len(dataset), args.images, args.seed)
            first = layer_features(bundle.model, dataset=dataset, indices=chosen, transform=transform, pool=args.pool,
                                   layers=args.layers, progress=True)
            second = layer_features(other.model, dataset=dataset, indices=chosen, transform=transform, pool=args.pool,
                                    layers=args.layers, progress=True)
            for layer in first:
                for estimator in ESTIMATORS:
                    rows.append({"estimator": f"cka (linear, {estimator})", "layer": layer, "comparison": "paired",
                                 "target": name, "value": cka(first[layer], second[layer], "linear", estimator),
                                 "n": len(chosen), "pool": args.pool, "model": args.model,
                                 "pretrained": args.pretrained, "compared_with": args.compare_with})
        table = pd.DataFrame(rows)
        print(f"paired linear CKA per layer, {args.pretrained} vs {args.compare_with} on the same images:")
        print(table.pivot_table(index="layer", columns=["target", "estimator"], values="value").round(4).to_string())
    else:
        source = load_dataset(args.source, args.data_root)
        estimators = DOMAIN_ESTIMATORS if args.estimator == "all" else (args.estimator,)
        table = compare_domains(bundle.model, source, targets, transform, args.images, args.pool, estimators,
                                args.layers, args.bootstrap, args.permutations, args.pairings, args.seed,
                                progress=True, bundle=bundle,
                                labels={"source": args.source, "model": args.model, "pretrained": args.pretrained})
        for estimator in estimators:
            print_domain_table(table, estimator)
        if args.figure is not None:
            from analysis.figures import domain_similarity_by_layer, save_figure

            for estimator in estimators:
                stem = args.figure.stem if len(estimators) == 1 else f"{args.figure.stem}_{estimator}"
                save_figure(domain_similarity_by_layer(table, estimator), args.figure.parent, stem)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_table(table, args.out)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
