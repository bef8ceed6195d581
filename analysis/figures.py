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

__all__ = ["save_figure", "world_samples", "zero_shot_by_domain"]

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


def zero_shot_by_domain(table: pd.DataFrame, similarity: Mapping[str, float] | None = None) -> plt.Figure:
    """Mean 5-way accuracy per domain with 95% CI (1.96 std / sqrt(episodes)).

    Args:
        table: tidy, one row per episode, columns ``domain``, ``shots``, ``accuracy`` (0..1).
        similarity: optional domain -> similarity to the source, drawn on a second axis.
    """
    required = {"domain", "shots", "accuracy"}
    if not required <= set(table.columns):
        raise ValueError(f"zero_shot_by_domain needs columns {sorted(required)}; got {list(table.columns)}")
    order = list(dict.fromkeys(table["domain"]))
    grouped = table.groupby(["domain", "shots"], sort=False)["accuracy"]
    stats = grouped.agg(["mean", "std", "count"]).reset_index()
    stats["ci95"] = 1.96 * stats["std"].fillna(0) / np.sqrt(stats["count"])
    figure, ax = plt.subplots(figsize=(1.6 * len(order) + 2, 3.6))
    shots = sorted(stats["shots"].unique())
    width = 0.8 / len(shots)
    x = np.arange(len(order))
    for k, s in enumerate(shots):
        part = stats[stats["shots"] == s].set_index("domain").reindex(order)
        ax.bar(x + (k - (len(shots) - 1) / 2) * width, 100 * part["mean"], width, yerr=100 * part["ci95"],
               capsize=3, label=f"{s}-shot episodes")
    ax.axhline(20, color="grey", linestyle="--", linewidth=1, label="chance (5-way)")
    ax.set_xticks(x, order, rotation=15)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_ylim(0, 100)
    if similarity:
        twin = ax.twinx()
        twin.plot(x, [similarity.get(d, np.nan) for d in order], "o-", color="black", label="domain similarity")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("similarity to source (1 - MMD²/2)")
        twin.grid(False)
        twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper center", fontsize=8, ncol=len(shots) + 1)
    ax.set_title("Zero-shot 5-way accuracy falls as the shift from the source grows\n"
                 "(mean over episodes, error bars 95% CI = 1.96 std/sqrt(n))", fontsize=10)
    figure.tight_layout()
    return figure
