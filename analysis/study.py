"""A study: every method on every target, every diagnostic, every figure, from one folder.

The demo (``make demo``), ``make figures`` and the notebooks share this module, so a figure is
made one way wherever it is shown. Each step writes its results into the study folder and
reuses them when they are there: rerunning finishes what is missing and repeats nothing.

    out/
      runs/<target>/<k>shot_<n>ep/<method>/   run folders of the episodic runner (with states)
      episodes/                               one episode file per target and shot setting
      episodes.csv, accuracy_table.csv        one row per episode; mean, 95% CI, paired differences
      diagnostics/<table>.csv                 pretrained and fine-tuned models, episode 0
      domain_similarity.csv                   every estimator per layer: source vs targets, references, null
      cka_finetuned.csv                       paired CKA per layer: pretrained vs fine-tuned, same images
      atha_strengths.csv                      ATHA's learned alpha and beta per block and episode
      figures/                                every figure as PNG and PDF

The default is the embedded world and CLIP; a real study changes the model, the data root, the
source and the targets (the notebooks' parameter cell shows how).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from analysis import figures as fig
from analysis.cka import cka
from analysis.domain import DEFAULT_ESTIMATOR, compare_domains
from analysis.features import layer_features
from analysis.run_diagnostics import diagnose_run
from cdfsl_core.compare import paired_difference
from cdfsl_core.data import load_dataset
from cdfsl_core.data.synthetic import SYNTHETIC_TARGETS
from cdfsl_core.episodes import EpisodeConfig
from cdfsl_core.errors import ConfigError
from cdfsl_core.lora import lora_modules, remove_lora
from cdfsl_core.methods import MethodConfig
from cdfsl_core.models import EMBEDDED_MODEL, ClipBundle, load_clip
from cdfsl_core.runner import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_run,
    load_state,
    prepare_episode,
    protocol_transform,
    run,
    state_path,
)
from cdfsl_core.stats import mean_ci95
from cdfsl_core.world_report import domain_similarity
from cdfsl_core.zeroshot import image_features

__all__ = ["BASELINE", "METHODS", "Study"]

# (label, adaptation, intervention); zero-shot first: the others add LoRA to the shared model.
METHODS = (
    ("zero-shot", "zeroshot", "none"),
    ("coop+lora", "coop+lora", "none"),
    ("coop+lora+atha", "coop+lora", "atha"),
    ("coop+lora+tir", "coop+lora", "tir"),
)
BASELINE = "coop+lora"
TABLES = ("norms", "sinks", "head_tail", "attention", "rollout", "attribution")


@dataclass
class Study:
    """What to run and where its results live."""

    out: Path  # the study folder
    model: str = EMBEDDED_MODEL[0]  # open_clip architecture
    pretrained: str = EMBEDDED_MODEL[1]  # tag or local weights file
    data_root: str | None = None  # real datasets' root (None: $CDFSL_DATA_ROOT; the embedded world needs none)
    source: str = "synthetic"  # the source domain, for CKA and similarity
    targets: tuple[str, ...] = SYNTHETIC_TARGETS  # target domains, in order of shift
    shots: tuple[int, ...] = (1, 5)
    episodes: int = 2  # episodes per target, shot setting and method
    steps: int = 60  # training steps per episode (the papers' protocol: 100; 60 keeps `make demo` within 15 min)
    seed: int = 0
    device: str = "cpu"
    methods: tuple[tuple[str, str, str], ...] = METHODS
    diagnose_shots: int = 5  # the shot setting whose episode 0 is diagnosed
    attribution_steps: int = 8  # integrated-gradients steps of the attribution maps
    domain_images: int = 200  # images drawn per domain for the domain similarity
    progress: bool = True
    _bundle: ClipBundle | None = field(default=None, repr=False)
    _checked: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.targets, self.shots = tuple(self.targets), tuple(self.shots)
        if self.diagnose_shots not in self.shots:
            raise ConfigError(f"diagnose_shots={self.diagnose_shots} is not among shots={self.shots}.")

    def settings(self) -> dict[str, Any]:
        """What determines the study's results (``study.json`` in the folder)."""
        keys = ("model", "pretrained", "data_root", "source", "targets", "shots", "episodes", "steps", "seed",
                "methods", "diagnose_shots", "attribution_steps", "domain_images")
        return json.loads(json.dumps({key: getattr(self, key) for key in keys}))

    def _check_folder(self) -> None:
        """A study folder holds one study: its tables are reused only for the same settings."""
        if self._checked:
            return
        path = self.out / "study.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != self.settings():
                differ = sorted(k for k in set(saved) | set(self.settings()) if saved.get(k) != self.settings().get(k))
                raise ConfigError(f"{self.out} holds a study with other settings (differs in {differ}: "
                                 f"{ {k: saved.get(k) for k in differ} }). Use another folder, or the same settings "
                                 "to reuse its results.")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.settings(), indent=2) + "\n")
        self._checked = True

    # ------------------------------------------------------------------ shared pieces
    @property
    def bundle(self) -> ClipBundle:
        if self._bundle is None:
            self._bundle = load_clip(self.model, self.pretrained, device=self.device)
        return self._bundle

    def dataset_options(self, name: str) -> dict[str, Any]:
        """Loader options of a target (the runs') or of the source (its held-out test split, for
        the embedded world); real datasets need none."""
        if name == self.source == "synthetic":
            return {"split": "test", "images_per_class": 8}  # 512 held-out source images
        return {"images_per_class": 60, "seed": self.seed} if name.startswith("synthetic-") else {}

    def load(self, name: str) -> Any:
        return load_dataset(name, self.data_root, **self.dataset_options(name))

    def run_folder(self, target: str, shots: int, label: str) -> Path:
        """One folder per cell; the episode count is in the name, so another ``episodes`` never
        meets a run folder of a different config."""
        return self.out / "runs" / target / f"{shots}shot_{self.episodes}ep" / label

    def run_config(self, target: str, shots: int, adaptation: str, intervention: str) -> RunConfig:
        episode_file = self.out / "episodes" / f"{target}_5w{shots}s15q_{self.episodes}ep_seed{self.seed}.json"
        return RunConfig(
            model=ModelConfig(self.model, self.pretrained, self.device),
            data=DataConfig(target, self.data_root, self.dataset_options(target), str(episode_file)),
            episodes=EpisodeConfig(5, shots, 15, self.episodes, self.seed),
            method=MethodConfig(adaptation, intervention, logit_scale=2.0 if shots == 1 else 4.0),
            train=replace(TrainConfig(), steps=self.steps),
        )

    @property
    def fine_tuned(self) -> list[str]:
        return [label for label, adaptation, _ in self.methods if adaptation != "zeroshot"]

    def _cached(self, path: Path, make) -> pd.DataFrame:
        self._check_folder()
        if path.exists():
            return pd.read_csv(path)
        table = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        table.to_csv(tmp, index=False)
        tmp.replace(path)
        return table

    # ------------------------------------------------------------------ accuracy
    def run_all(self, labels: Sequence[str] | None = None, shots: Sequence[int] | None = None) -> pd.DataFrame:
        """Every (method, target, shots) run, resumed where finished (or only the methods
        ``labels`` and shot settings ``shots``); one row per episode."""
        self._check_folder()
        rows = []
        for label, adaptation, intervention in self.methods:
            if labels is not None and label not in labels:
                continue
            for target in self.targets:
                for k in self.shots if shots is None else shots:
                    folder = self.run_folder(target, k, label)
                    if adaptation == "zeroshot" and lora_modules(self.bundle.model):
                        remove_lora(self.bundle.model)  # a fine-tuned run came first; zero-shot needs the plain model
                    run(self.run_config(target, k, adaptation, intervention), folder, bundle=self.bundle,
                        progress=self.progress, save_states=adaptation != "zeroshot")
                    for line in (folder / "episodes.jsonl").read_text().splitlines():
                        row = json.loads(line)
                        rows.append({"domain": target, "shots": k, "method": label, "episode": row["episode"],
                                     "accuracy": row["accuracy"], "status": row["status"],
                                     "seconds": row.get("seconds")})
        return pd.DataFrame(rows)

    def accuracy_table(self, episodes: pd.DataFrame) -> pd.DataFrame:
        """Mean accuracy and 95% CI per cell, and the paired difference against the baseline."""
        ok = episodes[episodes["status"] == "ok"]
        summary = ok.groupby(["domain", "shots", "method"], sort=False)["accuracy"].agg(
            mean="mean", episodes="count", ci95=lambda values: mean_ci95(values.tolist())[1]).reset_index()
        diffs = []
        for _, row in summary.iterrows():
            if row["method"] == BASELINE:
                diffs.append((0.0, 0.0))
                continue
            result = paired_difference(self.run_folder(row["domain"], row["shots"], row["method"]),
                                       self.run_folder(row["domain"], row["shots"], BASELINE))
            diffs.append((result["mean_difference"], result["ci95"]))
        summary["diff_vs_baseline"] = [d for d, _ in diffs]
        summary["diff_ci95"] = [c for _, c in diffs]
        summary.to_csv(self.out / "accuracy_table.csv", index=False)
        return summary

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict[str, pd.DataFrame]:
        """Every token diagnostic of episode 0 at ``diagnose_shots``: the pretrained model once per
        target, and each fine-tuned method rebuilt from its saved state."""
        def make() -> dict[str, pd.DataFrame]:
            self.run_all(self.fine_tuned, (self.diagnose_shots,))
            parts: dict[str, list[pd.DataFrame]] = {}
            for target in self.targets:
                for i, label in enumerate(self.fine_tuned):
                    folder = self.run_folder(target, self.diagnose_shots, label)
                    tables = diagnose_run(folder, [0], attribution_steps=self.attribution_steps,
                                          pretrained=i == 0, model_label=label)
                    for name, table in tables.items():
                        parts.setdefault(name, []).append(table)
            return {name: pd.concat(tables, ignore_index=True) for name, tables in parts.items()}

        self._check_folder()
        folder = self.out / "diagnostics"
        if all((folder / f"{name}.csv").exists() for name in TABLES):
            return {name: pd.read_csv(folder / f"{name}.csv") for name in TABLES}
        tables = make()
        folder.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            table.to_csv(folder / f"{name}.csv", index=False)
        return tables

    def atha_strengths(self) -> pd.DataFrame:
        """How hard ATHA pushes, from the runs' episode lines: one row per (method, domain, shots,
        episode, block, stage), stage ``init`` (before training) or ``trained``, with alpha, beta,
        the mean norm of the tokens entering the block and of the class vectors head and tail
        tokens move along, and the relative edit sizes ``head_edit`` and ``tail_edit``
        (:meth:`cdfsl_core.interventions.ATHA.measuring`), measured on the episode's queries."""
        labels = [label for label, _, intervention in self.methods if intervention == "atha"]
        self.run_all(labels)
        rows = []
        for label in labels:
            for target in self.targets:
                for k in self.shots:
                    folder = self.run_folder(target, k, label)
                    config = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
                    for line in (folder / "episodes.jsonl").read_text().splitlines():
                        row = json.loads(line)
                        for stage, blocks in row.get("intervention_stats", {}).items():
                            for block, stats in blocks.items():
                                rows.append({"method": label, "domain": target, "shots": k, "episode": row["episode"],
                                             "block": int(block), "stage": stage, **stats,
                                             "alpha_init": config.method.atha.alpha_init,
                                             "text_norm": config.method.atha.text_norm})
        table = pd.DataFrame(rows)
        table.to_csv(self.out / "atha_strengths.csv", index=False)
        return table

    def controls(self, layer: int | None = None, images: int = 16) -> pd.DataFrame:
        """Positive controls beside the real model: sink tokens per image at ``layer`` (default: the
        middle block) of the pretrained model on ``images`` images of the first target, without a
        plant and with each artefact of :mod:`analysis.controls` planted into patch token 0.
        One row per (plant, definition): ``mean_count`` (all sinks), ``planted_token_found`` (the
        fraction of images whose planted token the definition flags) and ``found_by`` (the
        definition meant to find the plant)."""
        def make() -> pd.DataFrame:
            from analysis.controls import FINDS, PLANTS, Plant, planted
            from analysis.diagnostics import TokenDiagnostics
            from analysis.recorder import record
            from cdfsl_core.methods import create_method

            bundle = load_clip(self.model, self.pretrained, device=self.device)  # a clean model, whatever ran before
            dataset = self.load(self.targets[0])
            step = max(1, len(dataset) // images)
            batch = torch.stack([self._transform(dataset.load_image(i)) for i in range(0, len(dataset), step)[:images]])
            batch = batch.to(self.device)
            method = create_method(bundle, dataset.classes[:5], "zeroshot", "none").eval()
            with torch.no_grad():
                _, readout = method.text_features(readout=True)
            n_blocks = len(bundle.model.visual.transformer.resblocks)
            block = n_blocks // 2 if layer is None else layer
            rows = []
            for kind in ("none", *PLANTS):
                plants = [] if kind == "none" else [Plant(kind, block, token=0)]
                diagnostics = TokenDiagnostics(bundle.model.visual, readout, [block], head_tail=False)
                with planted(method, plants, text=readout), record(method, layers=[block]) as cache, torch.no_grad():
                    method.encode_image(batch, readout)
                diagnostics.update(cache)
                masks = diagnostics.sink_masks(cache)[block]
                for _, row in diagnostics.tables()["sinks"].iterrows():
                    found = float(masks[row["definition"]][:, 0].float().mean()) if plants else float("nan")
                    rows.append({"plant": kind, "planted_per_image": len(plants), "definition": row["definition"],
                                 "label": row["label"], "layer": block, "images": row["images"],
                                 "mean_count": row["mean_count"], "planted_token_found": found,
                                 "found_by": FINDS.get(kind) == row["definition"],
                                 "dataset": self.targets[0], "model": "pretrained"})
            return pd.DataFrame(rows)
        return self._cached(self.out / "diagnostics" / "controls.csv", make)

    # ------------------------------------------------------------------ CKA and similarity
    @cached_property
    def _transform(self):
        return protocol_transform(self.bundle, 1.15)


    def domain_similarity(self, pool: str = "cls") -> pd.DataFrame:
        """Every domain estimator (:mod:`analysis.domain`) per layer of the pretrained model: each
        target against the source, beside two random and two class-disjoint halves of the source
        and a permutation null, with bootstrap intervals; ``pool`` 'cls', 'mean' or 'mean-no-simple'."""
        def make() -> pd.DataFrame:
            from analysis.domain import list_domain_estimators

            bundle = load_clip(self.model, self.pretrained, device=self.device)  # a clean model, whatever ran before
            targets = {name: self.load(name) for name in self.targets}
            return compare_domains(bundle.model, self.load(self.source), targets, self._transform, self.domain_images,
                                   pool, tuple(list_domain_estimators()), seed=self.seed, progress=self.progress,
                                   bundle=bundle, labels={"source": self.source, "model": self.model})
        suffix = "" if pool == "cls" else f"_{pool}"
        return self._cached(self.out / f"domain_similarity{suffix}.csv", make)

    def cka_finetuned(self) -> pd.DataFrame:
        """Linear CKA per layer between the pretrained and each fine-tuned model of episode 0 on
        the episode's query images (paired, biased estimator: Kornblith et al.'s for models)."""
        def make() -> pd.DataFrame:
            self.run_all(self.fine_tuned, (self.diagnose_shots,))
            rows = []
            for target in self.targets:
                for label in self.fine_tuned:
                    folder = self.run_folder(target, self.diagnose_shots, label)
                    config, _, dataset, episodes = load_run(folder)
                    method, _, _, query, _ = prepare_episode(config, self.bundle, dataset, episodes, 0)
                    before = layer_features(method, images=query)
                    load_state(method, state_path(folder, 0))
                    after = layer_features(method, images=query)
                    for layer in before:
                        rows.append({"target": target, "method": label, "layer": layer, "images": len(query),
                                     "cka": cka(before[layer], after[layer], "linear", "biased"),
                                     "kernel": "linear", "estimator": "biased", "pool": "cls"})
                    method.reset_parameters()
            return pd.DataFrame(rows)
        return self._cached(self.out / "cka_finetuned.csv", make)

    def similarity(self) -> dict[str, float]:
        """1 - MMD^2/2 between the source's and each target's image features (final embedding)."""
        def make() -> pd.DataFrame:
            source = self.load(self.source)
            source_features = image_features(self.bundle, source, range(0, len(source), max(1, len(source) // 512)))
            rows = []
            for target in self.targets:
                dataset = self.load(target)
                target_features = image_features(self.bundle, dataset, range(0, len(dataset), max(1, len(dataset) // 300)))
                rows.append({"target": target, "similarity": domain_similarity(source_features, target_features)})
            return pd.DataFrame(rows)
        table = self._cached(self.out / "similarity.csv", make)
        return dict(zip(table["target"], table["similarity"]))

    def feature_view(self, method: str = "pca", per_domain: int = 150) -> pd.DataFrame:
        """2-D view of the final image features of the source and every target (scikit-learn
        PCA, or t-SNE with ``method='tsne'``, fitted on all domains together): one row per image
        with ``domain``, ``class``, ``x``, ``y``."""
        if method not in ("pca", "tsne"):
            raise ConfigError(f"method={method!r}; expected 'pca' or 'tsne'.")

        def make() -> pd.DataFrame:
            from sklearn.decomposition import PCA
            from sklearn.manifold import TSNE

            parts, rows = [], []
            for name in (self.source, *self.targets):
                dataset = self.load(name)
                step = max(1, len(dataset) // per_domain)
                indices = list(range(0, len(dataset), step))[:per_domain]
                parts.append(image_features(self.bundle, dataset, indices).cpu().numpy())
                rows += [{"domain": name, "class": dataset.classes[dataset.targets[i]]} for i in indices]
            import numpy as np

            features = np.concatenate(parts)
            reducer = PCA(2, random_state=self.seed) if method == "pca" else \
                TSNE(2, init="pca", perplexity=min(30.0, len(features) / 4), random_state=self.seed)
            coords = reducer.fit_transform(features)
            table = pd.DataFrame(rows)
            table["x"], table["y"], table["method"] = coords[:, 0], coords[:, 1], method
            if method == "pca":
                table["explained_variance"] = float(reducer.explained_variance_ratio_.sum())
            return table
        return self._cached(self.out / f"feature_view_{method}.csv", make)

    # ------------------------------------------------------------------ figures
    def samples(self, per_domain: int = 8) -> dict[str, list]:
        """Example images with their class names, per domain (embedded world: from the renderer)."""
        out = {}
        for name in (self.source, *self.targets):
            dataset = self.load(name)
            stride = max(1, len(dataset) // per_domain)
            out[name] = [(_array(dataset, i), dataset.classes[dataset.targets[i]])
                         for i in range(0, per_domain * stride, stride)[:per_domain]]
        return out

    def figures(self, folder: str | Path | None = None) -> dict[str, list[Path]]:
        """Run what is missing, then write every figure (PNG and PDF) into ``folder``
        (default ``out/figures``); returns the paths by figure name."""
        folder = Path(folder) if folder is not None else self.out / "figures"
        episodes = self.run_all()
        episodes.to_csv(self.out / "episodes.csv", index=False)
        summary = self.accuracy_table(episodes)
        tables = self.diagnostics()
        made = {
            "world_samples": fig.world_samples(self.samples()),
            "feature_view": fig.feature_view(self.feature_view()),
            "accuracy_by_domain": fig.accuracy_by_domain(episodes[episodes["status"] == "ok"], self.similarity()),
            "paired_differences": fig.paired_differences(summary, BASELINE),
            "token_norms_by_bucket": fig.token_norms_by_bucket(tables["norms"]),
            "sink_counts": fig.sink_counts(tables["sinks"]),
            "positive_controls": fig.positive_controls(self.controls()),
            "head_tail_similarity": fig.head_tail_similarity(tables["head_tail"]),
            "attention_maps": fig.attention_maps(tables["attention"], tables["rollout"], tables["attribution"]),
            "domain_similarity": fig.domain_similarity_by_layer(self.domain_similarity(), DEFAULT_ESTIMATOR),
            "domain_estimators": fig.domain_similarity_by_layer(self.domain_similarity()),
            "cka_finetuned": fig.cka_finetuned(self.cka_finetuned()),
        }
        if any(intervention == "atha" for _, _, intervention in self.methods):
            made["atha_strengths"] = fig.atha_strengths(self.atha_strengths())
        import matplotlib.pyplot as plt

        paths = {}
        for name, figure in made.items():
            paths[name] = fig.save_figure(figure, folder, name)
            plt.close(figure)
        return paths


def _array(dataset: Any, index: int):
    """An image as uint8 [H, W, 3] (the renderer's array for the embedded world, else the file)."""
    import numpy as np

    if hasattr(dataset, "array"):
        return dataset.array(index)
    return np.asarray(dataset.load_image(index).convert("RGB"))
