"""Every figure of a study, drawn from its tables (running what is missing)."""

from __future__ import annotations

import os
from pathlib import Path

from analysis import figures as fig
from analysis.domain import DEFAULT_ESTIMATOR
from analysis.study import domains, inside, runs
from analysis.study.context import StudyContext
from cdfsl_core.interventions import build_intervention
from cdfsl_core.towers import vision_tower

__all__ = ["figures", "token_map_figure", "trajectory_figure"]

TOKEN_MAP_QUANTITIES = ("sum_score", "norm", "sink:high-norm", "head_tail", "attention_from_cls", "edit")


def token_map_block(study: StudyContext) -> int:
    """The block token maps show by default: TIR's first (round(8n / 12)), where its weights act."""
    n_blocks = vision_tower(study.bundle.model).n_blocks
    return min(n_blocks - 1, round(n_blocks * 8 / 12))


def token_map_figure(study: StudyContext, target: str | None = None, block: int | None = None,
                     quantities=TOKEN_MAP_QUANTITIES, images=None):
    """Token maps of episode 0's first query images of ``target`` (default: the first), every model
    of the diagnostics side by side (pretrained first), at ``block`` (default: TIR's first block)."""
    target = target or study.data.targets[0]
    table = inside.diagnostics(study)["token_maps"]
    table = table[table["dataset"] == target]
    images = list(dict.fromkeys(table["image"]))[:2] if images is None else images
    return fig.token_maps(table, inside.token_map_pixels(study, target), token_map_block(study) if block is None else block,
                          quantities, images=images)


def trajectory_figure(study: StudyContext, target: str | None = None, statistics=None, block: int | None = None):
    """Every fine-tuned method's trajectory on ``target``'s episodes (default: all targets pooled)."""
    table = inside.trajectories(study)
    if target is not None:
        table = table[table["domain"] == target]
    return fig.trajectories(table, statistics, block)


def figures(study: StudyContext, folder: str | os.PathLike[str] | None = None) -> dict[str, list[Path]]:
    """Run what is missing, then write every figure (PNG and PDF) into ``folder`` (default
    ``out/figures``); returns the paths by figure name. Every intervention that reports
    statistics of itself gets a figure of them, ``<name>_strengths``."""
    import matplotlib.pyplot as plt

    folder = Path(folder) if folder is not None else study.out / "figures"
    episodes = runs.episodes(study)
    summary = runs.accuracy_table(study, episodes)
    tables = inside.diagnostics(study)
    similarity = domains.domain_similarity(study)
    made = {
        "world_samples": lambda: fig.world_samples(domains.samples(study)),
        "feature_view": lambda: fig.feature_view(domains.feature_view(study)),
        "accuracy_by_domain": lambda: fig.accuracy_by_domain(episodes[episodes["status"] == "ok"], domains.similarity(study)),
        "paired_differences": lambda: fig.paired_differences(summary, study.grid.baseline),
        "token_norms_by_bucket": lambda: fig.token_norms_by_bucket(tables["norms"]),
        "sink_counts": lambda: fig.sink_counts(tables["sinks"]),
        "positive_controls": lambda: fig.positive_controls(inside.controls(study)),
        "head_tail_similarity": lambda: fig.head_tail_similarity(tables["head_tail"]),
        "attention_maps": lambda: fig.attention_maps(tables["attention"], tables["rollout"], tables["attribution"]),
        "domain_similarity": lambda: fig.domain_similarity_by_layer(similarity, DEFAULT_ESTIMATOR),
        "domain_estimators": lambda: fig.domain_similarity_by_layer(similarity),
        "cka_finetuned": lambda: fig.cka_finetuned(inside.cka_finetuned(study)),
        "register_neurons": lambda: fig.register_neurons(inside.register_neurons(study)),
        "register_control": lambda: fig.register_control(*inside.register_control(study)),
        "token_maps": lambda: token_map_figure(study),
    }
    if study.grid.trajectory_points:
        made["trajectories"] = lambda: trajectory_figure(study)
    if study.fine_tuned:
        made["ablation_effects"] = lambda: fig.ablation_effects(inside.causal(study)["ablation_summary"])
        made["patching"] = lambda: fig.patching(inside.causal(study)["patching"])
        made["logit_attribution"] = lambda: fig.logit_attribution(inside.causal(study)["attribution"])
    stats = inside.intervention_stats(study) if any(i != "none" for _, _, i in study.grid.methods) else None
    n_blocks = vision_tower(study.bundle.model).n_blocks
    for name in dict.fromkeys(i for _, _, i in study.grid.methods if i != "none"):
        reported = build_intervention(name, n_blocks).reported_statistics
        if reported and stats is not None and (stats["intervention"] == name).any():
            part = stats[stats["intervention"] == name]
            made[f"{name}_strengths"] = lambda part=part, reported=reported, name=name: fig.intervention_strengths(
                part, reported, name)
    paths = {}
    for name, draw in made.items():
        figure = draw()
        paths[name] = fig.save_figure(figure, folder, name)
        plt.close(figure)
    return paths
