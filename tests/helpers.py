"""Shared test helpers (constants, generated files, a tiny run config), imported by tests and
by conftest.py. They live here, not in conftest.py, so that `from helpers import ...` never
meets another folder's conftest (the notebooks have their own)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cdfsl_core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from cdfsl_core.data import FewShotDataset
from cdfsl_core.episodes import EpisodeConfig
from cdfsl_core.lora import LoRAConfig
from cdfsl_core.methods import MethodConfig
from cdfsl_core.towers import register_tower
from cdfsl_core.towers.openclip import OpenCLIPVisionTower

EUROSAT_FOLDERS = [
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
]


def write_image(path: Path, seed: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


CHESTX_ROWS = [
    ("00000001_000.png", "Cardiomegaly"),
    ("00000001_001.png", "Cardiomegaly|Emphysema"),
    ("00000002_000.png", "No Finding"),
    ("00000003_000.png", "Atelectasis"),
    ("00000004_000.png", "Effusion"),
    ("00000005_000.png", "Infiltration"),
    ("00000006_000.png", "Mass"),
    ("00000007_000.png", "Nodule"),
    ("00000008_000.png", "Pneumothorax"),
    ("00000009_000.png", "Pneumonia"),
    ("00000010_000.png", "Hernia"),
    ("00000011_000.png", "Atelectasis"),
]


class LabelsOnly(FewShotDataset):
    """A dataset of labels only, for episode tests (no images are read)."""

    def __init__(self, counts: list[int], name: str = "labels-only") -> None:
        self.name = name
        self.classes = [f"class {c}" for c in range(len(counts))]
        self.targets = [c for c, n in enumerate(counts) for _ in range(n)]
        self.transform = None

    def image_key(self, index: int) -> str:
        return f"{index}"


# A run small enough for unit tests: the 2-block test architecture with random weights.
TINY = RunConfig(
    model=ModelConfig("cdfsl-test-vit", None, "cpu"),
    data=DataConfig("synthetic-crops", None, {"images_per_class": 8}),
    episodes=EpisodeConfig(n_way=3, k_shot=1, n_query=2, n_episodes=4, seed=0),
    method=MethodConfig("coop+lora", "tir", lora=LoRAConfig(rank=2)),
    train=TrainConfig(steps=3),
)


def embedded_images(indices: tuple[int, ...]):
    """The embedded CLIP and the synthetic source test images ``indices`` (one image per class), as
    the protocol's transform makes them: (bundle, images [len(indices), 3, H, W])."""
    import torch

    from cdfsl_core.data import load_dataset
    from cdfsl_core.models import EMBEDDED_MODEL, load_clip
    from cdfsl_core.preprocess import protocol_transform

    bundle = load_clip(*EMBEDDED_MODEL)
    dataset = load_dataset("synthetic", split="test", images_per_class=1)
    transform = protocol_transform(bundle, 1.15)
    return bundle, torch.stack([transform(dataset.load_image(i)) for i in indices])


@register_tower
class HandBuiltAdapter(OpenCLIPVisionTower):
    """The tests' hand-built towers (``HandBuiltTower``: ``ln_post``, ``proj`` and identity blocks
    under ``transformer.resblocks``) read as open_clip's: a family added the way a user adds one."""

    family = "hand-built (tests)"

    @classmethod
    def matches(cls, module) -> bool:
        return type(module).__name__ == "HandBuiltTower"
