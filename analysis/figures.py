"""One function per figure: tidy tables in, a matplotlib figure out.

Every figure states the definitions it used in its title or a footnote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

__all__ = ["accuracy_by_domain", "cka_by_layer", "save_figure", "world_samples"]

sns.set_theme(context="notebook", style="whitegrid")


def save_figure(figure: plt.Figure, folder: str | Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def world_samples(samples: Mapping[str, Sequence[tuple[np.ndarray, str]]]) -> plt.Figure:
    """A grid of example images: one row per domain, each image titled with its class name.

    Args:
        samples: domain name -> list of (uint8 [H, W, 3] image, class name).
    """
    rows = len(samples)
    cols = max(len(v) for v in samples.values())
    figure, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for r, (domain, items) in enumerate(samples.items()):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(items):
                image, label = items[c]
                ax.imshow(image)
                ax.set_title(label, fontsize=8)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(domain, fontsize=9)
    figure.suptitle("The embedded world: source (top) and targets in order of designed shift")
    figure.tight_layout()
    return figure


def accuracy_by_domain(table: pd.DataFrame, similarity: Mapping[str, float] | None = None) -> plt.Figure:
    """Mean 5-way accuracy per domain and method, one panel per shot setting, with 95% CI.

    Args:
        table: tidy, one row per episode, columns ``domain``, ``shots``, ``method``, ``accuracy`` (0..1).
        similarity: optional domain -> similarity to the source, drawn as a line on a second axis.
    """
    required = {"domain", "shots", "method", "accuracy"}
    if not required <= set(table.columns):
        raise ValueError(f"accuracy_by_domain needs columns {sorted(required)}; got {list(table.columns)}")
    domains = list(dict.fromkeys(table["domain"]))
    methods = list(dict.fromkeys(table["method"]))
    shots = sorted(table["shots"].unique())
    stats = table.groupby(["domain", "shots", "method"], sort=False)["accuracy"].agg(["mean", "std", "count"]).reset_index()
    stats["ci95"] = 1.96 * stats["std"].fillna(0) / np.sqrt(stats["count"])
    figure, axes = plt.subplots(1, len(shots), figsize=(4.2 * len(shots) + 1, 3.8), squeeze=False, sharey=True)
    width = 0.8 / len(methods)
    x = np.arange(len(domains))
    palette = sns.color_palette(n_colors=len(methods))
    for ax, k in zip(axes[0], shots):
        for m, method in enumerate(methods):
            part = stats[(stats["shots"] == k) & (stats["method"] == method)].set_index("domain").reindex(domains)
            ax.bar(x + (m - (len(methods) - 1) / 2) * width, 100 * part["mean"], width, yerr=100 * part["ci95"],
                   capsize=2, label=method, color=palette[m])
        ax.axhline(20, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(x, [d.replace("synthetic-", "") for d in domains], rotation=15)
        ax.set_title(f"{k}-shot", fontsize=10)
        ax.set_ylim(0, 100)
        if similarity:
            twin = ax.twinx()
            twin.plot(x, [similarity.get(d, np.nan) for d in domains], "o-", color="black", label="similarity to source")
            twin.set_ylim(0, 1.05)
            twin.grid(False)
            if ax is axes[0, -1]:
                twin.set_ylabel("similarity to source (1 - MMD²/2)")
                twin.legend(loc="upper right", fontsize=7)
            else:
                twin.set_yticklabels([])
    axes[0, 0].set_ylabel("5-way accuracy (%)")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    figure.suptitle("Accuracy per target (left to right: growing shift); error bars: 95% CI = 1.96 std/sqrt(episodes);"
                    " dashed: chance", fontsize=9)
    figure.tight_layout()
    return figure


def cka_by_layer(table: pd.DataFrame) -> plt.Figure:
    """Domain CKA per layer with its spread over random pairings and the two references.

    Args:
        table: one row per (target, layer): ``layer``, ``target``, ``cka_mean``, ``cka_std``,
            ``within_source_mean``, ``noise_floor_mean``, ``kernel``, ``estimator``, ``pool``.
    """
    required = {"layer", "target", "cka_mean", "cka_std", "within_source_mean", "noise_floor_mean"}
    if not required <= set(table.columns):
        raise ValueError(f"cka_by_layer needs columns {sorted(required)}; got {list(table.columns)}")
    figure, ax = plt.subplots(figsize=(6, 3.8))
    for target, part in table.groupby("target", sort=False):
        part = part.sort_values("layer")
        line, = ax.plot(part["layer"], part["cka_mean"], "o-", label=f"source vs {target}")
        ax.fill_between(part["layer"], part["cka_mean"] - part["cka_std"], part["cka_mean"] + part["cka_std"],
                        color=line.get_color(), alpha=0.2)
    first = table.sort_values("layer").drop_duplicates("layer")
    ax.plot(first["layer"], first["within_source_mean"], "k--", label="within source (two halves)")
    ax.plot(first["layer"], first["noise_floor_mean"], ":", color="grey", label="noise floor (random features)")
    ax.set_xlabel("vision block")
    ax.set_ylabel("CKA")
    settings = ", ".join(f"{k}={table[k].iloc[0]}" for k in ("kernel", "estimator", "pool") if k in table)
    ax.set_title(f"CKA between domains per layer ({settings});\nband: std over random pairings", fontsize=9)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure
