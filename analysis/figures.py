"""One function per figure: tidy tables in, a matplotlib figure out.

Every figure states the definitions it used in its title or a footnote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

# No backend is chosen here: a notebook keeps its inline backend, and matplotlib falls back to
# Agg by itself where there is no display.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from cdfsl_core.atomic import atomic_path
from cdfsl_core.stats import mean_ci95

__all__ = [
    "accuracy_by_domain",
    "ablation_effects",
    "attention_maps",
    "domain_similarity_by_layer",
    "cka_finetuned",
    "feature_view",
    "head_tail_similarity",
    "intervention_strengths",
    "logit_attribution",
    "organism_emergence",
    "patching",
    "paired_differences",
    "positive_controls",
    "register_control",
    "register_neurons",
    "save_figure",
    "sink_counts",
    "token_maps",
    "token_norms_by_bucket",
    "trajectories",
    "world_samples",
]

sns.set_theme(context="notebook", style="whitegrid")


def save_figure(figure: plt.Figure, folder: str | Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        with atomic_path(path) as tmp:  # the format from the final name: the temporary one has another suffix
            figure.savefig(tmp, dpi=150, bbox_inches="tight", format=path.suffix[1:])
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
    embedded = all(str(domain).startswith("synthetic") for domain in samples)
    figure.suptitle("The embedded world: source (top) and targets in order of designed shift" if embedded else
                    "Example images: source (top) and targets in order of shift")
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
    stats = table.groupby(["domain", "shots", "method"], sort=False)["accuracy"].agg(["mean", _ci95]).reset_index()
    stats["ci95"] = stats["_ci95"]
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
            else:
                twin.set_yticklabels([])
            twins = [twin]
    axes[0, 0].set_ylabel("5-way accuracy (%)")
    figure.suptitle("Accuracy per target (left to right: growing shift); error bars: 95% CI = 1.96 std/sqrt(episodes);"
                    " dashed: chance", fontsize=9)
    figure.tight_layout()
    _legend_below(figure, [axes[0, 0], *(twins if similarity else [])], ncol=5)
    return figure


def domain_similarity_by_layer(table: pd.DataFrame, estimators: Sequence[str] | str | None = None) -> plt.Figure:
    """Domain similarity per layer, one panel per estimator: each target (line, band: bootstrap 95%
    interval) beside the class-disjoint halves of the source (grey band: the baseline), two random
    halves (dotted: the noise floor) and the permutation null (dashed); for the negative control
    random-pairing-cka, its predicted value (crosses) instead.

    Args:
        table: :func:`analysis.domain.domain_table` rows: ``estimator``, ``layer``, ``comparison``,
            ``target``, ``value``, ``ci_low``, ``ci_high``, ``higher_is_similar``, ``n``, ``pool``;
            ``predicted`` for random-pairing-cka.
        estimators: which to draw (default: every one in the table).
    """
    _require(table, {"estimator", "layer", "comparison", "target", "value", "ci_low", "ci_high"},
             "domain_similarity_by_layer")
    chosen = list(dict.fromkeys(table["estimator"])) if estimators is None else (
        [estimators] if isinstance(estimators, str) else list(estimators))
    missing = [e for e in chosen if e not in set(table["estimator"])]
    if missing:
        raise ValueError(f"estimators {missing} are not in the table; it has {sorted(set(table['estimator']))}")
    targets = [t for t in dict.fromkeys(table.loc[table["comparison"] == "target", "target"])]
    palette = _palette(targets)
    figure, axes = plt.subplots(1, len(chosen), figsize=(4.6 * len(chosen) + 0.6, 3.8), squeeze=False)
    for ax, estimator in zip(axes[0], chosen):
        part = table[table["estimator"] == estimator]
        for comparison, style in (("class-disjoint", "--"), ("within-source", ":")):
            ref = part[part["comparison"] == comparison].sort_values("layer")
            ax.plot(ref["layer"], ref["value"], style, color="grey",
                    label=f"source: {'class-disjoint halves' if comparison == 'class-disjoint' else 'random halves'}")
            if comparison == "class-disjoint":
                ax.fill_between(ref["layer"], ref["ci_low"], ref["ci_high"], color="grey", alpha=0.25)
        null = part[part["comparison"] == "permutation-null"].groupby("layer")["value"].mean()
        if len(null):
            ax.plot(null.index, null.values, "-.", color="black", linewidth=0.8, label="permutation null")
        for target in targets:
            line = part[(part["comparison"] == "target") & (part["target"] == target)].sort_values("layer")
            ax.plot(line["layer"], line["value"], "o-", color=palette[target], label=_short(target))
            ax.fill_between(line["layer"], line["ci_low"], line["ci_high"], color=palette[target], alpha=0.2)
            if "predicted" in line and line["predicted"].notna().any():
                ax.plot(line["layer"], line["predicted"], "x", color=palette[target], markersize=8)
        higher = part["higher_is_similar"].iloc[0] if "higher_is_similar" in part else None
        direction = "higher = more similar" if higher is True or higher == 1.0 else (
            "lower = more similar" if higher is False or higher == 0.0 else "negative control; x: predicted")
        ax.set_title(f"{estimator} ({direction})", fontsize=9)
        ax.set_xlabel("vision block")
    _integer_blocks(axes[0])
    entries = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    axes[0, -1].legend(entries.values(), entries.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    settings = (f"n = {int(table['n'].iloc[0])} images per side" if "n" in table else "") + (
        f", pool {table['pool'].iloc[0]}" if "pool" in table else "")
    figure.suptitle(f"Source vs each target per block ({settings}); bands: 95% bootstrap intervals; grey band: two "
                    "class-disjoint halves of the source", fontsize=9)
    figure.tight_layout()
    return figure


def _legend_below(figure: plt.Figure, axes: Sequence[plt.Axes], title: str | None = None, ncol: int = 4) -> None:
    """One legend for every panel, below them (outside the data), from the entries of ``axes``."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(list(entries.values()), list(entries.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      ncol=min(ncol, len(entries)), fontsize=7, title=title, title_fontsize=7, frameon=False)


def _integer_blocks(axes: Sequence[plt.Axes]) -> None:
    """Block axes tick at whole blocks."""
    for ax in axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))


def _require(table: pd.DataFrame, columns: set[str], figure: str) -> None:
    if not columns <= set(table.columns):
        raise ValueError(f"{figure} needs columns {sorted(columns)}; got {list(table.columns)}")


def _short(domain: str) -> str:
    return domain.replace("synthetic-", "")


def _palette(names: Sequence[str]) -> dict[str, tuple]:
    """One colour per name, in order of first appearance."""
    names = list(dict.fromkeys(names))
    return dict(zip(names, sns.color_palette(n_colors=len(names))))


def _chosen_layers(recorded: Sequence[int], layers: Sequence[int] | None) -> list[int]:
    """``layers``, checked against the recorded ones; by default the first, middle and last."""
    recorded = sorted(recorded)
    if layers is None:
        return sorted({recorded[0], recorded[len(recorded) // 2], recorded[-1]})
    missing = [layer for layer in layers if layer not in recorded]
    if missing:
        raise ValueError(f"layers {missing} are not in the table; recorded: {recorded}")
    return list(layers)


def paired_differences(summary: pd.DataFrame, baseline: str = "coop+lora") -> plt.Figure:
    """Paired accuracy differences against the baseline, in points with 95% CI, one panel per
    shot setting, one row per domain, one marker per method.

    Args:
        summary: one row per (domain, shots, method): ``diff_vs_baseline``, ``diff_ci95`` (0..1);
            the baseline's own rows are left out.
    """
    _require(summary, {"domain", "shots", "method", "diff_vs_baseline", "diff_ci95"}, "paired_differences")
    table = summary[summary["method"] != baseline]
    domains = list(dict.fromkeys(table["domain"]))
    methods = list(dict.fromkeys(table["method"]))
    shots = sorted(table["shots"].unique())
    palette = sns.color_palette(n_colors=len(methods))
    figure, axes = plt.subplots(1, len(shots), figsize=(4.2 * len(shots), 0.6 * len(domains) + 1.8), squeeze=False,
                                sharex=True)
    for ax, k in zip(axes[0], shots):
        for m, method in enumerate(methods):
            part = table[(table["shots"] == k) & (table["method"] == method)].set_index("domain").reindex(domains)
            y = np.arange(len(domains)) + (m - (len(methods) - 1) / 2) * 0.2
            ax.errorbar(100 * part["diff_vs_baseline"], y, xerr=100 * part["diff_ci95"], fmt="o", capsize=3,
                        color=palette[m], label=method)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_yticks(np.arange(len(domains)), [_short(d) for d in domains])
        ax.invert_yaxis()
        ax.set_title(f"{k}-shot", fontsize=10)
        ax.set_xlabel(f"accuracy - {baseline} (points)")
    figure.suptitle(f"Paired differences against {baseline} on the same episodes; bars: 95% CI "
                    "= 1.96 std/sqrt(episodes) of the per-episode differences", fontsize=9)
    figure.tight_layout()
    _legend_below(figure, [axes[0, 0]])
    return figure


def _weighted(table: pd.DataFrame, keys: list[str], value: str, weight: str) -> pd.DataFrame:
    """Weighted mean of ``value`` over everything but ``keys`` (episodes, datasets)."""
    table = table[table[weight] > 0].assign(_w=lambda t: t[value] * t[weight])
    grouped = table.groupby(keys, sort=False)[["_w", weight]].sum().reset_index()
    return grouped.assign(**{value: grouped["_w"] / grouped[weight]}).drop(columns="_w")


def token_norms_by_bucket(norms: pd.DataFrame) -> plt.Figure:
    """Mean patch-token norm per layer, one line per Sum bucket m (the number of classes whose
    top-k tokens include the token, TIR's score), one panel per model.

    Args:
        norms: the ``norms`` table of the token diagnostics: ``model``, ``layer``, ``bucket``,
            ``count``, ``mean``, ``space``, ``transform``, ``rho``; several episodes or datasets
            are pooled, weighted by token count.
    """
    _require(norms, {"model", "layer", "bucket", "count", "mean", "space", "transform", "rho"}, "token_norms_by_bucket")
    models = list(dict.fromkeys(norms["model"]))
    pooled = _weighted(norms, ["model", "layer", "bucket"], "mean", "count")
    totals = norms.groupby(["model", "layer"])["count"].sum()
    layers = sorted(norms["layer"].unique())
    n_classes = int(norms["bucket"].max())
    palette = sns.color_palette("viridis", n_colors=n_classes + 1)
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 0.5, 3.6), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models):
        part = pooled[pooled["model"] == model]
        for bucket in range(n_classes + 1):
            # every block, NaN where the bucket has no token: the line breaks there instead of bridging it
            line = part[part["bucket"] == bucket].set_index("layer").reindex(layers)
            if line["mean"].notna().any():
                share = (line["count"] / totals[model].reindex(layers)).fillna(0).to_numpy()
                ax.plot(layers, line["mean"], "-", color=palette[bucket], label=f"m = {bucket}")
                ax.scatter(layers, line["mean"], s=8 + 120 * share, color=palette[bucket])
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("vision block")
    _integer_blocks(axes[0])
    first = norms.iloc[0]
    unit = "log " if first["transform"] == "log" else ""
    axes[0, 0].set_ylabel(f"mean {unit}token norm ({first['space']} space)")
    figure.suptitle(f"Patch-token norms by Sum bucket: m = number of the {n_classes} classes whose top "
                    f"floor({first['rho']:g} L) tokens include the token (m = {n_classes}: 'simple' tokens); marker "
                    "area: the bucket's share of the block's tokens; gaps: no token", fontsize=9, wrap=True)
    figure.tight_layout()
    _legend_below(figure, [axes[0, 0]], title="Sum bucket", ncol=n_classes + 1)
    return figure


def sink_counts(sinks: pd.DataFrame) -> plt.Figure:
    """Sink tokens per image by layer, one panel per definition (with its threshold), one line
    per model (pretrained and fine-tuned).

    Args:
        sinks: the ``sinks`` table: ``model``, ``layer``, ``definition``, ``label``, ``images``,
            ``mean_count``; several episodes or datasets are pooled, weighted by images.
    """
    _require(sinks, {"model", "layer", "definition", "label", "images", "mean_count"}, "sink_counts")
    definitions = list(dict.fromkeys(sinks["definition"]))
    labels = sinks.drop_duplicates("definition").set_index("definition")["label"]
    pooled = _weighted(sinks, ["definition", "model", "layer"], "mean_count", "images")
    palette = _palette(sinks["model"])
    models = list(palette)
    figure, axes = plt.subplots(1, len(definitions), figsize=(3.6 * len(definitions) + 0.5, 3.4), squeeze=False)
    for ax, definition in zip(axes[0], definitions):
        part = pooled[pooled["definition"] == definition]
        for model in models:
            line = part[part["model"] == model].sort_values("layer")
            ax.plot(line["layer"], line["mean_count"], "o-", color=palette[model], label=model)
        ax.set_title(labels[definition], fontsize=8)
        ax.set_xlabel("vision block")
    _integer_blocks(axes[0])
    axes[0, 0].set_ylabel("sink tokens per image")
    images = int(sinks.groupby(["model", "definition", "layer"])["images"].sum().max())
    figure.suptitle(f"Sink tokens per image under {len(definitions)} definitions, before and after fine-tuning (up to "
                    f"{images} query images per point); each panel has its own y scale: the definitions flag "
                    "different tokens in very different numbers", fontsize=9, wrap=True)
    figure.tight_layout()
    _legend_below(figure, [axes[0, 0]])
    return figure


def head_tail_similarity(head_tail: pd.DataFrame, layers: Sequence[int] | None = None) -> plt.Figure:
    """Distribution of each patch token's best similarity to a class, one panel per layer, one
    step histogram per model, with the mean head and tail cut points.

    Args:
        head_tail: the ``head_tail`` table: ``model``, ``layer``, ``bin_left``, ``bin_right``,
            ``count``, ``head_cut``, ``tail_cut``, ``rho_head``, ``rho_tail``.
        layers: the layers to draw (default: the first, middle and last recorded).
    """
    _require(head_tail, {"model", "layer", "bin_left", "bin_right", "count", "head_cut", "tail_cut", "rho_head",
                         "rho_tail"}, "head_tail_similarity")
    layers = _chosen_layers(head_tail["layer"].unique(), layers)
    palette = _palette(head_tail["model"])
    models = list(palette)
    figure, axes = plt.subplots(1, len(layers), figsize=(3.8 * len(layers) + 0.5, 3.4), squeeze=False, sharex=True,
                                sharey=True)
    occupied = head_tail[head_tail["count"] > 0]
    low, high = (occupied["bin_left"].min(), occupied["bin_right"].max()) if len(occupied) else (-1.0, 1.0)
    margin = 0.05 * (high - low)
    for ax, layer in zip(axes[0], layers):
        part = head_tail[head_tail["layer"] == layer]
        for model in models:
            rows = part[part["model"] == model].groupby(["bin_left", "bin_right"])["count"].sum().reset_index()
            density = rows["count"] / max(rows["count"].sum(), 1)
            ax.step(rows["bin_left"], density, where="post", color=palette[model], label=model)
            cuts = part[part["model"] == model]
            ax.axvline(cuts["head_cut"].mean(), color=palette[model], linestyle="-", linewidth=0.8, alpha=0.7)
            ax.axvline(cuts["tail_cut"].mean(), color=palette[model], linestyle="--", linewidth=0.8, alpha=0.7)
        ax.set_title(f"block {layer}", fontsize=9)
        ax.set_xlabel("max over classes of cos(token, class vector)")
        ax.set_xlim(low - margin, high + margin)  # the data's range, not the possible [-1, 1]
    axes[0, 0].set_ylabel("fraction of patch tokens")
    first = head_tail.iloc[0]
    figure.suptitle(f"Head and tail tokens: similarity to ATHA's class vectors in the residual space; solid: head "
                    f"cut (top {first['rho_head']:g}), dashed: tail cut (bottom {first['rho_tail']:g})", fontsize=9)
    figure.tight_layout()
    _legend_below(figure, [axes[0, 0]])
    return figure


STATISTIC_TITLES = {  # panel titles of the statistics the built-in interventions report
    "alpha": "alpha: head strength", "beta": "beta: tail strength",
    "head_edit": "head edit / token norm", "tail_edit": "tail edit / token norm",
}


def intervention_strengths(table: pd.DataFrame, statistics: Sequence[str] = ("alpha", "beta", "head_edit", "tail_edit"),
                           name: str = "atha") -> plt.Figure:
    """What an intervention reports of itself, per block: one panel per statistic, before training
    (dotted) and after (solid), mean over episodes with 95% CI, one colour per domain. For ATHA:
    its strengths alpha (head) and beta (tail), and the size of its edit relative to the tokens it
    edits (``head_edit`` = alpha_i x mean norm of the class vectors head tokens move along / mean
    patch-token norm entering block i; ``tail_edit`` likewise with beta).

    Args:
        table: one row per (domain, episode, block, stage): ``stage`` ('init' or 'trained') and a
            column per statistic (:meth:`analysis.study.Study.intervention_stats`).
        statistics: the columns to draw.
        name: the intervention, for the title.
    """
    _require(table, {"domain", "episode", "block", "stage", *statistics}, "intervention_strengths")
    figure, axes = plt.subplots(1, len(statistics), figsize=(3.75 * len(statistics), 3.4), squeeze=False)
    palette = _palette(table["domain"])
    for ax, statistic in zip(axes[0], statistics):
        stats = table.groupby(["domain", "stage", "block"], sort=False)[statistic].agg(["mean", _ci95]).reset_index()
        for domain in palette:
            for stage, style in (("init", ":"), ("trained", "-")):
                part = stats[(stats["domain"] == domain) & (stats["stage"] == stage)].sort_values("block")
                if len(part):
                    ax.errorbar(part["block"], part["mean"], yerr=part["_ci95"], fmt="o" + style, capsize=2,
                                color=palette[domain], markersize=3 if stage == "init" else 5,
                                label=f"{_short(domain)}" if stage == "trained" else None)
        ax.set_title(STATISTIC_TITLES.get(statistic, statistic), fontsize=9)
        ax.set_xlabel("vision block")
    axes[0, 0].plot([], [], "k:", label="before training")
    _integer_blocks(axes[0])
    shots = ", ".join(f"{k}-shot" for k in sorted(table["shots"].unique())) if "shots" in table else ""
    norm = ""
    if "setting_text_norm" in table:
        unit = table["setting_text_norm"].iloc[0] == "unit"
        norm = f"; class vectors from the {'unit-norm' if unit else 'unnormalised'} read-out"
    figure.suptitle(f"What {name} reports of itself per block ({shots}){norm}; solid: after training, dotted: before; "
                    "bars: 95% CI over episodes", fontsize=9)
    figure.tight_layout()
    _legend_below(figure, [axes[0, 0]], ncol=6)
    return figure


def _ci95(values: pd.Series) -> float:
    """The 95% CI half-width of a mean, the project's one convention (:func:`cdfsl_core.stats.mean_ci95`)."""
    return mean_ci95(values.dropna().tolist())[1] if values.notna().any() else np.nan


def positive_controls(table: pd.DataFrame) -> plt.Figure:
    """Sink tokens per image at one block of a real model, without a plant and with one known
    artefact planted per image: each definition must flag the planted token meant for it in every
    image (framed cells, with the share of images where it did), so its zeros on real models are
    real zeros. A planted token can also displace natural sinks (a planted attention sink takes
    CLS's attention from the natural ones; a token in every top set pushes others out).

    Args:
        table: one row per (plant, definition): ``plant`` ('none' first), ``definition``,
            ``mean_count``, ``found_by`` (bool), ``layer``, optional ``label`` and ``planted_token_found``.
    """
    _require(table, {"plant", "definition", "mean_count", "found_by", "layer"}, "positive_controls")
    plants = list(dict.fromkeys(table["plant"]))
    definitions = list(dict.fromkeys(table["definition"]))
    grid = table.pivot_table(index="plant", columns="definition", values="mean_count", sort=False).reindex(
        index=plants, columns=definitions)
    figure, ax = plt.subplots(figsize=(1.6 * len(definitions) + 2.5, 0.55 * len(plants) + 1.6))
    sns.heatmap(grid, annot=True, fmt=".2f", cmap="Blues", cbar=True, cbar_kws={"label": "sink tokens per image"},
                ax=ax, linewidths=0.5)
    for _, row in table[table["found_by"]].iterrows():
        x, y = definitions.index(row["definition"]), plants.index(row["plant"])
        ax.add_patch(plt.Rectangle((x, y), 1, 1, fill=False, edgecolor="crimson", linewidth=2))
        if "planted_token_found" in row and row["planted_token_found"] == row["planted_token_found"]:
            ax.text(x + 0.5, y + 0.85, f"planted found in {100 * row['planted_token_found']:.0f}%", ha="center",
                    va="center", fontsize=6, color="crimson")
    ax.set_xlabel("sink definition")
    ax.set_ylabel("planted artefact (one per image)")
    labels = table.drop_duplicates("definition").set_index("definition")["label"] if "label" in table else None
    if labels is not None:
        ax.set_xticklabels([labels[d].replace(" (", "\n(") for d in definitions], fontsize=7, rotation=0)
    images = f"{table['images'].iloc[0]} " if "images" in table else ""
    where = (f"the pretrained model on {images}query images of {_short(str(table['dataset'].iloc[0]))} with their "
             "episode's classes" if "dataset" in table else "the pretrained model")
    ax.set_title(f"Positive controls at block {int(table['layer'].iloc[0])}: sink tokens per image of {where}; framed: "
                 "the definition meant to find the plant (it must flag the planted token)", fontsize=9, wrap=True)
    figure.tight_layout()
    return figure


def cka_finetuned(table: pd.DataFrame) -> plt.Figure:
    """CKA per layer between the pretrained and a fine-tuned model on the same target images,
    one panel per target, one line per method.

    Args:
        table: one row per (target, method, layer): ``cka``, ``kernel``, ``estimator``, ``pool``.
    """
    _require(table, {"target", "method", "layer", "cka"}, "cka_finetuned")
    targets = list(dict.fromkeys(table["target"]))
    palette = _palette(table["method"])
    methods = list(palette)
    figure, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets) + 0.5, 3.2), squeeze=False, sharey=True)
    for ax, target in zip(axes[0], targets):
        part = table[table["target"] == target]
        for method in methods:
            line = part[part["method"] == method].groupby("layer")["cka"].mean()
            ax.plot(line.index, line.values, "o-", color=palette[method], label=method)
        ax.set_title(_short(target), fontsize=9)
        ax.set_xlabel("vision block")
    _integer_blocks(axes[0])
    axes[0, 0].set_ylabel("CKA(pretrained, fine-tuned)")
    settings = ", ".join(f"{k}={table[k].iloc[0]}" for k in ("kernel", "estimator", "pool") if k in table)
    figure.suptitle(f"How far fine-tuning moves each layer: CKA on the same query images ({settings})", fontsize=9)
    figure.tight_layout()
    _legend_below(figure, [axes[0, 0]])
    return figure


def register_control(table: pd.DataFrame, maps: dict, image: int = 0) -> plt.Figure:
    """The test-time register's positive control (:func:`analysis.controls.register_neuron_control`)
    for one image: per model (rows), the planted neuron's activation over the patch grid and each
    patch token's norm over the image's median at the last block.

    Args:
        table: the control's table (its ``planted`` column names the neuron).
        maps: per model, ``activation`` and ``norm_ratio`` ``[images, rows, cols]``.
        image: which image to draw.
    """
    figure, axes = plt.subplots(len(maps), 2, figsize=(6.4, 2.8 * len(maps)), squeeze=False)
    neuron = table["planted"].iloc[0]
    for row, (label, parts) in zip(axes, maps.items()):
        for ax, (key, title) in zip(row, (("activation", f"neuron {neuron}: activation"),
                                          ("norm_ratio", "patch norm / median, last block"))):
            shown = ax.imshow(parts[key][image].numpy(), cmap="magma")
            figure.colorbar(shown, ax=ax, fraction=0.046)
            ax.set_title(f"{label}\n{title}", fontsize=8)
            ax.axis("off")
    figure.suptitle("A planted register neuron, without and with a test-time register", fontsize=9)
    figure.tight_layout()
    return figure


def register_neurons(table: pd.DataFrame) -> plt.Figure:
    """Where the register neurons are: per target, the number of the top-k register neurons in
    each vision block, one bar per model (pretrained and fine-tuned); a model without an outlier
    token in any image has none, and the panel says so.

    Args:
        table: :meth:`analysis.study.Study.register_neurons`: one row per (target, model, rank)
            with ``found``, ``block``, ``neuron``, ``score``, ``images_with_outliers``, ``tau``.
    """
    _require(table, {"target", "model", "found", "block", "images", "images_with_outliers"}, "register_neurons")
    targets = list(dict.fromkeys(table["target"]))
    palette = _palette(table["model"])
    models = list(palette)
    figure, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets) + 0.5, 3.2), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(models))
    for ax, target in zip(axes[0], targets):
        part = table[table["target"] == target]
        found = part[part["found"].astype(bool)]
        for j, model in enumerate(models):
            counts = found[found["model"] == model]["block"].astype(int).value_counts().sort_index()
            ax.bar(counts.index + (j - (len(models) - 1) / 2) * width, counts.values, width, color=palette[model],
                   label=model)
        if found.empty:
            first = part.iloc[0]
            ax.text(0.5, 0.5, f"no outlier token\n(norm > {first.get('tau', 2.0):g} x median)\nin {int(first['images'])} "
                    "images:\nno register neuron", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_ylim(0, 1)
        if "candidate_blocks" in part:
            ax.set_xlim(-0.5, int(part["candidate_blocks"].max()) - 0.5)
        ax.set_title(_short(target), fontsize=9)
        ax.set_xlabel("vision block (candidates)")
    _integer_blocks(axes[0])
    axes[0, 0].set_ylabel("register neurons (top-k)")
    figure.suptitle("Register neurons (Jiang et al. 2025): MLP neurons that fire on the outlier tokens", fontsize=9)
    figure.tight_layout()
    from matplotlib.patches import Patch

    figure.legend([Patch(color=palette[m]) for m in models], models, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=min(4, len(models)), fontsize=7, frameon=False)
    return figure


def _grid(table: pd.DataFrame) -> np.ndarray:
    side = int(table["row"].max()) + 1
    grid = np.zeros((side, side))
    grid[table["row"].to_numpy(int), table["col"].to_numpy(int)] = table["value"].to_numpy()
    return grid


def attention_maps(attention: pd.DataFrame, rollout: pd.DataFrame | None = None,
                   attribution: pd.DataFrame | None = None, layers: Sequence[int] | None = None) -> plt.Figure:
    """Where each model looks: one row per model; columns are CLS attention maps (mean over
    heads) at chosen layers, then attention rollout and captum attributions when given.

    Args:
        attention: the ``attention`` table: ``model``, ``layer``, ``head``, ``row``, ``col``, ``value``.
        rollout: the ``rollout`` table (``model``, ``row``, ``col``, ``value``, ``definition``).
        attribution: the ``attribution`` table (the same columns).
        layers: the attention layers to draw (default: the first, middle and last).
    """
    _require(attention, {"model", "layer", "head", "row", "col", "value"}, "attention_maps")
    layers = _chosen_layers(attention["layer"].unique(), layers)
    models = list(dict.fromkeys(attention["model"]))
    extra = [(name, t) for name, t in (("rollout", rollout), ("attribution", attribution)) if t is not None]
    cols = len(layers) + len(extra)
    figure, axes = plt.subplots(len(models), cols, figsize=(2.1 * cols, 2.2 * len(models) + 0.6), squeeze=False)
    for r, model in enumerate(models):
        for c, layer in enumerate(layers):
            part = attention[(attention["model"] == model) & (attention["layer"] == layer)]
            grid = _grid(part.groupby(["row", "col"])["value"].mean().reset_index())
            shown = axes[r, c].imshow(grid, cmap="magma")
            figure.colorbar(shown, ax=axes[r, c], fraction=0.046, pad=0.03).ax.tick_params(labelsize=5)
            axes[r, c].set_title(f"CLS attention, block {layer}", fontsize=7)
        for c, (name, table) in enumerate(extra, start=len(layers)):
            part = table[table["model"] == model].groupby(["row", "col"])["value"].mean().reset_index()
            grid = _grid(part)
            if name == "attribution":  # signed: white is zero
                limit = float(np.abs(grid).max()) or 1.0
                shown = axes[r, c].imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
            else:
                shown = axes[r, c].imshow(grid, cmap="magma")
            figure.colorbar(shown, ax=axes[r, c], fraction=0.046, pad=0.03).ax.tick_params(labelsize=5)
            axes[r, c].set_title(name, fontsize=7)
        axes[r, 0].set_ylabel(model, fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    notes = ["CLS attention: mean over heads and query images"]
    notes += [t["definition"].iloc[0] for _, t in extra if "definition" in t]
    figure.suptitle("; ".join(notes), fontsize=7, wrap=True)
    figure.tight_layout()
    return figure


def feature_view(table: pd.DataFrame) -> plt.Figure:
    """Image features of every domain in two dimensions, one colour per domain.

    Args:
        table: one row per image: ``domain``, ``x``, ``y``, ``method`` ('pca' or 'tsne'), and for
            PCA ``explained_variance`` (fraction of variance of the two components).
    """
    _require(table, {"domain", "x", "y", "method"}, "feature_view")
    figure, ax = plt.subplots(figsize=(5.5, 4.5))
    domains = list(dict.fromkeys(table["domain"]))
    for domain, colour in zip(domains, sns.color_palette(n_colors=len(domains))):
        part = table[table["domain"] == domain]
        ax.scatter(part["x"], part["y"], s=8, alpha=0.6, color=colour, label=_short(domain))
    method = table["method"].iloc[0]
    note = f", {100 * table['explained_variance'].iloc[0]:.0f}% of the variance" if "explained_variance" in table else ""
    ax.set_title(f"Final image features, {method.upper()} fitted on all domains{note}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points
    figure.tight_layout()
    return figure


TOKEN_MAP_TITLES = {
    "sum_score": "Sum score m", "tir_weight": "TIR weight w(m)", "norm": "token norm",
    "max_similarity": "max class cosine", "head_tail": "ATHA head (+1) / tail (-1)",
    "pulled_class": "class pulled toward", "pushed_class": "class pushed from",
    "attention_from_cls": "attention from CLS", "attention_mean": "attention, mean query",
    "edit": "intervention edit / |x|",
}


def _token_map_scale(quantity: str, low: float, high: float) -> tuple[Any, float, float]:
    """A token map's colour map and range: categories for the classes ATHA pulls to and pushes
    from, three levels for head / tail, two for a sink flag, and ``low``..``high`` otherwise."""
    if quantity in ("pulled_class", "pushed_class"):
        return plt.get_cmap("tab10", int(high) + 1), -0.5, int(high) + 0.5
    if quantity == "head_tail":
        return plt.get_cmap("coolwarm", 3), -1.5, 1.5
    if quantity.startswith("sink:"):  # a flag: 0 or 1, whatever the images hold
        return plt.get_cmap("magma", 2), -0.5, 1.5
    return "magma", low, high


def _token_map_bar(figure: plt.Figure, shown: Any, axes: list, quantity: str) -> None:
    """One colour bar under a column of token maps, its ticks named for categorical quantities."""
    bar = figure.colorbar(shown, ax=axes, orientation="horizontal", fraction=0.04, pad=0.02)
    bar.ax.tick_params(labelsize=6)
    if quantity == "head_tail":
        bar.set_ticks([-1, 0, 1], labels=["tail", "-", "head"])
    elif quantity.startswith("sink:"):
        bar.set_ticks([0, 1], labels=["-", "flagged"])


def token_maps(table: pd.DataFrame, pixels: np.ndarray | Mapping[object, np.ndarray], block: int,
               quantities: Sequence[str] = ("sum_score", "norm", "head_tail", "attention_from_cls"),
               images: Sequence[object] | None = None, models: Sequence[str] | None = None,
               mark: str | None = "sink:high-norm", alpha: float = 0.65) -> plt.Figure:
    """Each image beside its token maps: one row per (image, model), the image in the first column,
    then each quantity laid on the image's patch grid over the pixels (aligned: patch (row, col)
    covers the same pixels as its map cell). A quantity's colour scale is shared by all its panels
    (one colour bar per column), so pretrained and fine-tuned maps compare; tokens flagged by
    ``mark`` (a ``sink:<definition>`` quantity of the table) are framed.

    Args:
        table: a token-map table (:func:`analysis.token_maps.token_maps`): ``image``, ``row``,
            ``col``, ``block``, ``model``, ``quantity``, ``value``.
        pixels: RGB images in [0, 1], shape ``(n, H, W, 3)``, indexed by the table's image ids (a sequence when
            the ids are 0..n-1, or a mapping id -> image), e.g. :func:`analysis.token_maps.display_images`.
        block: the vision block to draw.
        quantities: the columns after the image.
        images: which images (default: up to 3).
        models: which models (default: every model).
    """
    _require(table, {"image", "row", "col", "block", "model", "quantity", "value"}, "token_maps")
    part = table[table["block"] == block]
    if part.empty:
        raise ValueError(f"block {block} is not in the token-map table (blocks {sorted(table['block'].unique())}).")
    missing = [q for q in quantities if q not in set(part["quantity"])]
    if missing:
        raise ValueError(f"quantities {missing} are not in the token-map table; it has {sorted(set(part['quantity']))}.")
    images = list(dict.fromkeys(part["image"]))[:3] if images is None else list(images)
    models = list(dict.fromkeys(part["model"])) if models is None else list(models)
    side = int(part["row"].max()) + 1
    rows = [(image, model) for image in images for model in models]
    cols = 1 + len(quantities)
    figure, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols + 0.6, 1.9 * len(rows) + 0.9), squeeze=False,
                             layout="constrained")
    limits = {}
    for quantity in quantities:
        values = part[(part["quantity"] == quantity) & part["image"].isin(images) & part["model"].isin(models)]["value"]
        low, high = float(values.min()), float(values.max())
        limits[quantity] = (low, high if high > low else low + 1e-9)
    for r, (image, model) in enumerate(rows):
        picture = pixels[image]
        height, width = picture.shape[:2]
        extent = (0, width, height, 0)
        axes[r, 0].imshow(picture, extent=extent)
        axes[r, 0].set_ylabel(f"image {image}\n{model}", fontsize=7)
        cells = part[(part["image"] == image) & (part["model"] == model)]
        flagged = cells[cells["quantity"] == mark] if mark else cells.iloc[:0]
        for c, quantity in enumerate(quantities, start=1):
            ax = axes[r, c]
            ax.imshow(picture.mean(axis=-1), cmap="gray", extent=extent, vmin=0, vmax=1)
            grid = np.full((side, side), np.nan)
            values = cells[cells["quantity"] == quantity]
            grid[values["row"].to_numpy(int), values["col"].to_numpy(int)] = values["value"].to_numpy()
            cmap, low, high = _token_map_scale(quantity, *limits[quantity])
            shown = ax.imshow(grid, cmap=cmap, vmin=low, vmax=high, alpha=alpha, extent=extent,
                              interpolation="nearest")
            for _, cell in flagged[flagged["value"] > 0].iterrows():
                ax.add_patch(plt.Rectangle((cell["col"] * width / side, cell["row"] * height / side), width / side,
                                           height / side, fill=False, edgecolor="cyan", linewidth=1.2))
            if r == 0:
                ax.set_title(TOKEN_MAP_TITLES.get(quantity, quantity), fontsize=7)
            if r == len(rows) - 1:
                _token_map_bar(figure, shown, axes[:, c].tolist(), quantity)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=7)
    framed = f"; framed: tokens flagged {mark.removeprefix('sink:')}" if mark else ""
    figure.suptitle(f"Token maps at vision block {block} ({side} x {side} patches){framed}", fontsize=9)
    return figure


INTERVENTION_STATISTICS = ("alpha", "beta", "head_edit", "tail_edit", "token_norm", "head_vector_norm",
                           "tail_vector_norm")
TRAJECTORY_TITLES = {
    "accuracy": "query accuracy", "sinks:sum-all": "m = N tokens per image (sum-all)",
    "sinks:high-norm": "high-norm tokens per image", "sinks:attention-mass": "attention-mass tokens per image",
    "sinks:massive-activation": "massive-activation tokens per image", "head_cut": "ATHA head cut (cosine)",
    "tail_cut": "ATHA tail cut (cosine)", "alpha": "alpha (mean over blocks)", "beta": "beta (mean over blocks)",
    "head_edit": "head edit / |x| (mean over blocks)", "tail_edit": "tail edit / |x| (mean over blocks)",
}


def trajectories(table: pd.DataFrame, statistics: Sequence[str] | None = None, block: int | None = None) -> plt.Figure:
    """Each statistic of a fine-tuning trajectory against the training step: one panel per
    statistic, one line per method, mean over episodes with a 95% CI band (the project's CI).
    Token statistics are drawn at one vision ``block`` (default: the last measured); what the
    intervention reports of itself (ATHA's strengths and edits) as its mean over blocks.

    Args:
        table: :func:`analysis.trajectory.trajectory_table` rows (``episode``, ``step``, ``statistic``,
            ``block``, ``value``) with a ``method`` column (several runs), else one line.
        statistics: the panels (default: accuracy, the sink counts, the m = N norm, the head/tail
            cuts, and the intervention's strengths when present).
    """
    _require(table, {"episode", "step", "statistic", "block", "value"}, "trajectories")
    table = table.assign(method=table["method"] if "method" in table else "run")
    blocks = sorted(int(b) for b in table["block"].dropna().unique())
    present = set(table["statistic"])
    if block is None and blocks:
        block = blocks[-1]
    if statistics is None:
        n_top = max((int(s.split("=")[1]) for s in present if s.startswith("norm:m=")), default=None)
        statistics = [s for s in ("accuracy", "sinks:sum-all", "sinks:high-norm", "sinks:attention-mass",
                                  f"norm:m={n_top}", "head_cut", "alpha", "beta") if s in present]
    missing = [s for s in statistics if s not in present]
    if missing:
        raise ValueError(f"statistics {missing} are not in the trajectory table; it has {sorted(present)}.")
    palette = _palette(table["method"])
    cols = min(4, len(statistics))
    rows = -(-len(statistics) // cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.4, 2.8 * rows + 0.8), squeeze=False,
                                layout="constrained")
    for ax, statistic in zip(axes.flat, statistics):
        part = table[table["statistic"] == statistic]
        if statistic in INTERVENTION_STATISTICS:
            part = part.groupby(["method", "episode", "step"], as_index=False)["value"].mean()
        elif part["block"].notna().any():
            part = part[part["block"] == block]
        for method, colour in palette.items():
            line = part[part["method"] == method].groupby("step")["value"].agg(["mean", _ci95, "count"]).reset_index()
            if line.empty:
                continue
            ax.plot(line["step"], line["mean"], "o-", color=colour, markersize=3, label=method)
            band = line["_ci95"].fillna(0)
            ax.fill_between(line["step"], line["mean"] - band, line["mean"] + band, color=colour, alpha=0.2,
                            linewidth=0)
        if part["value"].isna().all():
            ax.text(0.5, 0.5, "no tokens in this bucket\nat any step", transform=ax.transAxes, ha="center",
                    va="center", fontsize=8, color="grey")
        steps = sorted(table["step"].unique())
        if len(steps) <= 8:
            ax.set_xticks(steps)  # the measured steps
        else:
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        title = TRAJECTORY_TITLES.get(statistic, statistic)
        if statistic.startswith("norm:m="):
            title = f"mean norm of m = {statistic.split('=')[1]} tokens"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(statistics):]:
        ax.set_visible(False)
    runs = [c for c in ("domain", "shots") if c in table]  # episodes of several runs are distinct episodes
    episodes = table.drop_duplicates(["method", *runs, "episode"]).groupby("method").size()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, [f"{label} ({episodes[label]} episodes)" for label in labels], loc="outside lower center",
                  ncol=min(4, len(labels)), fontsize=7)
    figure.suptitle(f"Fine-tuning trajectories on each episode's queries: mean and 95% CI over episodes; token "
                    f"statistics at vision block {block}", fontsize=9)
    return figure


def ablation_effects(summary: pd.DataFrame, statistic: str = "d_margin") -> plt.Figure:
    """What ablating each token set does, beside its random control of the same size: one panel per
    model, one pair of bars per set (the set's mean effect and its control's, with 95% CIs over
    episodes); a set matters only where its bar leaves its control's behind.

    Args:
        summary: :func:`analysis.causal.summarize_effects` rows: ``model``, ``set``, ``statistic``,
            ``set_effect``, ``set_ci95``, ``control_effect``, ``control_ci95``, ``tokens``, ``episodes``.
        statistic: ``d_margin`` (true-class margin) or ``d_accuracy``.
    """
    _require(summary, {"model", "set", "statistic", "set_effect", "set_ci95", "control_effect", "control_ci95",
                       "tokens"}, "ablation_effects")
    table = summary[summary["statistic"] == statistic]
    models = list(dict.fromkeys(table["model"]))
    sets = list(dict.fromkeys(table["set"]))
    figure, axes = plt.subplots(1, len(models), figsize=(0.9 * len(sets) * len(models) + 2.5, 3.6), squeeze=False,
                                sharey=True)
    x = np.arange(len(sets))
    for ax, model in zip(axes[0], models):
        part = table[table["model"] == model].set_index("set").reindex(sets)
        ax.bar(x - 0.2, part["set_effect"], 0.4, yerr=part["set_ci95"].fillna(0), capsize=2, color="crimson",
               label="the set")
        ax.bar(x + 0.2, part["control_effect"], 0.4, yerr=part["control_ci95"].fillna(0), capsize=2, color="grey",
               label="random control, same size")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, [f"{name}\n({tokens:.1f})" for name, tokens in zip(sets, part["tokens"].fillna(0))],
                      fontsize=7, rotation=20)
        ax.set_title(model, fontsize=9)
    unit = "true-class margin" if statistic == "d_margin" else "accuracy"
    axes[0, 0].set_ylabel(f"change of the {unit}")
    first = table.iloc[0] if len(table) else None
    where = f" entering block {int(first['block'])}, replaced by {first['ablation']}" if first is not None and \
        "block" in table and "ablation" in table else ""
    episodes = int(table["episodes"].max()) if "episodes" in table and len(table) else 0
    figure.suptitle(f"Token ablation{where}: each set beside a random set of the same size per image (tokens per "
                    f"image in brackets); bars: 95% CI over {episodes} episodes", fontsize=9, wrap=True)
    figure.tight_layout()
    _legend_below(figure, [axes[0, 0]])
    return figure


def patching(table: pd.DataFrame) -> plt.Figure:
    """Where the fine-tuned model's difference lives: the share of the true-class margin difference
    recovered when one block's output (all tokens, CLS only, patch tokens only) or the classifier
    of model A is taken from model B, mean and 95% CI over episodes, one panel per B.

    Args:
        table: :func:`analysis.causal.patch_effects` rows with ``episode``, ``site``, ``block``,
            ``tokens``, ``recovered`` and ``b`` (the model patched in; optional).
    """
    _require(table, {"site", "block", "tokens", "recovered"}, "patching")
    table = table.assign(b=table["b"] if "b" in table else "B", episode=table["episode"] if "episode" in table else 0)
    models = list(dict.fromkeys(table["b"]))
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 0.6, 3.4), squeeze=False, sharey=True)
    styles = {"all": ("o-", "black"), "cls": ("s--", "tab:blue"), "patches": ("^:", "tab:orange")}
    for ax, model in zip(axes[0], models):
        part = table[(table["b"] == model) & (table["site"] == "block output")]
        for tokens in dict.fromkeys(part["tokens"]):
            stats = part[part["tokens"] == tokens].groupby("block")["recovered"].agg(["mean", _ci95]).reset_index()
            fmt, colour = styles.get(tokens, ("o-", None))
            ax.errorbar(stats["block"], stats["mean"], yerr=stats["_ci95"].fillna(0), fmt=fmt, color=colour, capsize=2,
                        markersize=4, label=f"block output: {tokens}")
        text = table[(table["b"] == model) & (table["site"] == "text")]["recovered"]
        if len(text):
            ax.axhline(text.mean(), color="tab:green", linestyle="-.", linewidth=1, label="classifier (text) only")
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"A <- {model}", fontsize=9)
        ax.set_xlabel("vision block patched")
    _integer_blocks(axes[0])
    axes[0, 0].set_ylabel("share of the margin difference recovered")
    a = table["a"].iloc[0] if "a" in table else "A"
    figure.suptitle(f"Activation patching: {a} with one part taken from the fine-tuned model; 1 = all of the "
                    "difference in the true-class margin, 0 = none; bars: 95% CI over episodes", fontsize=9, wrap=True)
    figure.tight_layout()
    _legend_below(figure, [axes[0, 0]])
    return figure


def logit_attribution(summary: pd.DataFrame, value: str = "to_margin") -> plt.Figure:
    """Direct logit attribution per block and head: each attention head's (and each block's MLP's)
    mean contribution to the true class against the other classes, one heat map per model on one
    symmetric colour scale (red pushes toward the true class, blue away).

    Args:
        summary: :func:`analysis.run_causal.attribution_summary` rows: ``model``, ``component``,
            ``block``, ``head``, ``to_true``, ``to_margin`` (several episodes are averaged).
        value: ``to_margin`` (true class minus the mean of the others) or ``to_true``.
    """
    _require(summary, {"model", "component", "block", "head", value}, "logit_attribution")
    models = list(dict.fromkeys(summary["model"]))
    heads = summary[summary["component"] == "attention"]
    n_heads = int(heads["head"].max()) + 1
    blocks = sorted(int(b) for b in heads["block"].unique())
    grids = {}
    for model in models:
        grid = np.full((len(blocks), n_heads + 1), np.nan)
        part = summary[summary["model"] == model]
        attention = part[part["component"] == "attention"].groupby(["block", "head"])[value].mean()
        for (block, head), v in attention.items():
            grid[blocks.index(int(block)), int(head)] = v
        mlp = part[part["component"] == "mlp"].groupby("block")[value].mean()
        for block, v in mlp.items():
            grid[blocks.index(int(block)), n_heads] = v
        grids[model] = grid
    limit = max(float(np.nanmax(np.abs(g))) for g in grids.values()) or 1.0
    figure, axes = plt.subplots(1, len(models), figsize=(0.55 * (n_heads + 1) * len(models) + 2.2, 0.45 * len(blocks) + 1.8),
                                squeeze=False, layout="constrained")
    for ax, model in zip(axes[0], models):
        shown = ax.imshow(grids[model], cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.grid(False)
        ax.set_xticks(range(n_heads + 1), [f"h{h}" for h in range(n_heads)] + ["MLP"], fontsize=7)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("attention head (and the block's MLP)", fontsize=8)
    axes[0, 0].set_ylabel("vision block", fontsize=8)
    figure.colorbar(shown, ax=axes[0].tolist(), shrink=0.8).set_label(
        "logit contribution" + (": true class - mean of others" if value == "to_margin" else ": true class"), fontsize=7)
    figure.suptitle("Direct logit attribution of the CLS token (ln_post's scale frozen per image): mean over query "
                    "images", fontsize=9)
    return figure


ORGANISM_PANELS = ("zero_shot", "text_cosine", "high_norm", "max_over_median", "high_norm_low_info",
                   "high_norm_attention", "massive", "simple_tokens", "register_norm", "register_attention")


def organism_emergence(summary: pd.DataFrame, statistics: Sequence[str] = ORGANISM_PANELS) -> plt.Figure:
    """The model-organism statistics against the pretraining step, one panel per statistic, one
    colour per run; the source thick with markers, the four targets thin.

    Args:
        summary: :func:`analysis.organism.summary` rows (``run``, ``step``, ``domain``, ``statistic``,
            ``value``): per-block statistics already reduced (the block where a phenomenon is
            strongest; simple tokens at TIR's blocks). Dashed lines: the independence rate of simple
            tokens (``simple_tokens_chance``) and the chance share 0.5 of low-information patches,
            or, where the summary has a ``gaussian`` column, each statistic's Gaussian null (its mean
            over domains).
    """
    _require(summary, {"run", "step", "domain", "statistic", "value"}, "organism_emergence")
    present = set(summary["statistic"])
    shown = [s for s in statistics if s in present]
    columns = 3
    rows = max(1, (len(shown) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    runs = list(dict.fromkeys(summary["run"]))
    colours = _palette(runs)
    for ax, statistic in zip(axes.flat, shown):
        part = summary[summary["statistic"] == statistic]
        for (run, domain), line in part.groupby(["run", "domain"], sort=False):
            line = line.sort_values("step")
            source = domain in ("synthetic", "synthetic-organism")
            ax.plot(line["step"], line["value"], marker="o" if source else None, lw=2 if source else 0.8,
                    alpha=1 if source else 0.5, color=colours[run], label=run if source else None)
        if "gaussian" in part and part["gaussian"].notna().any():  # the structureless null
            ax.axhline(float(part["gaussian"].mean()), color="grey", ls="--", lw=0.8)
        elif statistic == "simple_tokens" and "simple_tokens_chance" in present:
            chance = summary[summary["statistic"] == "simple_tokens_chance"]["value"].iloc[0]
            ax.axhline(float(chance), color="grey", ls="--", lw=0.8)
        elif statistic == "high_norm_low_info":
            ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_title(statistic.replace("_", " "), fontsize=10)
        ax.set_xlabel("pretraining step")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    _legend_below(figure, list(axes.flat[:len(shown)]), title="run")
    figure.suptitle("emergence over pretraining (thick: source, thin: targets; per-block statistics at the "
                    "block where largest, simple tokens at TIR's blocks; dashed: the Gaussian null or chance)", fontsize=9)
    return figure
