"""The configuration of a run, as data: every config dataclass, the intervention settings of the
built-in interventions, and the factories that build runs from the papers' protocol.

This module imports no torch (nor anything above it): commands read it before PyTorch loads, and
every layer above uses it. The dataclasses are split by concern (model, data, episodes, LoRA,
method, training) with a comment per field; their defaults come from :mod:`cdfsl_core.protocol`.
An intervention's settings type is registered here by name (:func:`register_intervention_config`;
``cdfsl_core.interventions.register_intervention`` does it for a plug-in), so a run's
``config.json`` round-trips without importing the intervention's code.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from cdfsl_core import protocol
from cdfsl_core.errors import ConfigError, EpisodeError
from cdfsl_core.names import ADAPTATIONS, PRECISIONS, SHORT_CLASS_POLICIES
from cdfsl_core.plugins import load_plugins

__all__ = [
    "ATHAConfig", "DataConfig", "EpisodeConfig", "LoRAConfig", "MethodConfig", "ModelConfig", "NoConfig", "RunConfig",
    "TIRConfig", "TIRRegisterConfig", "TestTimeRegisterConfig", "TrainConfig", "VALID_TARGETS", "episode_config", "episode_file_name", "intervention_config_type",
    "register_intervention_config", "run_config", "unregister_intervention_config",
]


# ----------------------------------------------------------------- intervention settings
@dataclass(frozen=True)
class NoConfig:
    """No settings."""


@dataclass(frozen=True)
class ATHAConfig:
    """ATHA settings; defaults from the paper and the authors' code (deviations are options)."""

    blocks: tuple[int, ...] | None = None  # before these vision blocks; None: all
    rho_head: float = protocol.ATHA_RHO_HEAD  # head set: floor(rho_head L) tokens with the largest max-class similarity
    rho_tail: float = protocol.ATHA_RHO_TAIL  # tail set: floor(rho_tail L) tokens with the smallest
    alpha_init: float = protocol.ATHA_ALPHA_INIT  # initial alpha at alpha_init_block, 0 elsewhere
    alpha_init_block: int | None = None  # None: n // 2 (6 of 12)
    tail_class: str = "least"  # push tail tokens away from the 'least' (code), 'most' similar class, or the 'mean'
    include_cls: bool = False  # True: rank CLS with the patches (the authors' code; we exclude it)
    text_norm: str = "none"  # class vectors from the read-out as it is ('none', the authors') or L2-normalised ('unit')


@dataclass(frozen=True)
class TIRConfig:
    """TIR settings; defaults from the paper and the authors' code."""

    blocks: tuple[int, ...] | None = None  # before these vision blocks; None: round(8n/12), round(10n/12): 8, 10 of 12
    rho: float = protocol.TIR_RHO  # top-k fraction per class, k = floor(rho L)
    lam: float = protocol.TIR_LAMBDA  # lambda of the weight rule (see token_text.tir_weights)


@dataclass(frozen=True)
class TestTimeRegisterConfig:
    """Test-time register settings (Jiang et al. 2025, "Vision Transformers Don't Need Trained
    Registers"); defaults from the authors' OpenCLIP ViT-B/16 configuration, carried to other depths
    (see docs/concepts/methods.md, test-time registers)."""

    __test__ = False  # not a pytest test class, whatever its name

    neurons: tuple[tuple[int, int], ...] = ()  # (block, neuron) pairs; empty: detected when the method is built
    top_k: int = 10  # register neurons kept, over all candidate blocks (the authors' 10)
    highest_block: int | None = None  # candidates in blocks 0..highest_block; None: round(5n/12) (5 of 12)
    outlier_block: int = -1  # outlier tokens are the high-norm patch tokens of this block's output (-1: the last)
    outlier_tau: float = 2.0  # high-norm: norm > tau x the image's median patch norm (the suite's definition)
    detect_dataset: str = "synthetic"  # the images neurons are detected on (a dataset name; its test split)
    detect_images: int = 64  # how many (the authors use 500 ImageNet images)
    detect_seed: int = 0
    register_init: str = "zeros"  # the appended token's value entering block 0: 'zeros' or 'mean' (of the patches)

    def __post_init__(self) -> None:  # JSON gives lists; keep the pairs hashable
        object.__setattr__(self, "neurons", tuple(tuple(int(v) for v in pair) for pair in self.neurons))


@dataclass(frozen=True)
class TIRRegisterConfig(TestTimeRegisterConfig):
    """TIR and a test-time register together: the register's settings plus TIR's."""

    tir_blocks: tuple[int, ...] | None = None  # TIR's blocks; None: its defaults
    rho: float = protocol.TIR_RHO
    lam: float = protocol.TIR_LAMBDA


_INTERVENTION_CONFIGS: dict[str, type] = {"none": NoConfig, "atha": ATHAConfig, "tir": TIRConfig,
                                          "test-time-register": TestTimeRegisterConfig,
                                          "tir+test-time-register": TIRRegisterConfig}


def register_intervention_config(name: str, config_type: type) -> None:
    """Make ``name``'s settings type known to configs (``cdfsl_core.interventions.register_intervention``
    calls it)."""
    _INTERVENTION_CONFIGS[name] = config_type


def unregister_intervention_config(name: str) -> None:
    _INTERVENTION_CONFIGS.pop(name, None)


def intervention_config_type(name: str) -> type:
    """The settings dataclass of intervention ``name``."""
    if name not in _INTERVENTION_CONFIGS:
        load_plugins("cdfsl.interventions")  # an installed plug-in registers itself when loaded
    if name not in _INTERVENTION_CONFIGS:
        raise ConfigError(f"Unknown intervention {name!r}; expected one of {', '.join(_INTERVENTION_CONFIGS)} "
                          "(register_intervention adds one).")
    return _INTERVENTION_CONFIGS[name]


# ----------------------------------------------------------------- episodes
MAX_EPISODES = 100_000  # per run: drawing the episode file takes about a second per 10,000 on a CPU


@dataclass(frozen=True)
class EpisodeConfig:
    """How episodes are drawn."""

    n_way: int = protocol.WAYS  # classes per episode
    k_shot: int = protocol.SHOTS[0]  # support images per class
    n_query: int = protocol.QUERIES  # query images per class
    n_episodes: int = protocol.EPISODES[protocol.SHOTS[0]]  # the papers: 800 (1-shot), 400 (5-shot); BSCD-FSL 600
    seed: int = 0  # episode i uses SeedSequence([seed, i])
    short_class_policy: str = "error"  # class with < k_shot + n_query images: error | skip | cycle

    def validate(self) -> None:
        for key in ("n_way", "k_shot", "n_query", "n_episodes"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise EpisodeError(f"{key}={value!r}: expected a positive integer.")
        if self.n_way < 2:
            raise EpisodeError(f"n_way={self.n_way}: expected at least 2 classes per episode.")
        if self.n_episodes > MAX_EPISODES:  # an episode file is drawn whole before the first episode runs
            raise EpisodeError(f"n_episodes={self.n_episodes}: expected at most {MAX_EPISODES} episodes per run (the "
                               "papers use 800 and 400); split a larger evaluation into runs with different --seed.")
        if self.short_class_policy not in SHORT_CLASS_POLICIES:
            raise EpisodeError(
                f"short_class_policy={self.short_class_policy!r}: expected one of {SHORT_CLASS_POLICIES}."
            )


# ----------------------------------------------------------------- method
VALID_TARGETS = ("q", "k", "v", "o", "qkv")


@dataclass(frozen=True)
class LoRAConfig:
    """Where and how LoRA adapts the model. Defaults: the ATHA/TIR authors' code."""

    rank: int = protocol.LORA_RANK  # r
    alpha: float = protocol.LORA_ALPHA  # scaling numerator
    scaling: str = "sqrt"  # 'sqrt': alpha / sqrt(r) (= 2, the authors'); 'linear': alpha / r (CLIP-LoRA)
    dropout: float = protocol.LORA_DROPOUT  # dropout on the adapter input
    targets: tuple[str, ...] = ("q", "k", "v")  # projections; ('qkv',) = one adapter on the fused matrix
    towers: tuple[str, ...] = ("visual", "text")  # which towers
    blocks: tuple[int, ...] | None = None  # block indices (None: all)

    @property
    def scale(self) -> float:
        if self.scaling == "sqrt":
            return self.alpha / math.sqrt(self.rank)
        if self.scaling == "linear":
            return self.alpha / self.rank
        raise ConfigError(f"LoRA scaling={self.scaling!r}; expected 'sqrt' or 'linear'.")

    def validate(self) -> None:
        bad = [t for t in self.targets if t not in VALID_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"LoRA targets {self.targets}: expected a non-empty subset of {VALID_TARGETS}.")
        if "qkv" in self.targets and set(self.targets) & {"q", "k", "v"}:
            raise ConfigError("LoRA targets: 'qkv' (fused) excludes 'q', 'k' and 'v'.")
        bad_towers = [t for t in self.towers if t not in ("visual", "text")]
        if bad_towers or not self.towers:
            raise ConfigError(f"LoRA towers {self.towers}: expected 'visual' and/or 'text'.")
        if self.rank < 1:
            raise ConfigError(f"LoRA rank={self.rank}: expected >= 1.")
        self.scale  # noqa: B018 - validates the scaling rule


@dataclass(frozen=True)
class MethodConfig:
    """What the method is; defaults follow the ATHA/TIR authors' code."""

    adaptation: str = "coop+lora"  # one of ADAPTATIONS
    intervention: str = "none"  # one of INTERVENTIONS
    template: str = protocol.PROMPT  # class prompt
    n_ctx: int = protocol.CONTEXT_VECTORS  # CoOp context vectors, initialised from the template's leading words
    logit_scale: float | str = protocol.LOGIT_SCALE  # fixed s in s * cos (protocol.logit_scale(shots)), or 'learned' (CLIP's)
    text_readout_block: int | None = None  # text block whose read-out interventions compare with; None: n - 2 (10 of 12)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    intervention_config: Any = None  # the intervention's settings (ATHAConfig, TIRConfig, ...); None: its defaults

    def validate(self) -> None:
        if self.adaptation not in ADAPTATIONS:
            raise ConfigError(f"Unknown adaptation {self.adaptation!r}; expected one of {', '.join(ADAPTATIONS)}.")
        config_type = intervention_config_type(self.intervention)
        if self.intervention_config is not None and not isinstance(self.intervention_config, config_type):
            raise ConfigError(f"intervention {self.intervention!r} takes a {config_type.__name__}, got "
                              f"{type(self.intervention_config).__name__}.")
        if isinstance(self.logit_scale, str) and self.logit_scale != "learned":
            raise ConfigError(f"logit_scale={self.logit_scale!r}; expected a number or 'learned'.")

    def settings(self) -> Any:
        """The intervention's settings, its defaults when none were given."""
        return self.intervention_config if self.intervention_config is not None else \
            intervention_config_type(self.intervention)()


# ----------------------------------------------------------------- run
@dataclass(frozen=True)
class ModelConfig:
    """Which CLIP, where."""

    name: str = "cdfsl-synth-vit"  # open_clip architecture
    pretrained: str | None = "synthetic"  # tag or local weights file
    device: str = "auto"  # 'auto', 'cpu', 'cuda'
    precision: str = "auto"  # 'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32', 'bf16'
    tokenizer: str | None = None  # None: the architecture's own; a folder (Hugging Face tokenizers); 'none': vision only


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
    # steps (0 = before training, ``steps`` = after the last) at which the queries are measured while the
    # episode trains: accuracy, the intervention's own statistics and every registered probe's
    # (:mod:`cdfsl_core.probes`); empty: off. Written into config.json only when set.
    trajectory_steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's results."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        if not result["train"]["trajectory_steps"]:  # off: the config reads as before trajectories existed
            del result["train"]["trajectory_steps"]
        return result

    def json_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as it reads back from ``config.json`` (tuples as lists)."""
        return json.loads(json.dumps(self.to_dict()))

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
        steps = self.train.trajectory_steps
        bad = [s for s in steps if not isinstance(s, int) or not 0 <= s <= self.train.steps]
        if bad or list(steps) != sorted(set(steps)):
            raise ConfigError(f"trajectory_steps={list(steps)}: expected increasing, distinct steps in 0..{self.train.steps} "
                              "(0 is before training, the last is after the last step).")

    def with_absolute_paths(self) -> "RunConfig":
        """The same run with its paths (data root, episode file, local weights) absolute, so the
        run folder works from any working folder."""
        def absolute(path: str | None) -> str | None:  # normalised: "notebooks/../outputs" is "outputs"
            return None if path is None else os.path.abspath(os.path.expanduser(path))

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
                value = _from_dict(intervention_config_type(raw.get("intervention", "none")), value)
            elif key in nested and isinstance(value, dict):
                value = _from_dict(nested[key], value)
            elif isinstance(value, list):
                value = tuple(value)
            values[key] = value
        return kind(**values)
    return raw


# ----------------------------------------------------------------- factories from the protocol
def episode_config(shots: int, episodes: int | None = None, seed: int = 0, ways: int = protocol.WAYS, queries: int = protocol.QUERIES,
                   short_class_policy: str = "error") -> EpisodeConfig:
    """The protocol's episodes for a shot setting; ``episodes`` None: its count (800 or 400)."""
    count = episodes if episodes is not None else protocol.EPISODES.get(shots, protocol.EPISODES[max(protocol.EPISODES)])
    return EpisodeConfig(ways, shots, queries, count, seed, short_class_policy)


def episode_file_name(dataset: str, episodes: EpisodeConfig) -> str:
    """The name every run of a dataset and episode setting shares, so their differences are paired."""
    e = episodes
    return f"{dataset}_{e.n_way}w{e.k_shot}s{e.n_query}q_{e.n_episodes}ep_seed{e.seed}.json"


def run_config(dataset: str, shots: int, adaptation: str = "coop+lora", intervention: str = "none", *,
               episodes: int | None = None, steps: int = protocol.STEPS, seed: int = 0, model: str = "cdfsl-synth-vit",
               pretrained: str | None = "synthetic", device: str = "auto", precision: str = "auto",
               data_root: str | None = None, data_options: dict[str, Any] | None = None,
               episode_file: str | None = None, scale: float | str | None = None, lora_rank: int = protocol.LORA_RANK,
               intervention_config: Any = None, augment: bool = False, ways: int = protocol.WAYS, queries: int = protocol.QUERIES,
               short_class_policy: str = "error", trajectory_steps: Sequence[int] = (),
               tokenizer: str | None = None) -> RunConfig:
    """A run of the papers' protocol: ``shots``-shot episodes of ``dataset``, ``adaptation`` x
    ``intervention``; ``scale`` None: the protocol's logit scale for the shots. The default model is
    the embedded CLIP; ``episode_file`` None: the run folder's own."""
    return RunConfig(
        model=ModelConfig(model, pretrained, device, precision, tokenizer),
        data=DataConfig(dataset, data_root, dict(data_options or {}), episode_file),
        episodes=episode_config(shots, episodes, seed, ways, queries, short_class_policy),
        method=MethodConfig(adaptation, intervention, logit_scale=protocol.logit_scale(shots) if scale is None else scale,
                            lora=LoRAConfig(rank=lora_rank), intervention_config=intervention_config),
        train=TrainConfig(steps=steps, augment=augment, trajectory_steps=tuple(int(s) for s in trajectory_steps)),
    )
