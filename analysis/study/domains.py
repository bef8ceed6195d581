"""The domains of a study: how far each target is from the source (every domain estimator with
its references), the feature-space similarity of the final embedding, a 2-D view, and examples."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.domain import compare_domains, list_domain_estimators
from analysis.study.context import StudyContext
from cdfsl_core.errors import ConfigError
from cdfsl_core.world_report import feature_similarity
from cdfsl_core.zeroshot import image_features

__all__ = ["domain_similarity", "feature_view", "samples", "similarity"]


def domain_similarity(study: StudyContext, pool: str = "cls") -> pd.DataFrame:
    """Every domain estimator (:mod:`analysis.domain`) per layer of the pretrained model: each target
    against the source, beside two random and two class-disjoint halves of the source and a
    permutation null, with bootstrap intervals; ``pool`` 'cls', 'mean' or 'mean-no-simple'."""
    def make() -> pd.DataFrame:
        targets = {name: study.load(name) for name in study.data.targets}
        return compare_domains(study.bundle.model, study.load(study.data.source), targets, study.transform,
                               study.data.domain_images, pool, tuple(list_domain_estimators()), seed=study.grid.seed,
                               progress=study.progress, bundle=study.bundle,
                               labels={"source": study.data.source, "model": study.model.name})
    return study.cached(f"domain_similarity{'' if pool == 'cls' else '_' + pool}.csv", make)


def similarity(study: StudyContext) -> dict[str, float]:
    """1 - MMD^2/2 between the source's and each target's final image features (the world report's)."""
    def make() -> pd.DataFrame:
        source = study.load(study.data.source)
        source_features = image_features(study.bundle, source, range(0, len(source), max(1, len(source) // 512)))
        rows = []
        for target in study.data.targets:
            dataset = study.load(target)
            features = image_features(study.bundle, dataset, range(0, len(dataset), max(1, len(dataset) // 300)))
            rows.append({"target": target, "similarity": feature_similarity(source_features, features)})
        return pd.DataFrame(rows)
    table = study.cached("similarity.csv", make)
    return dict(zip(table["target"], table["similarity"]))


def feature_view(study: StudyContext, method: str = "pca", per_domain: int = 150) -> pd.DataFrame:
    """2-D view of the final image features of the source and every target (scikit-learn PCA, or
    t-SNE with ``method='tsne'``, fitted on all domains together): a row per image with ``domain``,
    ``class``, ``x``, ``y``."""
    if method not in ("pca", "tsne"):
        raise ConfigError(f"method={method!r}; expected 'pca' or 'tsne'.")

    def make() -> pd.DataFrame:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        parts, rows = [], []
        for name in (study.data.source, *study.data.targets):
            dataset = study.load(name)
            indices = list(range(0, len(dataset), max(1, len(dataset) // per_domain)))[:per_domain]
            parts.append(image_features(study.bundle, dataset, indices).cpu().numpy())
            rows += [{"domain": name, "class": dataset.classes[dataset.targets[i]]} for i in indices]
        features = np.concatenate(parts)
        reducer = PCA(2, random_state=study.grid.seed) if method == "pca" else \
            TSNE(2, init="pca", perplexity=min(30.0, len(features) / 4), random_state=study.grid.seed)
        coords = reducer.fit_transform(features)
        table = pd.DataFrame(rows)
        table["x"], table["y"], table["method"] = coords[:, 0], coords[:, 1], method
        if method == "pca":
            table["explained_variance"] = float(reducer.explained_variance_ratio_.sum())
        return table
    return study.cached(f"feature_view_{method}.csv", make)


def samples(study: StudyContext, per_domain: int = 8) -> dict[str, list]:
    """Example images with their class names, per domain: (uint8 [H, W, 3], name) pairs."""
    out = {}
    for name in (study.data.source, *study.data.targets):
        dataset = study.load(name)
        stride = max(1, len(dataset) // per_domain)
        out[name] = [(_array(dataset, i), dataset.classes[dataset.targets[i]])
                     for i in range(0, per_domain * stride, stride)[:per_domain]]
    return out


def _array(dataset: Any, index: int) -> np.ndarray:
    """An image as uint8 [H, W, 3] (the renderer's array for the embedded world, else the file)."""
    if hasattr(dataset, "array"):
        return dataset.array(index)
    return np.asarray(dataset.load_image(index).convert("RGB"))
