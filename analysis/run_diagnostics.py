"""Every diagnostic of a finished run, for the pretrained and the fine-tuned model on the same
query images: ``python -m analysis.run_diagnostics RUN_FOLDER [--episodes 0 1]``.

The fine-tuned model of an episode is rebuilt from the state the runner saved with
``save_states`` (``states/episode_NNNN.safetensors``; for ViT-B/16 about 6 MB an episode, so it
is off by default). Without a saved state the episode is re-trained: the runner seeds every
episode from ``(seed, index)``, so the same episode trains to the same model. Either way the
accuracy recomputed here is checked against the run's own line for the episode, and a mismatch
is reported in the tables (``reproduced``).

Writes, into ``RUN_FOLDER/diagnostics/`` (or ``--out``), one CSV per table: ``norms``, ``sinks``,
``head_tail``, ``attention`` (CLS attention maps, mean over query images, per head and layer),
``rollout``, ``attribution`` (per-patch integrated gradients of the true class, mean over
query images) and ``token_maps`` (every per-token quantity of the first ``--token-map-images``
query images, one per class first, on the patch grid, :mod:`analysis.token_maps`), each labelled with model, dataset, episode and the definitions used.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from analysis.config import add_analysis_arguments, add_sink_arguments, analysis_config  # noqa: F401 (re-exported)
from cdfsl_core.atomic import write_json, write_table
from cdfsl_core.cli import command, non_negative_int, parser
from cdfsl_core.paths import check_settings, check_writable_folder


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m analysis.run_diagnostics", __doc__)
    result.add_argument("run", help="a run folder written by python -m cdfsl_core.finetune")
    result.add_argument("--episodes", type=non_negative_int, nargs="+", default=[0], help="episode indices to diagnose")
    result.add_argument("--out", default=None, help="folder for the tables (None: RUN/diagnostics)")
    add_analysis_arguments(result)
    return result


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments answer here, before PyTorch is imported

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.attention import attention_rollout, cls_attention_maps  # noqa: E402
from analysis.attribution import PatchAttribution  # noqa: E402
from analysis.config import AnalysisConfig  # noqa: E402
from analysis.diagnostics import TokenDiagnostics, model_view  # noqa: E402
from analysis.recorder import record  # noqa: E402
from analysis.token_maps import balanced_indices, token_maps  # noqa: E402
from cdfsl_core.episode_loop import evaluate  # noqa: E402
from cdfsl_core.run_folder import RunFolder  # noqa: E402
from cdfsl_core.runner import load_episode, load_run  # noqa: E402
from cdfsl_core.towers import vision_tower

__all__ = ["diagnose_model", "diagnose_run"]


def _grid_rows(values: torch.Tensor, **labels: Any) -> list[dict[str, Any]]:
    side = values.shape[-1]
    return [{**labels, "row": r, "col": c, "value": float(values[..., r, c])} for r in range(side) for c in range(side)]


@torch.no_grad()
def _record_and_reduce(method: Any, images: torch.Tensor, labels: dict[str, Any], analysis: AnalysisConfig,
                       batch_size: int = 64) -> dict[str, pd.DataFrame]:
    visual = vision_tower(method)
    layers = list(range(visual.n_blocks))
    # every model's tokens are compared with the text read-out the interventions use (METHODS:
    # after text block n - 2), also for a baseline without intervention, so tables compare; class
    # vectors for the head/tail histogram as the intervention builds them, if it says how. A model
    # without class text is measured on its vision side alone (model_view).
    view = model_view(method)
    diagnostics = TokenDiagnostics.from_config(visual, view.readout, layers, analysis, view.text_norm)
    attention_sum = None
    rollout_sum = None
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        with record(method, layers=layers) as cache:
            view.forward(batch)
        diagnostics.update(cache)
        if not visual.has_cls:  # no CLS token: no attention from it, no rollout of its row
            continue
        maps = cls_attention_maps(cache, layers, visual.n_prefix).sum(dim=1)  # [layer, head, g, g]
        rolled = attention_rollout(cache, layers, prefix=visual.n_prefix).sum(dim=0)
        attention_sum = maps if attention_sum is None else attention_sum + maps
        rollout_sum = rolled if rollout_sum is None else rollout_sum + rolled
    n = len(images)
    tables = diagnostics.tables(**labels)
    attention_rows = []
    for li, layer in enumerate(layers if attention_sum is not None else []):
        for head in range(attention_sum.shape[1]):
            attention_rows += _grid_rows(attention_sum[li, head] / n, **labels, layer=layer, head=head,
                                         definition="attention from CLS, mean over query images")
    tables["attention"] = pd.DataFrame(attention_rows)
    tables["rollout"] = pd.DataFrame(_grid_rows(rollout_sum / n, **labels,
                                                definition="attention rollout (residual 0.5), CLS row")
                                     if rollout_sum is not None else [])
    skipped = dict(diagnostics.skipped)
    if not visual.has_cls:
        skipped |= {"attention": "attention from CLS: this tower has no CLS token",
                    "rollout": "the rollout's CLS row: this tower has no CLS token"}
    tables["skipped"] = _skipped_table(skipped, labels)
    return tables


def _skipped_table(skipped: dict[str, str], labels: dict[str, Any]) -> pd.DataFrame:
    """What was not computed for this model, and why: one row each (a vision-only model's tables say
    so in ``skipped.csv`` rather than by being absent)."""
    return pd.DataFrame([{**labels, "quantity": key, "reason": reason} for key, reason in skipped.items()],
                        columns=[*labels, "quantity", "reason"])


def diagnose_model(method: Any, images: torch.Tensor, targets: torch.Tensor | None, labels: dict[str, Any],
                   analysis: AnalysisConfig = AnalysisConfig()) -> dict[str, pd.DataFrame]:
    """All tables for one model on ``images`` [n, 3, H, W] (true classes ``targets`` [n], or None);
    every row carries ``labels`` and the analysis settings (``analysis_*`` columns). ``method`` is
    a :class:`~cdfsl_core.methods.FewShotCLIP`, or a model without class text (a vision tower,
    DINOv2 with registers): then what needs text (the Sum score and ``sum-all``, head/tail,
    attribution of a class logit) is listed in the ``skipped`` table instead."""
    method.eval()
    tables = _record_and_reduce(method, images, labels, analysis)
    steps = analysis.attribution_steps
    if hasattr(method, "text_features") and targets is not None:
        attribution = PatchAttribution(method, n_steps=steps)(images, target=targets).mean(dim=0)  # [grid, grid]
        tables["attribution"] = pd.DataFrame(_grid_rows(
            attribution, **labels, definition=f"integrated gradients ({steps} steps) of the true-class logit "
            "w.r.t. patch embeddings, summed over channels, mean over query images"))
    else:
        tables["skipped"] = pd.concat([tables["skipped"], _skipped_table(
            {"attribution": "integrated gradients of the true-class logit need class text and labels"}, labels)],
            ignore_index=True)
    if analysis.token_map_images:
        shown = (balanced_indices(targets.tolist(), analysis.token_map_images) if targets is not None
                 else list(range(min(len(images), analysis.token_map_images))))  # one per class first
        others = {key: value for key, value in labels.items() if key != "model"}
        tables["token_maps"] = token_maps(method, images[shown], analysis=analysis, model=labels.get("model", "model"),
                                          image_ids=shown, **others)
    if tables["skipped"].empty:  # a FewShotCLIP's tables: nothing left out
        del tables["skipped"]
    for table in tables.values():
        for column, value in analysis.columns().items():
            table[column] = value
    return tables


def diagnose_run(folder: str | Path, episodes: Sequence[int] = (0,), out: str | Path | None = None,
                 analysis: AnalysisConfig = AnalysisConfig(), pretrained: bool = True,
                 model_label: str | None = None, bundle: Any = None) -> dict[str, pd.DataFrame]:
    """Diagnose the pretrained (unless ``pretrained=False``) and the fine-tuned model of each
    chosen episode of a run ('pretrained' is the episode's model before training: with ATHA,
    its initial strengths already act); the fine-tuned model is labelled ``model_label`` (default
    'fine-tuned ADAPTATION/INTERVENTION'). ``bundle``: an already loaded model of the run (a study
    passes its own; methods built on it are independent)."""
    folder = Path(folder)
    target = Path(out) if out is not None else RunFolder(folder).diagnostics
    settings = json.loads(json.dumps({"run": str(folder.resolve()), "episodes": [int(i) for i in episodes],
                                      "pretrained": pretrained, "model_label": model_label, **asdict(analysis)}))
    check_settings(target / SETTINGS, settings, "diagnostics tables")
    check_writable_folder(target, "--out" if out is not None else "the run's diagnostics folder (pass --out elsewhere)")
    config, bundle, dataset, episode_file = load_run(folder, bundle)
    recorded = RunFolder(folder).finished()  # tolerant of a torn last line
    method_label = f"{config.method.adaptation}/{config.method.intervention}"
    collected: dict[str, list[pd.DataFrame]] = {}
    method = None
    for index in episodes:
        episode = load_episode(folder, index, method=method, loaded=(config, bundle, dataset, episode_file))
        method, query, query_labels = episode.method, episode.query, episode.query_labels
        common = {"dataset": config.data.dataset, "episode": index}
        before = diagnose_model(method, query, query_labels, {**common, "model": "pretrained"}, analysis) \
            if pretrained else {}
        source = episode.fine_tune()
        accuracy = evaluate(method, query, query_labels, config.train.eval_batch_size, config.model.precision)
        expected = recorded.get(index, {}).get("accuracy")
        after = diagnose_model(method, query, query_labels,
                               {**common, "model": model_label or f"fine-tuned {method_label}"}, analysis)
        for name in after:
            tables_of = [before[name], after[name]] if pretrained else [after[name]]
            for table in tables_of:
                table["recomputed_accuracy"] = accuracy
                table["recorded_accuracy"] = expected
                table["reproduced"] = expected is None or abs(accuracy - expected) < 1e-9
                table["fine_tuned_from"] = source
            collected.setdefault(name, []).extend(tables_of)
    tables = {name: pd.concat(parts, ignore_index=True) for name, parts in collected.items()}
    for name, table in tables.items():
        write_table(table, target / f"{name}.csv")
    write_json(target / SETTINGS, settings)  # last: the tables beside it are complete
    return tables


SETTINGS = "settings.json"


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    analysis = analysis_config(args)
    tables = diagnose_run(args.run, args.episodes, args.out, analysis)
    sinks = tables["sinks"].groupby(["model", "definition"])["mean_count"].mean().unstack()
    print("mean sink tokens per image (over layers):")
    print(sinks.to_string())
    print(f"\ntables: {Path(args.out) if args.out else Path(args.run) / 'diagnostics'}/ "
          f"({', '.join(sorted(tables))}.csv)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
