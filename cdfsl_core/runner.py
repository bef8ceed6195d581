"""One episodic runner for every method.

Load the model once; for each episode of an episode file: reset the adapters and intervention
parameters, train on the support set, evaluate the queries, append one JSON line to the run's
``episodes.jsonl`` (flushed and synced). A run is a folder:

- ``config.json``: everything needed to rerun it (:class:`RunConfig`);
- ``manifest.json``: versions, git revision, device, episode-file hash, dataset fingerprint;
- ``episodes.jsonl``: one line per finished episode, appended as it finishes;
- ``summary.json``: mean accuracy and 95% CI = 1.96 std / sqrt(episodes);
- ``states/episode_NNNN.safetensors`` (with ``save_states``): what each episode trained, so the
  diagnostics can rebuild its fine-tuned model without training again.

A run that is interrupted resumes after its last finished episode, with the same results as an
uninterrupted one: episode ``i`` seeds torch from ``(seed, i)`` before anything random happens.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from tqdm import tqdm

from cdfsl_core import protocol
from cdfsl_core.atomic import atomic_path, write_json
from cdfsl_core.data import load_dataset
from cdfsl_core.episodes import EpisodeConfig, EpisodeFile, generate_episodes, load_episodes, save_episodes
from cdfsl_core.errors import ConfigError, DeviceError, EpisodeError, RunFolderError, RunInterrupted
from cdfsl_core.interventions import intervention_spec
from cdfsl_core.lora import LoRAConfig
from cdfsl_core.methods import FewShotCLIP, MethodConfig
from cdfsl_core.models import (PRECISIONS, ClipBundle, checkpoint_file, load_clip, resolve_device, resolve_precision,
                               short_identity, weights_identity)
from cdfsl_core.paths import check_writable_folder
from cdfsl_core.stats import json_number, mean_ci95
from cdfsl_core.zeroshot import autocast_for

__all__ = [
    "DataConfig",
    "ModelConfig",
    "NonFiniteLoss",
    "RunConfig",
    "RunPlan",
    "TrainConfig",
    "load_plan",
    "load_run",
    "load_state",
    "prepare_episode",
    "prepare_run",
    "run",
    "run_episodes",
    "save_state",
    "state_path",
    "summarize",
    "train_episode",
]


@dataclass(frozen=True)
class ModelConfig:
    """Which CLIP, where."""

    name: str = "cdfsl-synth-vit"  # open_clip architecture
    pretrained: str | None = "synthetic"  # tag or local weights file
    device: str = "auto"  # 'auto', 'cpu', 'cuda'
    precision: str = "auto"  # 'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32', 'bf16'


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and where its episodes are."""

    dataset: str = "synthetic-crops"  # registry name
    root: str | None = None  # data root (None: $CDFSL_DATA_ROOT; synthetic needs none)
    options: dict[str, Any] = field(default_factory=dict)  # loader options (split, images_per_class, ...)
    episode_file: str | None = None  # created from `episodes` if missing, verified if present


@dataclass(frozen=True)
class TrainConfig:
    """How each episode trains; defaults are the ATHA/TIR protocol (:mod:`cdfsl_core.protocol`)."""

    steps: int = protocol.STEPS  # full-batch steps on the support set
    lr_lora: float = protocol.LR_LORA  # AdamW (LoRA, and a learned logit scale)
    lr_context: float = protocol.LR_CONTEXT  # SGD with momentum and weight decay (CoOp context)
    lr_intervention: float = protocol.LR_INTERVENTION  # SGD (intervention parameters: ATHA's alpha and beta)
    momentum: float = protocol.MOMENTUM
    weight_decay_context: float = protocol.WEIGHT_DECAY_CONTEXT
    resize_ratio: float = protocol.RESIZE_RATIO  # resize the short side to ratio x image size, then centre-crop
    augment: bool = False  # the authors' 5 views per support image
    eval_batch_size: int = 256


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's results."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        return _from_dict(cls, raw)

    def validate(self) -> None:
        """Every value that cannot work, named with the fix, before anything is loaded or written."""
        self.episodes.validate()
        self.method.validate()
        self.method.lora.validate()
        if self.model.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.model.precision!r}: expected one of {PRECISIONS}.")
        if self.train.steps < 0:
            raise ConfigError(f"steps={self.train.steps}: expected 0 or more training steps.")
        if self.train.steps == 0 and self.method.adaptation != "zeroshot":
            raise ConfigError(f"steps=0 with adaptation {self.method.adaptation!r} trains nothing and would record the "
                              "zero-shot model under a fine-tuning label. Use --adaptation zeroshot, or steps >= 1.")
        for name in ("lr_lora", "lr_context", "lr_intervention", "resize_ratio"):
            if not getattr(self.train, name) > 0:
                raise ConfigError(f"{name}={getattr(self.train, name)}: expected a positive number.")
        if self.train.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size={self.train.eval_batch_size}: expected a positive integer.")

    def with_absolute_paths(self) -> "RunConfig":
        """The same run with its paths (data root, episode file, local weights) absolute, so the
        run folder works from any working folder."""
        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).expanduser().absolute())

        pretrained = self.model.pretrained
        if pretrained is not None and Path(pretrained).expanduser().is_file():
            pretrained = absolute(pretrained)
        return replace(self, model=replace(self.model, pretrained=pretrained),
                       data=replace(self.data, root=absolute(self.data.root), episode_file=absolute(self.data.episode_file)))


def _from_dict(kind: Any, raw: Any) -> Any:
    if is_dataclass(kind) and isinstance(raw, dict):
        types = {f.name: f for f in fields(kind)}
        nested = {"model": ModelConfig, "data": DataConfig, "episodes": EpisodeConfig, "method": MethodConfig,
                  "train": TrainConfig, "lora": LoRAConfig}
        values = {}
        for key, value in raw.items():
            if key not in types:
                raise ConfigError(f"{kind.__name__} has no field {key!r}; the run's config.json may come from another "
                                  "version of this package.")
            if key == "intervention_config" and isinstance(value, dict):  # the registered intervention's settings
                value = _from_dict(intervention_spec(raw.get("intervention", "none")).config_type, value)
            elif key in nested and isinstance(value, dict):
                value = _from_dict(nested[key], value)
            elif isinstance(value, list):
                value = tuple(value)
            values[key] = value
        return kind(**values)
    return raw


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite during an episode."""


def protocol_transform(bundle: ClipBundle, resize_ratio: float = protocol.RESIZE_RATIO) -> T.Compose:
    """Resize the short side to ratio x size, centre-crop, normalise with the model's mean/std."""
    cfg = bundle.model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return T.Compose([
        T.Resize(int(round(size * resize_ratio)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])


def support_views(image: Image.Image) -> list[Image.Image]:
    """The authors' augmentation: plain; rotation 45 + colour jitter + flip; rotation; jitter; flip."""
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    rotate = T.RandomRotation((45, 45))
    flip = T.RandomHorizontalFlip(p=1.0)
    return [image, flip(jitter(rotate(image))), rotate(image), jitter(image), flip(image)]


def _load(dataset: Any, ids: list[int], transform: T.Compose, augment: bool = False) -> torch.Tensor:
    images = []
    for i in ids:
        image = dataset.load_image(i)
        views = support_views(image) if augment else [image]
        images.extend(transform(v) for v in views)
    return torch.stack(images)


def check_labels(method: FewShotCLIP, labels: torch.Tensor) -> None:
    """The episode's labels must index the method's classes."""
    n_way = int(labels.max().item()) + 1 if len(labels) else 0
    if n_way != len(method.class_names):
        raise ValueError(
            f"The method has {len(method.class_names)} class names {method.class_names}, but the "
            f"episode's labels are 0..{n_way - 1} ({n_way}-way). Pass one name per episode class."
        )


def train_episode(
    method: FewShotCLIP, images: torch.Tensor, labels: torch.Tensor, train: TrainConfig, precision: str = "auto"
) -> dict[str, Any]:
    """Full-batch training on the support set, ``images`` [n, 3, H, W] and ``labels`` [n] (forwards
    under ``precision``'s autocast, see :func:`~cdfsl_core.models.resolve_precision`); returns the
    first and last loss."""
    check_labels(method, labels)
    groups = method.parameter_groups()
    optimisers: list[torch.optim.Optimizer] = []
    if groups["lora"] or groups["scale"]:
        optimisers.append(torch.optim.AdamW(groups["lora"] + groups["scale"], lr=train.lr_lora))
    if groups["context"]:
        optimisers.append(torch.optim.SGD(groups["context"], lr=train.lr_context, momentum=train.momentum,
                                          weight_decay=train.weight_decay_context))
    if groups["intervention"]:
        optimisers.append(torch.optim.SGD(groups["intervention"], lr=train.lr_intervention))
    if not optimisers or train.steps == 0:
        return {"steps": 0, "loss_first": None, "loss_last": None}
    device = images.device
    method.train()
    first = last = None
    try:
        for step in range(train.steps):
            with autocast_for(device, precision):
                logits = method(images)
            loss = F.cross_entropy(logits.float(), labels)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at step {step} of {train.steps}")
            first = value if first is None else first
            last = value
            for optimiser in optimisers:
                optimiser.zero_grad(set_to_none=True)
            loss.backward()
            for optimiser in optimisers:
                optimiser.step()
    finally:
        method.eval()
    return {"steps": train.steps, "loss_first": first, "loss_last": last}


@torch.no_grad()
def evaluate(method: FewShotCLIP, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             precision: str = "auto") -> float:
    """Accuracy on ``images`` (forwards under ``precision``'s autocast)."""
    check_labels(method, labels)
    method.eval()
    device = images.device
    with autocast_for(device, precision):
        text, readout = method.text_features()
        correct = 0
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            logits = method.encode_image(chunk, readout) @ text.T
            correct += (logits.argmax(-1) == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


def _rounded(stats: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-block statistics for a JSON line: block keys as strings, 6 significant digits."""
    return {str(block): {k: float(f"{v:.6g}") for k, v in values.items()} for block, values in stats.items()}


def episode_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _manifest(config: RunConfig, episodes: EpisodeFile, device: torch.device, precision: str,
              checkpoint: str | None, weights: str) -> dict[str, Any]:
    import open_clip

    from cdfsl_core import __version__

    return {
        "package_version": __version__,
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available()
        else platform.processor() or platform.machine(),
        "precision": precision,
        "checkpoint": checkpoint,
        "weights": weights,  # sha256 of the weights file, or random:<arch>:seed<s>
        "episode_file": str(episodes.path) if episodes.path else None,
        "episode_file_sha256": episodes.sha256,
        "dataset_fingerprint": episodes.dataset_fingerprint,
        "short_class_policy": episodes.config.short_class_policy,
        "short_classes": episodes.short_classes,
    }


def _read_finished(path: Path) -> tuple[dict[int, dict[str, Any]], bool]:
    """Finished episodes by index, and whether a torn line (a write killed midway) was found."""
    if not path.exists():
        return {}, False
    finished: dict[int, dict[str, Any]] = {}
    torn = False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn = True
            continue
        finished[row["episode"]] = row
    return finished, torn


def _episode_file(config: RunConfig, dataset: Any, out: Path) -> tuple[EpisodeFile, Path, bool]:
    """The run's episodes (verified against the dataset), their path, and whether they are new
    (drawn now, to be written once everything else has been checked)."""
    path = Path(config.data.episode_file) if config.data.episode_file else out / "episodes.json"
    if path.exists():
        episodes = load_episodes(path, dataset)
        if episodes.config != config.episodes:
            raise EpisodeError(
                f"Episode file {path} was drawn with {episodes.config}, but the run asks for "
                f"{config.episodes}. Point --episode-file elsewhere or match the settings."
            )
        return episodes, path, False
    return generate_episodes(dataset, config.episodes), path, True


def _differences(saved: Any, new: Any, prefix: str = "") -> list[str]:
    """Every field that differs between two config dicts, with both values: ``data.root: '/a' -> '/b'``."""
    if isinstance(saved, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(saved) | set(new)):
            found += _differences(saved.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if saved == new else [f"{prefix.rstrip('.')}: {saved!r} (the run) vs {new!r} (now)"]


def _recorded_episode_file(out: Path, finished: dict[int, dict[str, Any]]) -> str | None:
    """The sha256 of the episode file a run's finished lines came from; a folder whose lines (or
    manifest) disagree is an error."""
    if not finished:  # nothing finished: nothing to mix with (a corrected command after a failed start)
        return None
    manifest = out / "manifest.json"
    recorded = json.loads(manifest.read_text()).get("episode_file_sha256") if manifest.exists() else None
    shas = {row.get("episode_file_sha256", recorded) for row in finished.values()}
    if len(shas) > 1 or (recorded is not None and shas and shas != {recorded}):
        raise RunFolderError(
            f"{out} mixes episodes of different episode files (sha256 {', '.join(sorted(str(s)[:12] for s in shas | {recorded}))}). "
            "Its mean pairs with nothing; rerun it into a new --out folder."
        )
    return next(iter(shas)) if shas else recorded


def _check_weights(out: Path, weights: str, finished: dict[int, dict[str, Any]]) -> None:
    """A folder with finished episodes resumes only with the model they were computed with (the
    weights' content, not their path); lines of two models in one folder are an error too."""
    if not finished:
        return
    manifest = out / "manifest.json"
    saved = json.loads(manifest.read_text()).get("weights") if manifest.exists() else None
    recorded = {row["weights"] for row in finished.values() if row.get("weights")} | ({saved} if saved else set())
    if len(recorded) > 1:
        raise RunFolderError(f"{out} mixes episodes of different models ({', '.join(sorted(short_identity(r) for r in recorded))}); "
                             "its mean belongs to no model. Rerun it into a new --out folder.")
    if recorded and recorded != {weights}:
        old = next(iter(recorded))
        raise RunFolderError(
            f"{out} holds {len(finished)} finished episode(s) computed with weights {short_identity(old)}, but the model now "
            f"is {short_identity(weights)} (the weights file was replaced, or another model was given). Resuming would average "
            "two models. Restore the original weights, or start a new run with a new --out folder.")


def _check_lora_rank(config: RunConfig) -> None:
    """A LoRA rank above the width of the layers it adapts is no low-rank adapter (and at
    --lora-rank 100000 fills memory): refused, naming the widths."""
    if config.method.adaptation not in ("lora", "coop+lora"):
        return
    from cdfsl_core.models import architecture_widths

    widths = architecture_widths(config.model.name)
    if widths and config.method.lora.rank > min(widths.values()):
        described = ", ".join(f"{tower} {width}" for tower, width in widths.items())
        raise ConfigError(f"lora rank {config.method.lora.rank} is above the width of the layers it adapts ({described} "
                          f"in {config.model.name}); a rank-r adapter needs r <= {min(widths.values())}. Pass a smaller "
                          f"--lora-rank (the papers' is {protocol.LORA_RANK}).")


def _check_config(out: Path, config: RunConfig, finished: dict[int, dict[str, Any]]) -> None:
    """A folder with finished episodes resumes only with the same config; a folder with none
    accepts any (a corrected command after a failed start)."""
    if not finished:
        return
    config_path = out / "config.json"
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        differences = _differences(saved, json.loads(json.dumps(config.to_dict())))
        if differences:
            raise RunFolderError(
                f"{out} holds {len(finished)} finished episode(s) of a run with another config: "
                f"{'; '.join(differences)}. Use a new --out folder, or rerun with the run's settings to resume it."
            )


def _check_episode_file(out: Path, episodes: EpisodeFile, finished: dict[int, dict[str, Any]]) -> None:
    """A folder with finished episodes resumes only on the episode file they came from."""
    recorded = _recorded_episode_file(out, finished)
    if recorded is not None and recorded != episodes.sha256:
        raise RunFolderError(
            f"{out} holds {len(finished)} finished episode(s) drawn from an episode file with sha256 {recorded[:16]}..., "
            f"but {episodes.path or 'the episode file'} now has sha256 {episodes.sha256[:16]}... (regenerated, or the data "
            "changed). Resuming would mix episodes of two files. Restore the original episode file and data, or start "
            "a new run with a new --out folder."
        )


def summarise(rows: list[dict[str, Any]], episodes: EpisodeFile) -> dict[str, Any]:
    ok = [r["accuracy"] for r in rows if r["status"] == "ok"]
    mean, ci = mean_ci95(ok)
    return {
        "mean_accuracy": json_number(mean),  # null with no finished episode
        "ci95": json_number(ci),  # null with fewer than 2 (undefined, not 0)
        "episodes": len(ok),
        "failed_episodes": [r["episode"] for r in rows if r["status"] != "ok"],
        "episodes_in_file": len(episodes),
        "episode_file_sha256": episodes.sha256,
    }


def prepare_episode(
    config: RunConfig, bundle: ClipBundle, dataset: Any, episodes: EpisodeFile, index: int,
    method: FewShotCLIP | None = None, transform: T.Compose | None = None,
) -> tuple[FewShotCLIP, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The method reset for episode ``index`` and the episode's tensors on the model's device:
    support images [N K (x5 views), 3, H, W], their labels [N K (x5)], query images [N Q, 3, H, W],
    their labels [N Q]. Everything random is seeded from (seed, index), so an episode computes the
    same whenever and wherever it is prepared."""
    episode = episodes.episodes[index]
    names = episodes.class_names(episode)
    if method is None:
        method = FewShotCLIP(bundle, names, config.method)
    else:
        method.set_classes(names)
    # Seed after building the method (its construction draws random numbers), so that an
    # episode computes the same whether the run started at it or before it.
    seed = episode_seed(config.episodes.seed, index)
    torch.manual_seed(seed)
    method.reset_parameters(torch.Generator().manual_seed(seed))
    device = next(bundle.model.parameters()).device
    transform = transform or protocol_transform(bundle, config.train.resize_ratio)
    support = _load(dataset, episode.support_ids, transform, config.train.augment).to(device)
    views = 5 if config.train.augment else 1
    support_labels = torch.tensor(episode.support_labels, device=device).repeat_interleave(views)
    query = _load(dataset, episode.query_ids, transform).to(device)
    query_labels = torch.tensor(episode.query_labels, device=device)
    return method, support, support_labels, query, query_labels


def load_run(folder: str | os.PathLike[str], bundle: ClipBundle | None = None) -> tuple[RunConfig, ClipBundle, Any, EpisodeFile]:
    """A finished (or partial) run's config, its model (freshly loaded, or ``bundle``), its dataset and episodes."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise RunFolderError(f"{folder} is not a run folder: config.json is missing. Pass the --out folder of "
                             "python -m cdfsl_core.finetune.")
    config = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
    dataset = load_dataset(config.data.dataset, config.data.root, **config.data.options)
    path = Path(config.data.episode_file) if config.data.episode_file else folder / "episodes.json"
    episodes = load_episodes(path, dataset)
    recorded = _recorded_episode_file(folder, _read_finished(folder / "episodes.jsonl")[0])
    if recorded is not None and recorded != episodes.sha256:
        raise RunFolderError(f"{folder} was run on an episode file with sha256 {recorded[:16]}..., but {path} now has "
                             f"sha256 {episodes.sha256[:16]}...; its episodes cannot be rebuilt. Restore the file.")
    weights = weights_identity(config.model.name, config.model.pretrained, config.episodes.seed)
    saved = json.loads((folder / "manifest.json").read_text()).get("weights") if (folder / "manifest.json").exists() else None
    if saved is not None and saved != weights:
        raise RunFolderError(f"{folder} was run with weights {short_identity(saved)}, but {config.model.pretrained} now holds "
                             f"{short_identity(weights)}; its fine-tuned models cannot be rebuilt. Restore the original weights.")
    if bundle is None:
        if config.model.pretrained is None:
            torch.manual_seed(config.episodes.seed)
        bundle = load_clip(config.model.name, config.model.pretrained, device=resolve_device(config.model.device))
    return config, bundle, dataset, episodes


def state_path(folder: str | os.PathLike[str], index: int) -> Path:
    """Where a run folder keeps the trained parameters of episode ``index``."""
    return Path(folder) / "states" / f"episode_{index:04d}.safetensors"


def save_state(method: FewShotCLIP, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(method.trainable_state(), str(tmp))


def load_state(method: FewShotCLIP, path: Path) -> None:
    from safetensors.torch import load_file

    device = next(method.model.parameters()).device
    method.load_trainable_state(load_file(str(path), device=str(device)))


def _check_precision(out: Path, device: str, precision: str, has_episodes: bool, allow_mixed: bool) -> None:
    """A resumed run computes on the device type and in the precision its first episodes did,
    unless mixing is allowed (every episode line records its own device and precision)."""
    path = out / "manifest.json"
    if not has_episodes or not path.exists() or allow_mixed:
        return
    saved = json.loads(path.read_text())
    now = {"device": device, "precision": precision}
    differ = {key: (saved.get(key), now[key]) for key in now if saved.get(key) != now[key]}
    if differ:
        described = "; ".join(f"{key}: the run has {old!r}, this process {new!r}" for key, (old, new) in differ.items())
        raise DeviceError(
            f"{out} holds episodes computed with another device or precision ({described}). A mean over "
            "both would mix precisions. Resume on the same kind of device and precision (--device, "
            "--precision), use a new --out folder, or pass --allow-mixed-precision to resume anyway "
            "(each episode line records its device and precision)."
        )


@dataclass
class RunPlan:
    """A run folder checked and ready: its config (paths absolute), device, precision, data and
    episodes. :func:`prepare_run` makes one; :func:`run_episodes` and :func:`summarize` use it."""

    config: RunConfig
    out: Path
    device: torch.device
    precision: str
    dataset: Any
    episodes: EpisodeFile
    weights: str = ""  # the model's identity (cdfsl_core.models.weights_identity), recorded in every line

    @property
    def results(self) -> Path:
        return self.out / "episodes.jsonl"

    def finished(self) -> dict[int, dict[str, Any]]:
        return _read_finished(self.results)[0]

    def todo(self) -> list[int]:
        finished = self.finished()
        return [i for i in range(len(self.episodes)) if i not in finished]

    def load_model(self) -> ClipBundle:
        if self.config.model.pretrained is None:
            torch.manual_seed(self.config.episodes.seed)  # random weights, the same in every process
        return load_clip(self.config.model.name, self.config.model.pretrained, device=self.device)


def prepare_run(config: RunConfig, out: str | os.PathLike[str], allow_mixed_precision: bool = False,
                device: torch.device | None = None) -> RunPlan:
    """Check everything, then write the run folder's config, episode file and manifest.

    Checked before anything is written: the config's values, the device and precision, the run
    folder (a folder with finished episodes resumes only with the same config, the same episode
    file, the same device type and precision), the data, the episode file and the weights (found
    and readable; they are loaded by whoever runs episodes). A folder without finished episodes
    accepts a corrected command. ``device``: the device the episodes will run on when it is not
    this process's (a sweep's driver plans for its GPU workers)."""
    out = Path(out)
    check_writable_folder(out, "run folder (--out)")
    config = config.with_absolute_paths()
    config.validate()
    device = device if device is not None else resolve_device(config.model.device)
    precision = resolve_precision(device, config.model.precision) if device.type != "cuda" or torch.cuda.is_available() \
        else ("bf16" if config.model.precision == "auto" else config.model.precision)
    finished = _read_finished(out / "episodes.jsonl")[0]
    _check_config(out, config, finished)
    _check_precision(out, device.type, precision, bool(finished), allow_mixed_precision)
    dataset = load_dataset(config.data.dataset, config.data.root, **config.data.options)
    episodes, episode_path, new_episodes = _episode_file(config, dataset, out)
    _check_episode_file(out, episodes, finished)
    # every image the episodes name, read to its header (a missing, empty or foreign file fails
    # here, before the folder is written; a body truncated midway fails when it is decoded)
    dataset.check_images([i for episode in episodes.episodes for i in (*episode.support_ids, *episode.query_ids)])
    checkpoint = checkpoint_file(config.model.name, config.model.pretrained)
    _check_lora_rank(config)
    weights = weights_identity(config.model.name, config.model.pretrained, config.episodes.seed)
    _check_weights(out, weights, finished)

    # ---- everything checked: from here on the run folder is written
    out.mkdir(parents=True, exist_ok=True)
    if not finished:
        write_json(out / "config.json", config.to_dict(), only_if_changed=True)
    if new_episodes:
        save_episodes(episodes, episode_path)
    manifest = _manifest(config, episodes, device, precision, checkpoint, weights)
    if not finished or not (out / "manifest.json").exists():
        write_json(out / "manifest.json", manifest, only_if_changed=True)
    elif allow_mixed_precision:
        saved = json.loads((out / "manifest.json").read_text())
        if (saved.get("device"), saved.get("precision")) != (manifest["device"], manifest["precision"]):
            write_json(out / "manifest.json", {**saved, "mixed_precision": True}, only_if_changed=True)
    return RunPlan(config, out, device, precision, dataset, episodes, weights)


def load_plan(out: str | os.PathLike[str], device: torch.device | None = None) -> RunPlan:
    """The plan of a prepared run folder, written by :func:`prepare_run` (in another process: a
    sweep's worker); checks the episode file against the run's record, writes nothing."""
    out = Path(out)
    if not (out / "config.json").exists():
        raise RunFolderError(f"{out} is not a prepared run folder: config.json is missing.")
    config = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    device = device if device is not None else resolve_device(config.model.device)
    precision = resolve_precision(device, config.model.precision)
    dataset = load_dataset(config.data.dataset, config.data.root, **config.data.options)
    episodes, _, new = _episode_file(config, dataset, out)
    if new:
        raise RunFolderError(f"{out}: its episode file is missing; prepare the run again.")
    finished = _read_finished(out / "episodes.jsonl")[0]
    _check_episode_file(out, episodes, finished)
    weights = weights_identity(config.model.name, config.model.pretrained, config.episodes.seed)
    planned = json.loads((out / "manifest.json").read_text()).get("weights") if (out / "manifest.json").exists() else None
    if planned is not None and planned != weights:
        raise RunFolderError(f"{out} was prepared for weights {short_identity(planned)}, but the model now is {short_identity(weights)} "
                             "(the weights file changed since); prepare the run again.")
    _check_weights(out, weights, finished)
    return RunPlan(config, out, device, precision, dataset, episodes, weights)


def run(config: RunConfig, out: str | os.PathLike[str], bundle: ClipBundle | None = None, progress: bool = True,
        save_states: bool = False, allow_mixed_precision: bool = False) -> dict[str, Any]:
    """Run (or resume) every episode of a run folder; returns the summary.

    :func:`prepare_run` checks everything before the folder is written; the model is loaded (or
    ``bundle`` used) only when episodes are left, so a finished run rerun only summarises and writes
    nothing. Paths are stored absolute, so the folder works from any working folder. Several
    processes may run the same folder at once: each episode is claimed (an OS file lock, released
    if its process dies) and recorded exactly once. ``save_states`` also keeps each episode's
    trained parameters (:func:`state_path`); it does not change results. Ctrl-C raises
    :class:`RunInterrupted`, whose message says what finished."""
    plan = prepare_run(config, out, allow_mixed_precision)
    todo = plan.todo()
    if todo:
        run_episodes(plan, bundle if bundle is not None else plan.load_model(), todo, progress, save_states)
    return summarize(plan)


def summarize(plan: RunPlan) -> dict[str, Any]:
    """The run's summary from its episode lines; ``summary.json`` is written only when it changed."""
    finished = plan.finished()
    summary = summarise([finished[i] for i in sorted(finished)], plan.episodes)
    write_json(plan.out / "summary.json", summary, only_if_changed=True)
    return summary


@contextmanager
def _claim(out: Path, index: int, wait: bool) -> Iterator[bool]:
    """Hold episode ``index`` of a run folder for this process (an exclusive OS lock on a file in
    ``.claims/``, which the OS releases when the process dies); yields False when another process
    holds it and ``wait`` is False."""
    folder = out / ".claims"
    folder.mkdir(exist_ok=True)
    with open(folder / f"episode_{index:05d}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")  # who computes it (a test kills that process)
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _append(path: Path, index: int, row: dict[str, Any]) -> bool:
    """Append one episode line unless the episode is already there; under a lock, synced. A torn
    last line (a writer killed midway) is ended first, so the new line stands on its own."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if index in _read_finished(path)[0]:
                return False
            with path.open("a+b") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell():
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")
                handle.write((json.dumps(row) + "\n").encode())
                handle.flush()
                os.fsync(handle.fileno())
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_episodes(plan: RunPlan, bundle: ClipBundle, indices: Sequence[int], progress: bool = True,
                 save_states: bool = False, on_episode: Callable[[int], None] | None = None) -> int:
    """Run the episodes ``indices`` of a prepared run that are not finished yet, each claimed
    first so that concurrent processes (two commands, a sweep's tasks) never compute or record one
    twice; episodes another process holds are waited for at the end (and run here if it died).
    Returns how many this call recorded; ``on_episode(index)`` is called after each one."""
    config, episodes = plan.config, plan.episodes
    transform = protocol_transform(bundle, config.train.resize_ratio)
    method: FewShotCLIP | None = None
    label = f"{config.method.adaptation}/{config.method.intervention} on {config.data.dataset}"
    recorded = 0
    pending = [i for i in indices if i not in plan.finished()]
    bar = tqdm(total=len(pending), desc=label, disable=not progress)
    try:
        for wait in (False, True):  # first what nobody holds, then wait for what others hold
            busy = []
            for index in pending:
                with _claim(plan.out, index, wait) as claimed:
                    if not claimed:
                        busy.append(index)
                        continue
                    if index not in plan.finished():  # another process may have finished it meanwhile
                        method, row = _episode(plan, bundle, index, method, transform, save_states)
                        recorded += _append(plan.results, index, row)
                    bar.update()
                    if on_episode is not None:
                        on_episode(index)
            pending = busy
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"{len(plan.finished())} of {len(episodes)} episodes finished and are saved in {plan.out}; "
            "rerun the same command to resume."
        ) from None
    finally:
        bar.close()
    return recorded


def _episode(plan: RunPlan, bundle: ClipBundle, index: int, method: FewShotCLIP | None, transform: T.Compose,
             save_states: bool) -> tuple[FewShotCLIP, dict[str, Any]]:
    """Train and evaluate one episode; its line."""
    config, episodes, precision = plan.config, plan.episodes, plan.precision
    start = time.perf_counter()
    method, support, support_labels, query, query_labels = prepare_episode(
        config, bundle, plan.dataset, episodes, index, method, transform)
    row: dict[str, Any] = {"episode": index, "classes": episodes.class_names(episodes.episodes[index])}
    try:
        # the queries at the initial state: the method's accuracy before training, and what the
        # intervention measures about its own action (ATHA: its edit size per block)
        with method.intervention.measuring() as before:
            row["accuracy_init"] = evaluate(method, query, query_labels, config.train.eval_batch_size, precision)
        row.update(train_episode(method, support, support_labels, config.train, precision))
        with method.intervention.measuring() as after:
            row["accuracy"] = evaluate(method, query, query_labels, config.train.eval_batch_size, precision)
        if before or after:
            row["intervention_stats"] = {"init": _rounded(before), "trained": _rounded(after)}
        row["status"] = "ok"
    except NonFiniteLoss as err:
        row.update(status="non-finite-loss", accuracy=None, message=str(err))
        tqdm.write(f"episode {index}: stopped, {err}; recorded as failed, not averaged")
    if save_states and row["status"] == "ok" and method.trainable_state():
        save_state(method, state_path(plan.out, index))  # before the row: a listed episode has its state
    logged = method.intervention.episode_log()  # what the intervention says of itself (ATHA: alpha, beta)
    if logged:
        row["intervention_log"] = logged
    row["device"], row["precision"] = plan.device.type, precision
    row["episode_file_sha256"] = episodes.sha256
    row["weights"] = plan.weights
    row["seconds"] = round(time.perf_counter() - start, 3)
    return method, row
