"""Centred kernel alignment (CKA) between representations, accumulated over batches.

``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` for Gram matrices K of X and L of Y over the
same n examples (Kornblith et al. 2019). Over many images the HSIC terms of each batch are
*summed* and the ratio is taken at the end (minibatch CKA, Nguyen et al. 2021); per-batch CKA
values are never averaged. With one batch holding every example the streaming estimate equals
the plain O(n^2) estimate (:func:`cka`), which a test checks to 1e-6.

- kernels: ``linear`` (K = X X^T) and ``rbf`` (exp(-d^2 / (2 sigma^2)), sigma = ``bandwidth`` x the
  median pairwise distance within the batch);
- estimators: ``biased`` (HSIC = tr(K H L H) / (n-1)^2) and ``debiased`` (Song et al. 2012,
  needs n >= 4 per batch). Biased CKA is high even for independent random data when n is small
  relative to the feature dimension; :func:`check_sample_size` warns then.

Paired use: the same images through two models or two layers. Domain use
(:func:`domain_cka`): source and target images are not paired; see its docstring.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cdfsl_core.cli import command, parser, positive_int


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m analysis.cka", "Per-layer CKA between a source and a target domain.")
    result.add_argument("--source", default="synthetic", help="source dataset")
    result.add_argument("--target", default="synthetic-xray", help="target dataset")
    result.add_argument("--data-root", default=None, help="folder holding the datasets (None: $CDFSL_DATA_ROOT)")
    result.add_argument("--model", default="cdfsl-synth-vit", help="open_clip architecture")
    result.add_argument("--pretrained", default="synthetic", help="tag or weights file")
    result.add_argument("--images", type=positive_int, default=500, help="images per domain")
    result.add_argument("--kernel", choices=("linear", "rbf"), default="linear", help="CKA kernel")
    result.add_argument("--estimator", choices=("biased", "debiased"), default="debiased", help="HSIC estimator")
    result.add_argument("--pool", choices=("cls", "mean"), default="cls", help="CLS token or mean patch token")
    result.add_argument("--pairings", type=positive_int, default=20, help="random pairings of the unpaired images")
    result.add_argument("--seed", type=int, default=0, help="sampling seed")
    result.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    result.add_argument("--out", type=Path, default=Path("outputs/cka"), help="output folder")
    return result


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments answer here, before PyTorch is imported

import math  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cdfsl_core.errors import ConfigError  # noqa: E402

__all__ = ["CKAAccumulator", "KERNELS", "ESTIMATORS", "check_sample_size", "cka", "domain_cka", "hsic"]

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


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", estimator: str = "biased",
        bandwidth: float = 1.0) -> float:
    """Plain O(n^2) CKA of paired features x [n, ...] and y [n, ...]."""
    _check(kernel, estimator)
    x, y = _features(x, "x"), _features(y, "y")
    if len(x) != len(y):
        raise ConfigError(f"CKA pairs examples: x has {len(x)} rows, y has {len(y)}.")
    k, l = gram(x, kernel, bandwidth), gram(y, kernel, bandwidth)
    xy, xx, yy = hsic(k, l, estimator), hsic(k, k, estimator), hsic(l, l, estimator)
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
        k, l = gram(x, self.kernel, self.bandwidth), gram(y, self.kernel, self.bandwidth)
        for i, value in enumerate((hsic(k, l, self.estimator), hsic(k, k, self.estimator), hsic(l, l, self.estimator))):
            self.sums[i] += float(value)
        self.n += len(x)
        self.dims = (x.shape[1], y.shape[1])

    def value(self) -> float:
        if self.n == 0:
            raise ConfigError("no batch was added.")
        check_sample_size(self.n, max(self.dims), self.estimator)
        denominator = math.sqrt(max(self.sums[1], 0.0) * max(self.sums[2], 0.0))
        return self.sums[0] / denominator if denominator > 0 else float("nan")


def domain_cka(
    source: torch.Tensor, target: torch.Tensor, kernel: str = "linear", estimator: str = "biased",
    pairings: int = 20, seed: int = 0, bandwidth: float = 1.0,
) -> dict[str, float]:
    """CKA between features of *unpaired* source and target images (the papers' domain use).

    The papers compare source with target features without publishing the estimator. This one:
    draw m = min(n_source, n_target) images of each domain, pair them at random, compute CKA;
    repeat for ``pairings`` random pairings and report the mean and standard deviation. Since the
    pairing is arbitrary, what it measures is how similar the two feature distributions' Gram
    structures look under random alignment. Two references come with it:

    - ``within_source``: the same estimator between two disjoint random halves of the source
      (what an unshifted domain scores);
    - ``noise_floor``: the same estimator on independent Gaussian features of the same shapes
      (what biased estimates give for no relation at all; about 0 when debiased).
    """
    _check(kernel, estimator)
    source, target = _features(source, "source"), _features(target, "target")
    rng = np.random.default_rng(seed)
    m = min(len(source), len(target))
    if estimator == "debiased" and m < 4:
        raise ConfigError(f"debiased CKA needs at least 4 images per domain; got {m}.")
    check_sample_size(m, source.shape[1], estimator)
    values, within, noise = [], [], []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(pairings):
        a = torch.from_numpy(rng.choice(len(source), m, replace=False))
        b = torch.from_numpy(rng.choice(len(target), m, replace=False))
        values.append(cka(source[a], target[b], kernel, estimator, bandwidth))
        half = torch.from_numpy(rng.permutation(len(source)))
        h = len(source) // 2
        if h >= 4 or (estimator == "biased" and h >= 2):
            within.append(cka(source[half[:h]], source[half[h:2 * h]], kernel, estimator, bandwidth))
        noise.append(cka(torch.randn(m, source.shape[1], generator=gen, dtype=torch.float64),
                         torch.randn(m, target.shape[1], generator=gen, dtype=torch.float64), kernel, estimator, bandwidth))
    return {
        "cka_mean": float(np.mean(values)),
        "cka_std": float(np.std(values)),
        "within_source_mean": float(np.mean(within)) if within else float("nan"),
        "noise_floor_mean": float(np.mean(noise)),
        "pairings": pairings,
        "n": m,
    }


# ---------------------------------------------------------------- per-layer features and the command
@torch.no_grad()
def layer_features(model: torch.nn.Module, images: torch.Tensor | None = None, dataset=None, indices=None,
                   transform=None, layers=None, pool: str = "cls", batch_size: int = 128,
                   progress: bool = False) -> dict[int, torch.Tensor]:
    """Per-layer image representations [n, width] from the recorder: the CLS token (``pool='cls'``)
    or the mean patch token (``'mean'``) of each block's output. Give ``images`` or a ``dataset``
    (with ``indices`` and a ``transform``). ``model`` is a CLIP, a vision tower, or a
    :class:`~cdfsl_core.methods.FewShotCLIP`, whose intervention (ATHA, TIR) is then active."""
    from tqdm import tqdm

    from analysis.recorder import record, vision_tower

    if pool not in ("cls", "mean"):
        raise ConfigError(f"pool={pool!r}; expected 'cls' or 'mean'.")
    visual = vision_tower(model)
    layers = list(range(len(visual.transformer.resblocks))) if layers is None else list(layers)
    if images is None:
        indices = list(range(len(dataset))) if indices is None else list(indices)
        batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        load = lambda ids: torch.stack([transform(dataset.load_image(i)) for i in ids])  # noqa: E731
    else:
        batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
        load = lambda ids: images[ids[0]:ids[-1] + 1]  # noqa: E731
    device = next(visual.parameters()).device
    forward = visual
    if hasattr(model, "encode_image") and hasattr(model, "text_features"):  # a FewShotCLIP: its intervention too
        with torch.no_grad():
            readout = model.text_features()[1]
        forward = lambda x: model.encode_image(x, readout)  # noqa: E731
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for ids in tqdm(batches, desc="recording features", disable=not progress, leave=False):
        with record(visual, layers=layers, what=("resid_post",)) as cache, torch.no_grad():
            forward(load(ids).to(device))
        for layer in layers:
            x = cache[f"blocks.{layer}.resid_post"]
            out[layer].append((x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)).float().cpu())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def sample_layer_features(model: torch.nn.Module, dataset, n: int, transform, seed: int = 0, pool: str = "cls",
                          progress: bool = False) -> dict[int, torch.Tensor]:
    """:func:`layer_features` of ``n`` images of ``dataset`` drawn without replacement from ``seed``."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(dataset), min(n, len(dataset)), replace=False)).tolist()
    return layer_features(model, dataset=dataset, indices=chosen, transform=transform, pool=pool, progress=progress)


def domain_cka_table(source_features: dict[int, torch.Tensor], target_features: dict[int, torch.Tensor], kernel: str = "linear",
                     estimator: str = "debiased", pairings: int = 20, seed: int = 0, progress: bool = False,
                     **labels) -> pd.DataFrame:
    """:func:`domain_cka` at every layer of two :func:`layer_features` results: one row per layer,
    with ``labels`` (source, target, pool, model, ...) and the estimator settings as columns."""

    from tqdm import tqdm

    rows = []
    for layer in tqdm(sorted(source_features), desc="CKA per layer", disable=not progress, leave=False):
        result = domain_cka(source_features[layer], target_features[layer], kernel, estimator, pairings, seed)
        rows.append({"layer": layer, **labels, "kernel": kernel, "estimator": estimator, **result})
    return pd.DataFrame(rows)


@command
def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.cka --source miniimagenet --target chestx --data-root DIR``."""
    import json
    import os

    from analysis.figures import cka_by_layer, save_figure
    from cdfsl_core.data import load_dataset
    from cdfsl_core.models import load_clip
    from cdfsl_core.runner import protocol_transform

    args = build_parser().parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    bundle = load_clip(args.model, args.pretrained, device=args.device)
    transform = protocol_transform(bundle, 1.15)
    features = {
        role: sample_layer_features(bundle.model, load_dataset(name, args.data_root), args.images, transform,
                                    args.seed, args.pool, progress=True)
        for role, name in (("source", args.source), ("target", args.target))
    }
    table = domain_cka_table(features["source"], features["target"], args.kernel, args.estimator, args.pairings,
                             args.seed, progress=True, source=args.source, target=args.target, pool=args.pool,
                             model=args.model, pretrained=args.pretrained)
    rows = table.to_dict("records")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"cka_{args.source}_{args.target}"
    table.to_csv(args.out / f"{stem}.csv", index=False)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    save_figure(cka_by_layer(table), args.out, stem)
    print(table[["layer", "cka_mean", "cka_std", "within_source_mean", "noise_floor_mean", "n"]].to_string(index=False))
    print(f"\nwrote {args.out / stem}.csv, .json, .png, .pdf")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
