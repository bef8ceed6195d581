"""Is the embedded CLIP a model organism? ``python -m analysis.organism RUN [RUN ...] --out FOLDER``.

Measures, with the suite's own detectors, the statistics that say whether the phenomena of the
papers (TIR's simple tokens, high-norm attention sinks, massive activations, CLIP's text geometry)
exist in a model, at every checkpoint a pretraining run saved, so that their emergence can be
drawn. ``RUN`` is a folder ``python -m cdfsl_core.pretrain --out RUN`` wrote (its
``pretrain_config.json`` names the architecture; ``checkpoints/step_*.safetensors`` are measured
in step order), or ``ARCH=WEIGHTS`` for one model (``cdfsl-synth-vit=synthetic``: the shipped
model under its tag). Every model sees the same images: held-out (``test`` split) images of the
source and of each target, ``--subsets`` random 5-class subsets per domain with ``--per-class``
images of each class.

Statistics (``organism.csv``: one row per run, step, domain, block and statistic; blocks are the
vision blocks' outputs, the residual stream the sink detectors see):

``zero_shot``           64-way zero-shot accuracy on 2 held-out source images per class (source only)
``text_cosine``         mean pairwise cosine of the domain's class prompts ("a photo of a {}.")
``simple_tokens``       tokens per image with Sum score m = N (in the top floor(rho L) of all N = 5
                        classes of the image's subset, TIR's simple tokens), read out by the tower
``simple_tokens_chance`` rho^N L: what independent rankings would give
``high_norm``           patch tokens per image with norm > tau x the image's median patch norm
``max_over_median``     the image's largest patch norm over its median, mean over images
``high_norm_low_info``  share of high-norm tokens on low-information patches (NaN without any):
                        a patch whose pixel standard deviation (over its pixels, mean over
                        channels) is below the image's median patch's; chance is 0.5
``high_norm_attention`` attention the CLS token of the *next* block pays a high-norm token, over
                        the mean it pays a patch token (mean over heads; NaN at the last block)
``massive``             largest |activation| of the image's patch tokens over their median
                        |activation|, mean over images
``register_norm``       (towers with registers) mean register-token norm over the median patch norm
``register_attention``  share of the next block's CLS attention on the registers over their
                        uniform share k / T

**Nulls.** Every row carries two references beside its ``value``, so that a number can be read
against what no phenomenon would give:

- ``gaussian``: the same statistic on data with no structure: patch tokens drawn from a standard
  normal of the tokens' shape [B, L, D] (``max_over_median`` about 1.15, ``massive`` about 5.9 for
  64 x 128 values, ``high_norm`` 0), uniform attention (``high_norm_attention`` 1), independent
  rankings (``simple_tokens``: rho^N L), the chance share 0.5 (``high_norm_low_info``), random
  Gaussian class prompts (``text_cosine`` about 0) and chance (``zero_shot``: 1 / classes);
- ``init``: the same statistic of the same run at step 0 (random initialisation), filled in for
  pretraining folders (empty for ``ARCH=WEIGHTS``).

``emergence.png``/``.pdf`` draws them against the pretraining step, one line per run, with the
Gaussian null dashed.

**What fine-tuning does** (``--finetune RUN [RUN ...]``: run folders of ``python -m
cdfsl_core.finetune --trajectory-steps 0 S`` over the same episode file, one per method; no model
arguments needed): ``finetune_effects.csv`` holds paired differences over episodes, mean and 95%
CI, per target and shot setting (:func:`finetune_effects`):

- ``coop+lora - pretrained``: the baseline's last trajectory point minus its step 0 (the
  pretrained model with CoOp's context at its initial words), for simple tokens (``sinks:sum-all``),
  high-norm, attention-mass and massive-activation tokens per image at TIR's blocks, and accuracy;
- ``tir - coop+lora`` and ``atha - coop+lora``: the methods' last points paired by episode;
- ``atha learned``: ATHA's strengths and edit sizes at the last point minus step 0, at the block
  where its alpha starts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cdfsl_core import protocol
from cdfsl_core.atomic import write_json, write_table
from cdfsl_core.cli import command, non_negative_int, parser, positive_float, positive_int
from cdfsl_core.errors import ConfigError
from cdfsl_core.paths import check_settings, check_writable_folder, read_json_file

SOURCE_DOMAINS = ("synthetic", "synthetic-organism")  # the first domain measured gets the 64-way zero-shot
STATISTICS = ("zero_shot", "text_cosine", "simple_tokens", "simple_tokens_chance", "high_norm", "max_over_median",
              "high_norm_low_info", "high_norm_attention", "massive", "register_norm", "register_attention")


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m analysis.organism", __doc__)
    result.add_argument("runs", nargs="*",
                        help="pretraining folders (with checkpoints/) or ARCH=WEIGHTS (a tag or a file), "
                             "optionally NAME:... to label it")
    result.add_argument("--finetune", nargs="+", default=[], metavar="RUN",
                        help="fine-tuning run folders with trajectories (finetune --trajectory-steps 0 S): "
                             "paired effects of the methods into finetune_effects.csv")
    result.add_argument("--out", type=Path, required=True, help="folder for organism.csv and the emergence figure")
    result.add_argument("--subsets", type=positive_int, default=6, help="random 5-class subsets per domain")
    result.add_argument("--per-class", type=positive_int, default=3, help="held-out images per class of a subset")
    result.add_argument("--high-norm-tau", type=positive_float, default=2.0, help="high-norm: norm above tau x the median")
    result.add_argument("--seed", type=non_negative_int, default=0, help="draws the subsets and images")
    result.add_argument("--monitors", action="store_true",
                        help="also measure the pretraining monitors (cdfsl_core.monitors: attention inflow, where "
                             "it lands, background mass, sink norms) at every checkpoint into monitors.csv")
    result.add_argument("--monitor-images", type=positive_int, default=128,
                        help="held-out synthetic-organism images for --monitors")
    result.add_argument("--domains", nargs="+", default=None,
                        help="synthetic domains (default: the source and every target)")
    return result


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad arguments answer here, before PyTorch is imported

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from analysis.keys import act_name  # noqa: E402
from analysis.recorder import record  # noqa: E402
from analysis.sinks import row_median  # noqa: E402
from cdfsl_core.token_text import sum_score  # noqa: E402
from cdfsl_core.towers import vision_tower  # noqa: E402


# ------------------------------------------------------------------ statistics on tensors
def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """The mean cosine over the distinct pairs of rows of ``features`` [C, d]."""
    unit = F.normalize(features.float(), dim=-1)
    gram = unit @ unit.T
    c = len(unit)
    if c < 2:
        raise ConfigError("the mean pairwise cosine needs at least two classes")
    return float((gram.sum() - gram.diagonal().sum()) / (c * (c - 1)))


def low_information_patches(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Which patches of ``images`` [B, C, H, W] carry little information, [B, rows * cols] bool
    (row-major, the tower's token order): pixel standard deviation inside the patch (mean over
    channels) below the image's median patch's."""
    b, c, h, w = images.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ConfigError(f"images of {h}x{w} pixels do not split into a {rows}x{cols} patch grid")
    patches = images.float().reshape(b, c, rows, h // rows, cols, w // cols)
    spread = patches.std(dim=(3, 5), unbiased=False).mean(dim=1).reshape(b, -1)  # [B, L]
    return spread < row_median(spread).unsqueeze(-1)


@dataclass
class HighNorm:
    """High-norm patch tokens of one batch at one block."""

    per_image: float  # tokens per image above tau x the median
    max_over_median: float  # mean over images of the largest norm over the median
    low_info_share: float  # share of the high-norm tokens on low-information patches (NaN: none)
    attention_ratio: float  # CLS attention on a high-norm token over its mean on a patch (NaN: none)


def high_norm_tokens(norms: torch.Tensor, tau: float, low_info: torch.Tensor,
                     cls_attention: torch.Tensor | None) -> HighNorm:
    """``norms`` [B, L] patch-token norms; ``low_info`` [B, L] bool; ``cls_attention`` [B, L] the
    attention the CLS token pays each patch (mean over heads), or None."""
    median = row_median(norms.float()).unsqueeze(-1)
    high = norms > tau * median
    count = int(high.sum())
    share = float((high & low_info).sum() / count) if count else float("nan")
    ratio = float("nan")
    if cls_attention is not None and count:
        ratio = float(cls_attention[high].mean() / cls_attention.mean())
    return HighNorm(count / len(norms), float((norms.amax(dim=-1) / median.squeeze(-1)).mean()), share, ratio)


def gaussian_null(shape: tuple[int, int, int], tau: float, n_classes: int, rho: float, text_dim: int,
                  generator: torch.Generator) -> dict[str, float]:
    """Every statistic on structureless data of the measured shape: patch tokens [B, L, D] from a
    standard normal, uniform attention, independent rankings, random prompts (module doc)."""
    b, length, width = shape
    patches = torch.randn(shape, generator=generator)
    norms = patches.norm(dim=-1)
    stats = high_norm_tokens(norms, tau, torch.zeros_like(norms, dtype=torch.bool), None)
    text = torch.randn(n_classes, text_dim, generator=generator)
    return {"high_norm": stats.per_image, "max_over_median": stats.max_over_median, "massive": massive_ratio(patches),
            "high_norm_low_info": 0.5, "high_norm_attention": 1.0, "simple_tokens": rho ** n_classes * length,
            "simple_tokens_chance": rho ** n_classes * length, "register_norm": 1.0, "register_attention": 1.0,
            "text_cosine": mean_pairwise_cosine(text)}


def massive_ratio(patches: torch.Tensor) -> float:
    """Mean over images of the largest |activation| of the patch tokens [B, L, D] over their median."""
    flat = patches.float().abs().flatten(1)
    return float((flat.amax(dim=-1) / row_median(flat)).mean())


def simple_token_count(projected: torch.Tensor, text: torch.Tensor, rho: float) -> float:
    """Tokens per image with Sum score m = N: ``projected`` [B, L, E] the tokens' read-out, ``text``
    [N, E] the classes' text features."""
    similarity = F.normalize(projected.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    counts = sum_score(similarity, rho)
    return float((counts == text.shape[0]).sum() / len(projected))


# ------------------------------------------------------------------ one model
@dataclass(frozen=True)
class Sample:
    """The images every model is measured on: per domain, subsets of classes with their images."""

    domain: str
    classes: list[str]
    subsets: list[list[int]]  # class indices of each subset
    images: list[torch.Tensor]  # [subset_size * per_class, 3, H, W] per subset, normalised


def draw_sample(domain: str, subsets: int, per_class: int, seed: int, preprocess: Any) -> Sample:
    from cdfsl_core.data.synthetic import SyntheticDataset, SyntheticSpec

    dataset = SyntheticDataset(SyntheticSpec(domain, per_class, seed, "test"), transform=preprocess)
    rng = np.random.default_rng([seed, len(domain)])
    n = len(dataset.classes)
    ways = min(protocol.WAYS, n)
    drawn = [sorted(rng.choice(n, ways, replace=False).tolist()) for _ in range(subsets)]
    images = [torch.stack([dataset[c * per_class + i][0] for c in subset for i in range(per_class)])
              for subset in drawn]
    return Sample(domain, list(dataset.classes), drawn, images)


@torch.no_grad()
def measure_model(model: Any, tokenizer: Any, samples: Sequence[Sample], source_images: torch.Tensor,
                  source_labels: torch.Tensor, tau: float = 2.0, rho: float = protocol.TIR_RHO) -> list[dict]:
    """Every statistic of the module doc for one model, as rows (domain, block, statistic, value)."""
    model.eval()
    tower = vision_tower(model)
    p, k = tower.n_prefix, tower.n_registers
    rows: list[dict] = []

    generator = torch.Generator().manual_seed(0)  # the same null draws for every model
    null_by_shape: dict[tuple, dict[str, float]] = {}

    def add(domain: str, block: float, statistic: str, value: float, null: float = float("nan")) -> None:
        rows.append({"domain": domain, "block": block, "statistic": statistic, "value": value, "gaussian": null})

    for index, sample in enumerate(samples):
        text = model.encode_text(tokenizer([protocol.PROMPT.format(c) for c in sample.classes]))
        if index == 0 and source_labels is not None:  # the first sample is the source: its 64 prompts
            features = F.normalize(model.encode_image(source_images).float(), dim=-1)
            accuracy = (features @ F.normalize(text.float(), dim=-1).T).argmax(-1).eq(source_labels).float().mean()
            add(sample.domain, np.nan, "zero_shot", float(accuracy), 1.0 / len(text))
        text_null = gaussian_null((1, 2, 2), tau, len(text), rho, text.shape[-1], generator)["text_cosine"]
        add(sample.domain, np.nan, "text_cosine", mean_pairwise_cosine(text), text_null)
        per_block: dict[tuple[int, str], list[tuple[float, int]]] = {}
        nulls: dict[tuple[int, str], list[tuple[float, int]]] = {}
        for subset, images in zip(sample.subsets, sample.images):
            low_info = low_information_patches(images, tower.grid)
            with record(model, what=("resid_post", "attn.pattern")) as cache:
                model.encode_image(images)
            for block in range(tower.n_blocks):
                x = cache[act_name("resid_post", block)].float()
                patches = tower.patches(x)
                norms = patches.norm(dim=-1)
                attention = None
                if block + 1 < tower.n_blocks and tower.has_cls:
                    attention = cache[act_name("attn.pattern", block + 1)].float().mean(dim=1)[:, 0]  # [B, T] from CLS
                stats = high_norm_tokens(norms, tau, low_info, None if attention is None else attention[:, p:])
                values = {"high_norm": stats.per_image, "max_over_median": stats.max_over_median,
                          "high_norm_low_info": stats.low_info_share, "high_norm_attention": stats.attention_ratio,
                          "massive": massive_ratio(patches),
                          "simple_tokens": simple_token_count(tower.patches(tower.readout(x)), text[subset], rho),
                          "simple_tokens_chance": rho ** len(subset) * norms.shape[1]}
                if k:
                    values["register_norm"] = float((tower.registers(x).norm(dim=-1).mean(dim=-1)
                                                     / row_median(norms)).mean())
                    if attention is not None:
                        values["register_attention"] = float(attention[:, 1:p].sum(dim=-1).mean() * x.shape[1] / k)
                key = (tuple(patches.shape), len(subset))  # the null depends on the shape alone: drawn once
                if key not in null_by_shape:
                    null_by_shape[key] = gaussian_null(key[0], tau, key[1], rho, text.shape[-1], generator)
                null = null_by_shape[key]
                for name, value in values.items():
                    per_block.setdefault((block, name), []).append((value, len(images)))
                    nulls.setdefault((block, name), []).append((null.get(name, float("nan")), len(images)))

        def weighted(parts: list[tuple[float, int]]) -> float:
            kept = [(v, n) for v, n in parts if not np.isnan(v)]
            return sum(v * n for v, n in kept) / sum(n for _, n in kept) if kept else float("nan")

        for (block, name), parts in per_block.items():
            add(sample.domain, block, name, weighted(parts), weighted(nulls[(block, name)]))
    return rows


# ------------------------------------------------------------------ runs and checkpoints
@dataclass(frozen=True)
class Checkpoint:
    run: str
    arch: str
    weights: str  # a file or a tag
    step: int | None


def checkpoints_of(spec: str) -> list[Checkpoint]:
    """The models a RUN argument names (see the module doc)."""
    head, colon, tail = spec.partition(":")
    labelled = colon and head and not any(c in head for c in "=/\\")
    name, rest = (head, tail) if labelled else ("", spec)
    if "=" in rest:
        arch, weights = rest.split("=", 1)
        return [Checkpoint(name or arch, arch, weights, None)]
    folder = Path(rest)
    config = folder / "pretrain_config.json"
    if not config.is_file():
        raise ConfigError(f"{folder}: no pretrain_config.json; pass a folder python -m cdfsl_core.pretrain --out "
                          "wrote, or ARCH=WEIGHTS for one model.")
    recipe = read_json_file(config, "a pretraining recipe (an object)", "Restore it, or pretrain again with --force.")
    if "arch" not in recipe:
        raise ConfigError(f"{config} names no architecture ('arch'); restore it, or pretrain again with --force.")
    arch = recipe["arch"]
    files = sorted((folder / "checkpoints").glob("step_*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}/checkpoints holds no step_*.safetensors; pretrain with --checkpoint-every N.")
    return [Checkpoint(name or folder.name, arch, str(f), int(f.stem.split("_")[1])) for f in files]


def measure_runs(specs: Sequence[str], subsets: int = 6, per_class: int = 3, tau: float = 2.0, seed: int = 0,
                 domains: Sequence[str] | None = None, progress: bool = True) -> pd.DataFrame:
    from tqdm import tqdm

    from cdfsl_core.data.synthetic import SYNTHETIC_TARGETS, SyntheticDataset, SyntheticSpec
    from cdfsl_core.models import load_clip

    checkpoints = [c for spec in specs for c in checkpoints_of(spec)]
    domains = list(domains or ["synthetic", *SYNTHETIC_TARGETS])
    rows: list[dict] = []
    samples = source = labels = None
    for checkpoint in tqdm(checkpoints, desc="measuring checkpoints", disable=not progress):
        bundle = load_clip(checkpoint.arch, checkpoint.weights)
        if samples is None:  # the same images for every model (the preprocess of the first)
            samples = [draw_sample(d, subsets, per_class, seed, bundle.preprocess) for d in domains]
            if domains[0] in SOURCE_DOMAINS:
                held_out = SyntheticDataset(SyntheticSpec(domains[0], 2, seed, "test"), transform=bundle.preprocess)
                source = torch.stack([held_out[i][0] for i in range(len(held_out))])
                labels = torch.tensor(held_out.targets)
        torch.manual_seed(seed)
        for row in measure_model(bundle.model, bundle.tokenizer, samples, source, labels, tau):
            rows.append({"run": checkpoint.run, "arch": checkpoint.arch, "step": checkpoint.step, **row})
    return with_init(pd.DataFrame(rows))


def with_init(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with an ``init`` column: each row's statistic at its run's step 0 (NaN for runs
    without a step 0)."""
    keys = ["run", "domain", "block", "statistic"]
    start = table[table["step"] == 0][keys + ["value"]].rename(columns={"value": "init"})
    return table.merge(start, on=keys, how="left")


def monitor_runs(specs: Sequence[str], n_images: int = 128, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """The pretraining monitors (:mod:`cdfsl_core.monitors`) of every checkpoint of ``specs``, one
    row per run, step, tower, block, head and statistic: what ``pretrain --monitor-every`` logs,
    measured afterwards on the same held-out images (a run made before a monitor existed gets it)."""
    from tqdm import tqdm

    from cdfsl_core.models import load_clip
    from cdfsl_core.monitors import measure, monitor_set

    rows = []
    for checkpoint in tqdm([c for spec in specs for c in checkpoints_of(spec)], desc="monitors",
                           disable=not progress):
        bundle = load_clip(checkpoint.arch, checkpoint.weights)
        config = bundle.model.visual.preprocess_cfg
        data = monitor_set(bundle.model, bundle.tokenizer, n_images, seed, config["mean"], config["std"])
        for tower, block, head, statistic, value in measure(bundle.model, data):
            rows.append({"run": checkpoint.run, "step": checkpoint.step, "tower": tower, "block": block,
                         "head": head, "statistic": statistic, "value": value})
    return pd.DataFrame(rows)


def _tir_blocks(table: pd.DataFrame) -> list[int]:
    """The blocks whose outputs TIR edits (it edits the inputs of its blocks), for the depth the
    table's ``block`` column shows."""
    from cdfsl_core.interventions.tir import TIR, TIRConfig

    n_blocks = int(table["block"].dropna().max()) + 1
    return [b - 1 for b in TIR(TIRConfig()).blocks(n_blocks)]


def summary(table: pd.DataFrame, blocks: str = "max") -> pd.DataFrame:
    """One value per run, step, domain and statistic: per-block statistics reduced over blocks
    (``max``, the block where a phenomenon is strongest; simple tokens at TIR's blocks, averaged)."""
    parts = []
    for (run, step), group in table.groupby(["run", "step"], dropna=False):
        tir_inputs = _tir_blocks(group)
        for (domain, statistic), rows in group.groupby(["domain", "statistic"]):
            reduced = {}
            for column in ("value", "gaussian", "init"):
                if column not in rows:
                    continue
                if rows["block"].isna().all():
                    reduced[column] = rows[column].iloc[0]
                elif statistic.startswith("simple_tokens"):
                    reduced[column] = rows[rows["block"].isin(tir_inputs)][column].mean()
                else:
                    reduced[column] = getattr(rows[column], blocks)()
            parts.append({"run": run, "step": step, "domain": domain, "statistic": statistic, **reduced})
    return pd.DataFrame(parts)


# ------------------------------------------------------------------ what fine-tuning does
EFFECT_STATISTICS = ("sinks:sum-all", "sinks:high-norm", "sinks:attention-mass", "sinks:massive-activation")




def _per_episode(table: pd.DataFrame, step: str) -> pd.DataFrame:
    """One value per (domain, shots, method, episode, statistic) at the first or last point:
    token statistics averaged over TIR's blocks, ATHA's strengths at the block where alpha starts
    (the block with the largest |alpha| at step 0), accuracy as it is."""
    points = table.groupby(["domain", "shots", "method", "episode"])["step"].transform(step)
    at = table[table["step"] == points]
    tir_blocks = _tir_blocks(table)
    rows = []
    for keys, group in at.groupby(["domain", "shots", "method", "episode"]):
        for statistic, part in group.groupby("statistic"):
            if statistic == "accuracy":
                value = part["value"].mean()
            elif statistic in EFFECT_STATISTICS:
                value = part[part["block"].isin(tir_blocks)]["value"].mean()
            elif statistic in ("alpha", "beta", "head_edit", "tail_edit"):
                value = part.sort_values("block")["value"].to_numpy()
            else:
                continue
            rows.append(dict(zip(["domain", "shots", "method", "episode"], keys), statistic=statistic, value=value))
    return pd.DataFrame(rows)


def finetune_effects(table: pd.DataFrame, baseline: str = "coop+lora/none") -> pd.DataFrame:
    """Paired effects of fine-tuning and of the methods (module doc), from the concatenated
    trajectory tables (:func:`analysis.trajectory.trajectory_table` with ``method``, ``domain``,
    ``shots`` labels): rows ``domain, shots, comparison, statistic, mean, ci95, episodes``."""
    from cdfsl_core.stats import mean_ci95

    first, last = _per_episode(table, "min"), _per_episode(table, "max")
    keys = ["domain", "shots", "episode", "statistic"]
    rows: list[dict] = []

    def add(comparison: str, difference: pd.DataFrame) -> None:
        for (domain, shots, statistic), part in difference.groupby(["domain", "shots", "statistic"]):
            values = part["value"].astype(float).dropna()
            mean, ci = mean_ci95(values.to_numpy())
            rows.append({"domain": domain, "shots": int(shots), "comparison": comparison, "statistic": statistic,
                         "mean": mean, "ci95": ci, "episodes": len(values)})

    scalar = [*EFFECT_STATISTICS, "accuracy"]
    base_last = last[(last["method"] == baseline) & last["statistic"].isin(scalar)].set_index(keys)["value"]
    base_first = first[(first["method"] == baseline) & first["statistic"].isin(scalar)].set_index(keys)["value"]
    joined = pd.concat({"a": base_last, "b": base_first}, axis=1).dropna()
    add(f"{baseline.split('/')[0]} - pretrained", (joined["a"] - joined["b"]).rename("value").reset_index())
    for method in sorted(set(last["method"]) - {baseline}):
        other = last[(last["method"] == method) & last["statistic"].isin(scalar)].set_index(keys)["value"]
        joined = pd.concat({"a": other, "b": base_last}, axis=1).dropna()
        add(f"{method.split('/')[-1]} - {baseline.split('/')[0]}",
            (joined["a"] - joined["b"]).rename("value").reset_index())
        strengths = ["alpha", "beta", "head_edit", "tail_edit"]
        start = first[(first["method"] == method) & first["statistic"].isin(strengths)]
        end = last[(last["method"] == method) & last["statistic"].isin(strengths)]
        if start.empty:
            continue
        merged = start.merge(end, on=keys, suffixes=("_0", "_1"))
        episode = ["domain", "shots", "episode"]
        alpha = merged[merged["statistic"] == "alpha"].set_index(episode)["value_0"]
        init_block = alpha.map(lambda values: int(np.argmax(np.abs(values))))  # where alpha starts
        learned = [{**{k: row[k] for k in keys},
                    "value": float(row["value_1"][init_block[tuple(row[k] for k in episode)]]
                                   - row["value_0"][init_block[tuple(row[k] for k in episode)]])}
                   for _, row in merged.iterrows()]
        add(f"{method.split('/')[-1]} learned", pd.DataFrame(learned))
    return pd.DataFrame(rows)


def finetune_table(runs: Sequence[str]) -> pd.DataFrame:
    """The trajectory tables of fine-tuning run folders, labelled by method, domain and shots."""
    from analysis.trajectory import trajectory_table
    from cdfsl_core.config import RunConfig
    from cdfsl_core.run_folder import RunFolder

    parts = []
    for run in runs:
        config = RunConfig.from_dict(RunFolder(run).config_dict())
        parts.append(trajectory_table(run, method=f"{config.method.adaptation}/{config.method.intervention}",
                                      domain=config.data.dataset, shots=config.episodes.k_shot))
    table = pd.concat(parts, ignore_index=True)
    if table.empty or not (table["step"] == 0).any():
        raise ConfigError(f"{', '.join(runs)}: no trajectory from step 0; run finetune with --trajectory-steps 0 S.")
    return table


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_writable_folder(args.out, "--out")
    if args.domains:
        from cdfsl_core.data.synthetic import DOMAINS

        unknown = [d for d in args.domains if d not in DOMAINS]
        if unknown:
            raise ConfigError(f"--domains {' '.join(unknown)}: not a synthetic domain (expected some of {DOMAINS}). "
                              "--domains takes every word after it: put the runs before --domains.")
    if not args.runs and not args.finetune:
        raise ConfigError("nothing to measure: pass pretraining runs (or ARCH=WEIGHTS), --finetune run folders, or both.")
    for spec in args.runs:
        checkpoints_of(spec)  # a bad RUN fails here, before any model is measured
    settings = {"runs": [str(Path(r).resolve()) if Path(r).exists() else r for r in args.runs],
                "finetune": [str(Path(r).resolve()) for r in args.finetune], "subsets": args.subsets,
                "per_class": args.per_class, "high_norm_tau": args.high_norm_tau, "seed": args.seed,
                "monitors": args.monitors, "monitor_images": args.monitor_images, "domains": args.domains}
    check_settings(args.out / "settings.json", settings, "organism tables")  # never replace other runs' tables
    if args.finetune:
        effects = finetune_effects(finetune_table(args.finetune))
        write_table(effects, args.out / "finetune_effects.csv")
        print(effects.round(4).to_string(index=False))
    if not args.runs:
        write_json(args.out / "settings.json", settings)
        return 0
    if args.monitors:
        monitors = monitor_runs(args.runs, args.monitor_images, args.seed)
        write_table(monitors, args.out / "monitors.csv")
    table = measure_runs(args.runs, args.subsets, args.per_class, args.high_norm_tau, args.seed, args.domains)
    write_table(table, args.out / "organism.csv")
    reduced = summary(table)
    write_table(reduced, args.out / "organism_summary.csv")
    if table["step"].notna().any():
        from analysis.figures import organism_emergence, save_figure

        save_figure(organism_emergence(summary(table.dropna(subset=["step"]))), args.out, "emergence")
    write_json(args.out / "settings.json", settings)  # last: the tables beside it are complete
    last = reduced.sort_values("step").groupby(["run", "domain", "statistic"], dropna=False).tail(1)
    print(last.pivot_table(index=["domain", "statistic"], columns="run", values="value").round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
