"""What a study looks at inside the models: every token diagnostic, the positive controls, what
each intervention reports of itself, and paired CKA between pretrained and fine-tuned models."""

from __future__ import annotations

import pandas as pd
import torch

from analysis.cka import cka
from analysis.features import layer_features
from analysis.run_diagnostics import diagnose_run
from analysis.study import runs
from analysis.study.context import StudyContext
from analysis.token_maps import balanced_indices, display_images
from analysis.trajectory import trajectory_table
from cdfsl_core.config import RunConfig
from cdfsl_core.preprocess import load_images, protocol_transform
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.runner import load_episode, load_run
from cdfsl_core.towers import vision_tower

__all__ = ["CAUSAL_TABLES", "TABLES", "causal", "cka_finetuned", "controls", "diagnostics", "intervention_stats",
           "register_control", "register_neurons", "token_map_pixels", "trajectories"]

TABLES = ("norms", "sinks", "head_tail", "attention", "rollout", "attribution", "token_maps")


def diagnostics(study: StudyContext) -> dict[str, pd.DataFrame]:
    """Every token diagnostic of episode 0 at ``diagnose_shots``: the pretrained model once per
    target, and each fine-tuned method rebuilt from its saved state; into ``diagnostics/``."""
    def make() -> dict[str, pd.DataFrame]:
        shots = study.grid.diagnose_shots
        runs.run_grid(study, study.fine_tuned, (shots,))
        parts: dict[str, list[pd.DataFrame]] = {}
        for target in study.data.targets:
            for i, label in enumerate(study.fine_tuned):
                tables = diagnose_run(study.run_folder(target, shots, label), [0], analysis=study.analysis,
                                      pretrained=i == 0, model_label=label, bundle=study.bundle)
                for name, table in tables.items():
                    parts.setdefault(name, []).append(table)
        return {name: pd.concat(items, ignore_index=True) for name, items in parts.items()}
    return study.cached_tables("diagnostics", TABLES, make)


def controls(study: StudyContext, layer: int | None = None, images: int | None = None) -> pd.DataFrame:
    """Positive controls beside the real model: sink tokens per image at ``layer`` (default: the
    middle block) of the pretrained model on the query images (the first ``images``; None: all) of
    the first target's episode 0 at ``diagnose_shots``, with that episode's classes: the images and
    classes of the diagnostics' pretrained model, so the unplanted row equals the ``sink_counts``
    pretrained line of that target at that block, without a plant and with each artefact of
    :mod:`analysis.controls` planted into patch token 0; per (plant, definition) ``mean_count``,
    ``planted_token_found`` (share of images whose planted token the definition flags) and
    ``found_by`` (the definition meant to find the plant)."""
    def make() -> pd.DataFrame:
        from analysis.controls import PLANTS, Plant, planted
        from analysis.diagnostics import TokenDiagnostics
        from analysis.recorder import record
        from analysis.sinks import sink_spec
        from cdfsl_core.methods import create_method

        target, shots = study.data.targets[0], study.grid.diagnose_shots
        label = study.fine_tuned[0] if study.fine_tuned else study.grid.methods[0][0]
        runs.run_grid(study, [label], (shots,))
        config, bundle, dataset, episodes = load_run(study.run_folder(target, shots, label), study.bundle)
        episode = episodes.episodes[0]
        batch = load_images(dataset, episode.query_ids[:images], protocol_transform(bundle, config.train.resize_ratio))
        method = create_method(study.bundle, episodes.class_names(episode), "zeroshot", "none").eval()
        with torch.no_grad():
            _, readout = method.text_features(readout=True)
        block = vision_tower(study.bundle.model).n_blocks // 2 if layer is None else layer
        rows = []
        for kind in ("none", *PLANTS):
            plants = [] if kind == "none" else [Plant(kind, block, token=0)]
            diagnostics = TokenDiagnostics.from_config(study.bundle.model.visual, readout, [block],
                                                       study.analysis, "none")
            with planted(method, plants, text=readout), record(method, layers=[block]) as cache, torch.no_grad():
                method.encode_image(batch.to(readout.device), readout)
            diagnostics.update(cache)
            masks = diagnostics.sink_masks(cache)[block]
            for _, row in diagnostics.tables()["sinks"].iterrows():
                found = float(masks[row["definition"]][:, 0].float().mean()) if plants else float("nan")
                rows.append({"plant": kind, "planted_per_image": len(plants), "definition": row["definition"],
                             "label": row["label"], "layer": block, "images": row["images"],
                             "mean_count": row["mean_count"], "planted_token_found": found,
                             "found_by": sink_spec(row["definition"]).plant == kind, "dataset": target,
                             "episode": 0, "model": "pretrained", **study.analysis.columns()})
        return pd.DataFrame(rows)
    return study.cached("diagnostics/controls.csv", make)


def intervention_stats(study: StudyContext) -> pd.DataFrame:
    """What every intervention reported of itself, from the runs' episode lines: one row per
    (method, domain, shots, episode, block, stage), stage ``init`` (before training) or
    ``trained``, with the per-block statistics of its ``measuring()`` (ATHA: alpha, beta, token and
    class-vector norms, the relative edits), measured on the episode's queries."""
    def make() -> pd.DataFrame:
        labels = [label for label, _, intervention in study.grid.methods if intervention != "none"]
        runs.run_grid(study, labels)
        return pd.DataFrame(_intervention_rows(study, labels))
    return study.cached("intervention_stats.csv", make)


def _intervention_rows(study: StudyContext, labels: list[str]) -> list[dict]:
    rows = []
    for label, _, intervention in study.grid.methods:
        if label not in labels:
            continue
        for target in study.data.targets:
            for k in study.grid.shots:
                folder = study.run_folder(target, k, label)
                run_folder = RunFolder(folder)
                config = RunConfig.from_dict(run_folder.config_dict())
                settings = {f"setting_{key}": value for key, value in vars(config.method.settings()).items()
                            if isinstance(value, (int, float, str, bool)) or value is None}
                for row in run_folder.lines()[0]:
                    for stage, blocks in row.get("intervention_stats", {}).items():
                        for block, stats in blocks.items():
                            rows.append({"method": label, "intervention": intervention, "domain": target, "shots": k,
                                         "episode": row["episode"], "block": int(block), "stage": stage, **stats,
                                         **settings})
    return rows


def cka_finetuned(study: StudyContext) -> pd.DataFrame:
    """Linear CKA per layer between the pretrained and each fine-tuned model of episode 0 on the
    episode's query images (paired, biased estimator: Kornblith et al.'s for models)."""
    def make() -> pd.DataFrame:
        runs.run_grid(study, study.fine_tuned, (study.grid.diagnose_shots,))
        rows = []
        for target in study.data.targets:
            for label in study.fine_tuned:
                folder = study.run_folder(target, study.grid.diagnose_shots, label)
                episode = load_episode(folder, 0, study.bundle)
                method, query = episode.method, episode.query
                before = layer_features(method, images=query)
                episode.fine_tune(retrain=False)
                after = layer_features(method, images=query)
                for layer in before:
                    rows.append({"target": target, "method": label, "layer": layer, "images": len(query),
                                 "cka": cka(before[layer], after[layer], "linear", "biased"),
                                 "kernel": "linear", "estimator": "biased", "pool": "cls"})
        return pd.DataFrame(rows)
    return study.cached("cka_finetuned.csv", make)


def register_neurons(study: StudyContext) -> pd.DataFrame:
    """The register neurons (:func:`cdfsl_core.interventions.find_register_neurons`, the
    test-time register's default settings) of the pretrained model and of each fine-tuned model
    of episode 0 at ``diagnose_shots`` (its LoRA weights, no intervention), on that episode's
    query images of every target: one row per (target, model, rank) with the neuron's block,
    index and score, and how many images had an outlier token; a model with none has one row
    with ``found`` False."""
    def make() -> pd.DataFrame:
        from cdfsl_core.config import TestTimeRegisterConfig
        from cdfsl_core.interventions import find_register_neurons

        settings = TestTimeRegisterConfig()
        runs.run_grid(study, study.fine_tuned, (study.grid.diagnose_shots,))
        rows = []
        for target in study.data.targets:
            for i, label in enumerate(study.fine_tuned):
                folder = study.run_folder(target, study.grid.diagnose_shots, label)
                episode = load_episode(folder, 0, study.bundle)
                method, query = episode.method, episode.query
                models = [("pretrained", False)] if i == 0 else []
                for model, fine_tuned in models + [(label, True)]:
                    if fine_tuned:
                        episode.fine_tune(retrain=False)
                    with torch.no_grad(), method.adapted():
                        found = find_register_neurons(
                            method.model, list(query.split(32)), top_k=settings.top_k,
                            highest_block=settings.highest_block, outlier_block=settings.outlier_block,
                            tau=settings.outlier_tau)
                    common = {"target": target, "model": model, "candidate_blocks": int(found.scores.shape[0]),
                              "images": found.images,
                              "images_with_outliers": found.images_with_outliers,
                              "outliers_per_image": found.outliers_per_image, "tau": settings.outlier_tau}
                    if not found.neurons:
                        rows.append({**common, "found": False, "rank": None, "block": None, "neuron": None,
                                     "score": None})
                    for rank, (block, neuron) in enumerate(found.neurons):
                        rows.append({**common, "found": True, "rank": rank, "block": block, "neuron": neuron,
                                     "score": found.score(block, neuron)})
        return pd.DataFrame(rows)
    return study.cached("register_neurons.csv", make)


def register_control(study: StudyContext, images: int = 8) -> tuple[pd.DataFrame, dict]:
    """The test-time register's positive control on the study's model
    (:func:`analysis.controls.register_neuron_control`) on ``images`` test images of the first
    target."""
    from analysis.controls import register_neuron_control
    from cdfsl_core.interventions.test_time_register import detect_images

    device = study.bundle.model.logit_scale.device
    batch = detect_images(study.bundle.preprocess, study.data.targets[0], images).to(device)
    return register_neuron_control(study.bundle, batch)


def trajectories(study: StudyContext) -> pd.DataFrame:
    """The fine-tuning trajectories of every fine-tuned method at ``diagnose_shots`` (every episode,
    every target): :func:`analysis.trajectory.trajectory_table` rows with ``method``, ``domain`` and
    ``shots``; ``trajectories.csv``."""
    def make() -> pd.DataFrame:
        shots = study.grid.diagnose_shots
        runs.run_grid(study, study.fine_tuned, (shots,))
        parts = [trajectory_table(study.run_folder(target, shots, label), method=label, domain=target, shots=shots)
                 for label in study.fine_tuned for target in study.data.targets]
        return pd.concat(parts, ignore_index=True)
    return study.cached("trajectories.csv", make)


def token_map_pixels(study: StudyContext, target: str) -> dict:
    """The query images of episode 0 of ``target`` at ``diagnose_shots`` whose token maps the
    diagnostics keep, as RGB in [0, 1], by the token-map table's ``image`` ids (query positions)."""
    label = study.fine_tuned[0] if study.fine_tuned else study.grid.methods[0][0]
    folder = study.run_folder(target, study.grid.diagnose_shots, label)
    runs.run_grid(study, [label], (study.grid.diagnose_shots,))
    config, bundle, dataset, episodes = load_run(folder, study.bundle)
    episode = episodes.episodes[0]
    positions = balanced_indices(episode.query_labels, max(1, study.analysis.token_map_images))  # as diagnose_model
    shown = [episode.query_ids[i] for i in positions]
    images = load_images(dataset, shown, protocol_transform(bundle, config.train.resize_ratio))  # as the episode saw them
    return dict(zip(positions, display_images(images, bundle)))


CAUSAL_TABLES = ("ablation", "ablation_summary", "patching", "attribution")


def causal(study: StudyContext) -> dict[str, pd.DataFrame]:
    """The causal tools (:mod:`analysis.run_causal`) on the first target's episodes at ``diagnose_shots``,
    for every fine-tuned method: token ablation with random controls at TIR's first block,
    patching the pretrained model with parts of the fine-tuned one, direct logit attribution; the
    pretrained model's rows once. Into ``causal/``."""
    def make() -> dict[str, pd.DataFrame]:
        from analysis.causal import summarize_effects
        from analysis.run_causal import causal_run

        shots, target = study.grid.diagnose_shots, study.data.targets[0]
        runs.run_grid(study, study.fine_tuned, (shots,))
        parts: dict[str, list[pd.DataFrame]] = {}
        for i, label in enumerate(study.fine_tuned):
            folder = study.run_folder(target, shots, label)
            tables = causal_run(folder, range(study.grid.episodes), out=folder / "causal", bundle=study.bundle,
                                patch_tokens=("all", "cls"), label=label, queries=study.grid.causal_queries)
            for name in ("ablation", "attribution", "patching"):
                table = tables[name]
                if i and "model" in table:
                    table = table[table["model"] != "pretrained"]
                parts.setdefault(name, []).append(table.assign(method=label))
        tables = {name: pd.concat(items, ignore_index=True) for name, items in parts.items()}
        tables["ablation_summary"] = pd.concat([summarize_effects(tables["ablation"], value=value)
                                                for value in ("d_margin", "d_accuracy")], ignore_index=True)
        return tables
    return study.cached_tables("causal", CAUSAL_TABLES, make)
