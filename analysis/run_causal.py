"""The causal tools on a finished run: ``python -m analysis.run_causal RUN_FOLDER [--episodes 0 1 2]``.

For each chosen episode, on its query images, with the pretrained model (the episode's method
before training) and the fine-tuned one (from its saved state, or re-trained: the runner's seeding
makes that exact):

- ``ablation.csv``: each token set entering ``--block`` ablated (``--ablation``) and its random
  control of the same size, for both models; ``ablation_summary.csv``: the mean effect on the
  true-class margin and on accuracy of the set and of its control over episodes, and their paired
  difference, with 95% CIs (the project's convention);
- ``patching.csv``: the pretrained model with each block's output (all tokens, CLS only, patch
  tokens only) or the classifier taken from the fine-tuned one, and the share of the margin
  difference it recovers;
- ``attribution.csv``: direct logit attribution per component (embedding, each block's edit,
  attention heads, attention bias, MLP, ``ln_post`` bias), as its mean contribution over the
  queries to the true-class logit and to the margin against the mean of the other classes.

Written into ``RUN_FOLDER/causal/`` (or ``--out``). See :mod:`analysis.causal`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from cdfsl_core.atomic import write_json, write_table
from cdfsl_core.cli import command, non_negative_int, parser
from cdfsl_core.paths import check_settings, check_writable_folder

DEFAULT_SETS = ("sink:high-norm", "sink:attention-mass", "bucket:5", "head", "tail")


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m analysis.run_causal", __doc__)
    result.add_argument("run", help="a run folder written by python -m cdfsl_core.finetune")
    result.add_argument("--episodes", type=non_negative_int, nargs="+", default=[0], help="episode indices")
    result.add_argument("--block", type=non_negative_int, default=None,
                        help="the vision block whose input is ablated (default: TIR's first, round(8n/12))")
    result.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS),
                        help="token sets: sink:<definition>, bucket:<m>, head, tail, all")
    result.add_argument("--ablation", choices=("zero", "mean", "resample"), default="mean", help="what replaces them")
    result.add_argument("--queries", type=non_negative_int, default=0,
                        help="use N query images of each episode, the same number per class (0: all)")
    result.add_argument("--out", type=Path, default=None, help="folder for the tables (default RUN/causal)")
    return result


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments answer here, before PyTorch is imported

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.causal import (  # noqa: E402
    ablation_effects,
    check_set_names,
    logit_attribution,
    patch_effects,
    summarize_effects,
)
from analysis.token_maps import balanced_indices  # noqa: E402
from cdfsl_core.errors import ConfigError  # noqa: E402
from cdfsl_core.runner import load_episode, load_run  # noqa: E402
from cdfsl_core.towers import vision_tower

__all__ = ["attribution_summary", "causal_run", "default_block"]


def default_block(n_blocks: int) -> int:
    """TIR's first block, round(8n / 12): where its weights act."""
    return min(n_blocks - 1, max(1, round(n_blocks * 8 / 12)))


def attribution_summary(table: pd.DataFrame, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Per component (and ``keys``), the mean over images of its contribution to the true-class logit
    (``to_true``) and to the true class minus the mean of the other classes (``to_margin``)."""
    keys = [k for k in keys if k in table]
    per_image = ["image", *keys, "component", "block", "head"]
    true = table[table["true_class"]].groupby(per_image, dropna=False)["value"].sum()
    others = table[~table["true_class"]].groupby(per_image, dropna=False)["value"].mean()
    joined = pd.DataFrame({"to_true": true, "to_margin": true - others}).reset_index()
    return joined.groupby([*keys, "component", "block", "head"], dropna=False, sort=False)[
        ["to_true", "to_margin"]].mean().reset_index()


def causal_run(folder: str | Path, episodes: Sequence[int] = (0,), block: int | None = None,
               sets: Sequence[str] = DEFAULT_SETS, ablation: str = "mean", out: str | Path | None = None,
               bundle: Any = None, patch_tokens: Sequence[str] = ("all", "cls", "patches"),
               label: str | None = None, queries: int = 0) -> dict[str, pd.DataFrame]:
    """Every causal table of a run's ``episodes`` (see the module doc); written into ``out``
    (default ``folder/causal``) and returned. ``label`` names the fine-tuned model (default
    'fine-tuned ADAPTATION/INTERVENTION'); ``queries``: the first N query images of each episode (0: all)."""
    folder = Path(folder)
    target = Path(out) if out is not None else folder / "causal"
    check_writable_folder(target, "--out" if out is not None else "the run's causal folder (pass --out elsewhere)")
    config, bundle, dataset, episode_file = load_run(folder, bundle)
    n_blocks = vision_tower(bundle.model).n_blocks
    block = default_block(n_blocks) if block is None else block
    if not 1 <= block < n_blocks:
        raise ConfigError(f"--block {block}: expected 1..{n_blocks - 1} for this model.")
    check_set_names(sets, config.episodes.n_way)
    for index in episodes:
        if not 0 <= index < len(episode_file):
            raise ConfigError(f"episode {index} out of range: {folder} has episodes 0..{len(episode_file) - 1}.")
    settings = {"run": str(folder.resolve()), "episodes": [int(i) for i in episodes], "block": block,
                "sets": list(sets), "ablation": ablation, "patch_tokens": list(patch_tokens), "queries": queries,
                "label": label}
    check_settings(target / SETTINGS, settings, "causal tables")  # nothing of other settings is replaced
    label = label or f"fine-tuned {config.method.adaptation}/{config.method.intervention}"
    parts: dict[str, list[pd.DataFrame]] = {"ablation": [], "patching": [], "attribution": []}
    loaded = (config, bundle, dataset, episode_file)
    for index in episodes:
        episode = load_episode(folder, index, loaded=loaded)
        before, query, query_labels = episode.method, episode.query, episode.query_labels
        if queries:  # the same number per class
            kept = balanced_indices(query_labels.tolist(), queries)
            query, query_labels = query[kept], query_labels[kept]
        after = load_episode(folder, index, loaded=loaded)
        after.fine_tune()
        after = after.method
        common = {"dataset": config.data.dataset, "episode": index, "queries": len(query)}
        with torch.no_grad():
            for model, method in (("pretrained", before), (label, after)):
                parts["ablation"].append(ablation_effects(method.eval(), query, query_labels, block, sets, ablation,
                                                          seed=index, model=model, **common))
                parts["attribution"].append(attribution_summary(
                    logit_attribution(method, query, query_labels, model=model, **common), ["model", "dataset", "episode"]))
            parts["patching"].append(patch_effects(before, after, query, query_labels, tokens=patch_tokens,
                                                   a="pretrained", b=label, **common))
    tables = {name: pd.concat(items, ignore_index=True) for name, items in parts.items()}
    tables["ablation_summary"] = pd.concat([summarize_effects(tables["ablation"], value=value)
                                            for value in ("d_margin", "d_accuracy")], ignore_index=True)
    for name, table in tables.items():
        write_table(table, target / f"{name}.csv")
    write_json(target / SETTINGS, settings)  # last: the tables beside it are complete
    return tables


SETTINGS = "settings.json"


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tables = causal_run(args.run, args.episodes, args.block, args.sets, args.ablation, args.out, queries=args.queries)
    summary = tables["ablation_summary"]
    margin = summary[summary["statistic"] == "d_margin"]
    print("ablation: change of the true-class margin, set vs its random control (mean +- 95% CI over episodes)")
    for _, row in margin.iterrows():
        print(f"  {row['model']:<32} {row['set']:<22} set {row['set_effect']:+.3f} +- {row['set_ci95']:.3f}   "
              f"control {row['control_effect']:+.3f} +- {row['control_ci95']:.3f}   ({row['tokens']:.1f} tokens)")
    recovered = tables["patching"].groupby(["site", "block", "tokens"], dropna=False, sort=False)["recovered"].mean()
    print("\npatching pretrained <- fine-tuned: share of the margin difference recovered (mean over episodes)")
    print(recovered.round(3).to_string())
    print(f"\ntables: {Path(args.out) if args.out else Path(args.run) / 'causal'}/ ({', '.join(sorted(tables))}.csv)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
