"""The embedded world: a procedurally generated source domain and four shifted target domains.

Vocabulary: 10 colours x 10 surface patterns = 100 classes named "<pattern> <colour> shape"
("striped red shape"). Each image shows one object whose silhouette (circle, star, crescent,
...) is drawn at random: a nuisance, not the class. The source domain ``synthetic`` holds 64
classes; the 36 held-out combinations are split among four target domains, so target classes
are novel but described with words the model has seen, as in real CDFSL (CLIP knows the words
"melanoma" or "forest" but was not tuned on those datasets).

Classes are colour x pattern rather than colour x silhouette because a small ViT trained from
scratch on 64 x 64 images learned colour at once but had not begun to separate silhouettes
after 800 steps (the loss sat at ln 6.4, uniform over the silhouettes of a colour); patterns are
local texture that 8 x 8 patch embeddings see directly.

Each domain has its own renderer; the shift from the source grows in the order of the real
benchmark's distance from miniImageNet:

=====================  ==========  =======================================================
name                   classes     what changes from the source
=====================  ==========  =======================================================
synthetic              64          (source) one large patterned object on a pastel background
synthetic-crops        12          mottled, spotted natural texture on a soil background
synthetic-satellite    10          top-down tiles: many small copies, finer pattern, striped field
synthetic-lesions      7           one irregular, blurred blob blended into skin tones
synthetic-xray         7           grey, low contrast, heavy noise (colour is gone)
synthetic-organism     64          (source of the model organism) the source's classes as one
                                   small object on a constant light-grey background, with small
                                   distractor objects of other classes on some images
=====================  ==========  =======================================================

``synthetic-organism`` is a second rendering of the source classes, built for pretraining a model
in which attention sinks can form (the model organism, :mod:`cdfsl_core.data.organism`): the
background is one constant grey (pixel noise of 0.004), so most patches carry no information and
every image has tokens that are the same everywhere, the setting in which small transformers park
attention on a fixed token; the object is small (radius 10 to 13 pixels: about 80% of the 8 x 8
patches are pure background) and placed anywhere; about 30% of images carry one or two small
distractor objects (radius 4.5 to 6) of other source classes, which the pretraining captions name,
so heads that read the distractors have images where they have nothing to do. The target domains
are unchanged.

Images are 64 x 64 RGB, deterministic: image ``i`` of class ``c`` uses the random stream
``SeedSequence([seed, domain, c, i + split offset])``. Rendering is vectorised numpy
(``benchmarks/bench_synthetic.py`` measures images per second).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from cdfsl_core.data.base import FewShotDataset, Transform
from cdfsl_core.data.registry import register_dataset
from cdfsl_core.errors import DatasetError

IMAGE_SIZE = 64
MAX_TILT = np.deg2rad(20)  # objects are drawn upright within +-20 degrees
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.68, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.88),
    "purple": (0.55, 0.18, 0.75),
    "pink": (0.98, 0.50, 0.72),
    "brown": (0.50, 0.30, 0.12),
    "black": (0.06, 0.06, 0.06),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "frame", "crescent", "bar")  # nuisance
PATTERNS = ("plain", "striped", "dotted", "checkered", "grid", "zigzag", "wavy", "ringed", "speckled", "diagonal")
COLOUR_NAMES = tuple(COLOURS)

Combo = tuple[int, int]  # (colour index, pattern index)


def _held_out() -> dict[str, list[Combo]]:
    """The 36 combinations kept out of the source, split among the targets.

    Offsets (pattern - colour) mod 10 of 0, 1, 2 and six of offset 3 are held out. xray and
    lesions get seven combinations with seven different patterns each, so they stay solvable
    without colour.
    """
    offset = lambda d, cs: [(c, (c + d) % 10) for c in cs]  # noqa: E731
    return {
        "synthetic-crops": offset(0, [7, 8, 9]) + offset(1, [7, 8, 9]) + offset(3, range(6)),
        "synthetic-satellite": offset(2, range(10)),
        "synthetic-lesions": offset(1, range(7)),
        "synthetic-xray": offset(0, range(7)),
    }


TARGET_COMBOS: dict[str, list[Combo]] = _held_out()
_HELD = {combo for combos in TARGET_COMBOS.values() for combo in combos}
SOURCE_COMBOS: list[Combo] = [(c, s) for c in range(10) for s in range(10) if (c, s) not in _HELD]
DOMAINS = ("synthetic", *TARGET_COMBOS, "synthetic-organism")  # index = domain id in the seed
SPLIT_OFFSETS = {"train": 0, "test": 1_000_000}  # held-out source images use another index range


def combo_name(combo: Combo) -> str:
    """``(colour, pattern)`` -> "striped red shape"."""
    return f"{PATTERNS[combo[1]]} {COLOUR_NAMES[combo[0]]} shape"


# ---------------------------------------------------------------- geometry
_AXIS = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) - IMAGE_SIZE / 2
_X, _Y = np.meshgrid(_AXIS, _AXIS)  # [H, W], origin at the centre, y down


def _interp_matrix(coarse: int) -> np.ndarray:
    """[64, coarse] bilinear upsampling matrix: smooth noise = A @ n @ A.T."""
    pos = (np.arange(IMAGE_SIZE) + 0.5) * coarse / IMAGE_SIZE - 0.5
    lo = np.clip(np.floor(pos).astype(int), 0, coarse - 1)
    hi = np.clip(lo + 1, 0, coarse - 1)
    w = np.clip(pos - lo, 0, 1)
    a = np.zeros((IMAGE_SIZE, coarse), dtype=np.float32)
    a[np.arange(IMAGE_SIZE), lo] += 1 - w
    a[np.arange(IMAGE_SIZE), hi] += w
    return a


_UP = {n: _interp_matrix(n) for n in (4, 8, 16)}


def _smooth_noise(rng: np.random.Generator, coarse: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], [64, 64]."""
    a = _UP[coarse]
    return a @ rng.uniform(-1, 1, (coarse, coarse)).astype(np.float32) @ a.T


def _shape_field(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A field that is < 1 inside the unit-size shape (u, v in units of the shape radius)."""
    name = SHAPES[shape]
    if name == "circle":
        return np.sqrt(u * u + v * v)
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) * 1.15
    if name == "triangle":
        return 2.0 * np.maximum.reduce([-v - 0.1, 0.5 * v + 0.866 * u, 0.5 * v - 0.866 * u]) + 0.05
    if name == "star":
        r = np.sqrt(u * u + v * v)
        return r / (0.62 + 0.38 * np.cos(5 * np.arctan2(v, u)))
    if name == "cross":
        return np.minimum(np.maximum(np.abs(u) * 3.0, np.abs(v)), np.maximum(np.abs(v) * 3.0, np.abs(u)))
    if name == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.72) * 3.6
    if name == "diamond":
        return np.abs(u) + np.abs(v)
    if name == "frame":  # a hollow square
        return np.abs(np.maximum(np.abs(u), np.abs(v)) * 1.15 - 0.75) * 3.6
    if name == "crescent":
        r = np.sqrt(u * u + v * v)
        r2 = np.sqrt((u - 0.5) ** 2 + v * v)
        return np.maximum(r, 0.85 / np.maximum(r2, 1e-3))
    if name == "bar":
        return np.maximum(np.abs(u) * 1.05, np.abs(v) * 3.2)
    raise ValueError(name)  # pragma: no cover


def _object(
    rng: np.random.Generator, radius: float, cx: float, cy: float, softness: float,
    x: np.ndarray = _X, y: np.ndarray = _Y, wobble: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random silhouette (nuisance, not the class): soft mask in [0, 1] and the object's own
    pixel coordinates (u, v), tilted by at most MAX_TILT, for drawing its pattern."""
    angle = rng.uniform(-MAX_TILT, MAX_TILT)
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    field = _shape_field(int(rng.integers(len(SHAPES))), u / radius, v / radius)
    if wobble is not None:
        field = field * wobble
    return np.clip((1.0 - field) * radius / softness + 0.5, 0.0, 1.0), u, v


def _pattern(rng: np.random.Generator, pattern: int, u: np.ndarray, v: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The class's surface pattern in {0, 1} (1: the colour, 0: its darker or lighter shade),
    in object pixel coordinates; ``scale`` shrinks it (small copies of the satellite domain)."""
    name = PATTERNS[pattern]
    u, v = (u + rng.uniform(0, 16)) / scale, (v + rng.uniform(0, 16)) / scale
    if name == "plain":
        return np.ones_like(u)
    if name == "striped":
        return (np.sin(2 * np.pi * v / 7) > 0).astype(np.float32)
    if name == "dotted":
        return (((np.mod(u, 8) - 4) ** 2 + (np.mod(v, 8) - 4) ** 2) > 5).astype(np.float32)
    if name == "checkered":
        return np.mod(np.floor(u / 5) + np.floor(v / 5), 2).astype(np.float32)
    if name == "grid":
        return ((np.mod(u, 9) > 2) & (np.mod(v, 9) > 2)).astype(np.float32)
    if name == "zigzag":
        return (np.sin(2 * np.pi * (v + 2.5 * np.abs(np.mod(u, 8) - 4)) / 8) > 0).astype(np.float32)
    if name == "wavy":
        return (np.sin(2 * np.pi * (v + 2.5 * np.sin(2 * np.pi * u / 14)) / 7) > 0).astype(np.float32)
    if name == "ringed":
        return (np.sin(2 * np.pi * np.sqrt(u * u + v * v) / 6) > 0).astype(np.float32)
    if name == "speckled":
        return (rng.random(u.shape) > 0.5).astype(np.float32)
    if name == "diagonal":
        return (np.sin(2 * np.pi * (u + v) / 9) > 0).astype(np.float32)
    raise ValueError(name)  # pragma: no cover


def _colour(rng: np.random.Generator, colour: int, jitter: float) -> np.ndarray:
    return np.clip(np.asarray(COLOURS[COLOUR_NAMES[colour]]) + rng.uniform(-jitter, jitter, 3), 0, 1).astype(np.float32)


def _patterned_fill(rng: np.random.Generator, combo: Combo, u: np.ndarray, v: np.ndarray, jitter: float,
                    scale: float = 1.0) -> np.ndarray:
    """[H, W, 3]: the class colour where the pattern is 1, a darker (or, for dark colours, lighter)
    shade of it where it is 0."""
    colour = _colour(rng, combo[0], jitter)
    shade = colour * 0.45 if colour.mean() > 0.3 else colour + 0.45
    p = _pattern(rng, combo[1], u, v, scale)[..., None]
    return colour * p + shade * (1 - p)


def _compose(background: np.ndarray, fill: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """background, fill: [H, W, 3]; mask: [H, W]."""
    m = mask[..., None]
    return background * (1 - m) + fill * m


# ---------------------------------------------------------------- renderers, one per domain
def _render_source(rng: np.random.Generator, combo: Combo) -> np.ndarray:
    base = rng.uniform(0.62, 0.95, 3).astype(np.float32)
    background = base + 0.06 * _smooth_noise(rng, 8)[..., None]
    mask, u, v = _object(rng, rng.uniform(16, 24), *rng.uniform(-6, 6, 2), softness=1.0)
    return _compose(background, _patterned_fill(rng, combo, u, v, 0.06), mask)


def _render_crops(rng: np.random.Generator, combo: Combo) -> np.ndarray:
    field = np.asarray([0.62, 0.70, 0.48], dtype=np.float32) + rng.uniform(-0.08, 0.08, 3).astype(np.float32)
    background = field * (1 + 0.12 * _smooth_noise(rng, 16)[..., None])  # a light, leafy field
    mask, u, v = _object(rng, rng.uniform(16, 24), *rng.uniform(-6, 6, 2), softness=1.5)
    mottle = 1 + 0.22 * _smooth_noise(rng, 16)
    spots = (_smooth_noise(rng, 16) > 0.6).astype(np.float32) * 0.35  # darker disease-like spots
    fill = 0.6 * _patterned_fill(rng, combo, u, v, 0.08) + 0.4 * field  # a natural, leafy colour cast
    fill = fill * (mottle * (1 - spots))[..., None]
    return _compose(background, fill, mask)


def _render_satellite(rng: np.random.Generator, combo: Combo) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    stripes = np.sin((_X * np.cos(angle) + _Y * np.sin(angle)) * rng.uniform(0.5, 0.9))
    field = np.asarray([0.42, 0.48, 0.30], dtype=np.float32) + rng.uniform(-0.08, 0.08, 3).astype(np.float32)
    background = field * (1 + 0.18 * stripes[..., None] + 0.15 * _smooth_noise(rng, 8)[..., None])
    period = rng.uniform(19, 23)
    ox, oy = rng.uniform(0, period, 2)
    x = np.mod(_X - ox, period) - period / 2  # tile the plane: one field evaluation, many copies
    y = np.mod(_Y - oy, period) - period / 2
    mask, u, v = _object(rng, rng.uniform(7, 9), 0.0, 0.0, softness=1.0, x=x, y=y)
    fill = _patterned_fill(rng, combo, _X - ox, _Y - oy, 0.10, scale=0.6) * 0.85  # a finer pattern
    return _compose(background, fill, mask)


_SKIN = np.asarray([0.87, 0.68, 0.56], dtype=np.float32)


def _render_lesions(rng: np.random.Generator, combo: Combo) -> np.ndarray:
    skin = _SKIN + rng.uniform(-0.08, 0.06, 3).astype(np.float32)
    background = skin * (1 + 0.05 * _smooth_noise(rng, 16)[..., None])
    wobble = 1 + 0.14 * _smooth_noise(rng, 4)  # irregular border
    mask, u, v = _object(rng, rng.uniform(16, 24), *rng.uniform(-4, 4, 2), softness=3.5, wobble=wobble)
    pigment = np.asarray([0.35, 0.20, 0.12], dtype=np.float32)
    fill = 0.2 * _patterned_fill(rng, combo, u, v, 0.08) + 0.5 * pigment + 0.3 * skin  # pattern diluted
    fill = fill * (1 + 0.2 * _smooth_noise(rng, 16)[..., None])
    return _compose(background, fill, mask * 0.9)


def _render_xray(rng: np.random.Generator, combo: Combo) -> np.ndarray:
    vignette = 1 - (_X**2 + _Y**2) / (2 * (IMAGE_SIZE / 2) ** 2)
    ribs = 0.04 * np.sin(_Y * rng.uniform(0.35, 0.5) + rng.uniform(0, 6.3))
    background = 0.25 + 0.15 * vignette + ribs + 0.05 * _smooth_noise(rng, 8)
    mask, u, v = _object(rng, rng.uniform(16, 24), *rng.uniform(-6, 6, 2), softness=2.5)
    grey_fill = _patterned_fill(rng, combo, u, v, 0.0).mean(axis=-1)  # colour survives only as grey levels
    grey = background + (0.08 + 0.3 * grey_fill) * mask + rng.normal(0, 0.06, mask.shape).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=-1)


ORGANISM_GREY = 0.82  # the organism source's constant background level
ORGANISM_DISTRACTOR_RATE = 0.3  # share of organism images with distractors


@dataclass(frozen=True)
class Scene:
    """One rendered organism image with what its caption may name."""

    image: np.ndarray  # float [64, 64, 3] in [0, 1]
    mask: np.ndarray  # float [64, 64]: the union of the objects' soft masks (0: pure background)
    centre: tuple[float, float]  # the main object's centre, pixels from the image centre (x right, y down)
    distractors: tuple[Combo, ...]  # the combinations of the small distractor objects


def render_scene(rng: np.random.Generator, combo: Combo, distractor_rate: float = ORGANISM_DISTRACTOR_RATE) -> Scene:
    """An organism source image: one small object of ``combo`` on the constant grey background,
    and on a share ``distractor_rate`` of images one or two small objects of other source classes."""
    background = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), ORGANISM_GREY, dtype=np.float32)
    background += rng.normal(0, 0.004, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    cx, cy = rng.uniform(-18, 18, 2)
    mask, u, v = _object(rng, rng.uniform(10, 13), cx, cy, softness=1.0)
    image = _compose(background, _patterned_fill(rng, combo, u, v, 0.06), mask)
    distractors: list[Combo] = []
    if rng.random() < distractor_rate:
        for _ in range(int(rng.integers(1, 3))):
            other = SOURCE_COMBOS[int(rng.integers(len(SOURCE_COMBOS)))]
            dx, dy = rng.uniform(-26, 26, 2)
            small, du, dv = _object(rng, rng.uniform(4.5, 6), dx, dy, softness=1.0)
            small = small * (mask < 0.05)  # never drawn over the main object
            image = _compose(image, _patterned_fill(rng, other, du, dv, 0.06), small)
            mask = np.maximum(mask, small)
            distractors.append(other)
    return Scene(image, mask, (float(cx), float(cy)), tuple(distractors))


def _render_organism(rng: np.random.Generator, combo: Combo) -> np.ndarray:
    return render_scene(rng, combo).image


RENDERERS: dict[str, Callable[[np.random.Generator, Combo], np.ndarray]] = {
    "synthetic": _render_source,
    "synthetic-crops": _render_crops,
    "synthetic-satellite": _render_satellite,
    "synthetic-lesions": _render_lesions,
    "synthetic-xray": _render_xray,
    "synthetic-organism": _render_organism,
}
DOMAIN_COMBOS: dict[str, list[Combo]] = {"synthetic": SOURCE_COMBOS, **TARGET_COMBOS,
                                         "synthetic-organism": SOURCE_COMBOS}


def image_rng(domain: str, class_index: int, index: int, seed: int = 0, split: str = "train") -> np.random.Generator:
    """The random stream of one image: ``SeedSequence([seed, domain id, class, index + split offset])``."""
    stream = np.random.SeedSequence([seed, DOMAINS.index(domain), class_index, index + SPLIT_OFFSETS[split]])
    return np.random.Generator(np.random.PCG64(stream))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] -> uint8, rounded."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def render(domain: str, class_index: int, index: int, seed: int = 0, split: str = "train") -> np.ndarray:
    """One image as uint8 [64, 64, 3]; the same arguments always give the same pixels."""
    image = RENDERERS[domain](image_rng(domain, class_index, index, seed, split), DOMAIN_COMBOS[domain][class_index])
    return to_uint8(image)


@dataclass(frozen=True)
class SyntheticSpec:
    """Settings of a synthetic dataset."""

    domain: str  # one of DOMAINS
    images_per_class: int = 60  # enough for 5-way 5-shot with 15 queries
    seed: int = 0  # world seed
    split: str = "train"  # 'train' or 'test' (another index range of the same classes)


class SyntheticDataset(FewShotDataset):
    """Images rendered on demand; class-major order (all of class 0, then class 1, ...)."""

    def __init__(self, spec: SyntheticSpec, transform: Transform | None = None) -> None:
        if spec.domain not in DOMAIN_COMBOS:
            raise DatasetError(f"Unknown synthetic domain {spec.domain!r}; expected one of {DOMAINS}.")
        if spec.split not in SPLIT_OFFSETS:
            raise DatasetError(f"{spec.domain}: split={spec.split!r}; expected one of {tuple(SPLIT_OFFSETS)}.")
        if spec.images_per_class < 1:
            raise DatasetError(f"{spec.domain}: images_per_class={spec.images_per_class}; expected >= 1.")
        self.spec = spec
        self.name = spec.domain
        self.classes = [combo_name(c) for c in DOMAIN_COMBOS[spec.domain]]
        self.targets = [c for c in range(len(self.classes)) for _ in range(spec.images_per_class)]
        self.transform = transform

    def _coords(self, index: int) -> tuple[int, int]:
        return divmod(index, self.spec.images_per_class)

    def array(self, index: int) -> np.ndarray:
        """uint8 [64, 64, 3] pixels of image ``index``."""
        c, i = self._coords(index)
        return render(self.spec.domain, c, i, self.spec.seed, self.spec.split)

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.array(index))

    def image_key(self, index: int) -> str:
        c, i = self._coords(index)
        return f"{self.spec.domain}/seed{self.spec.seed}/{self.spec.split}/{c}/{i}"


def _register(domain: str, description: str) -> None:
    def loader(
        root: Path | None = None,
        transform: Transform | None = None,
        images_per_class: int = 60,
        seed: int = 0,
        split: str = "train",
    ) -> SyntheticDataset:
        return SyntheticDataset(SyntheticSpec(domain, images_per_class, seed, split), transform)

    loader.__doc__ = f"{description} (generated; ``root`` is ignored)."
    register_dataset(domain, description=description, needs_root=False)(loader)


_register("synthetic", "embedded source domain: 64 colour-pattern classes (like miniImageNet's 64)")
_register("synthetic-crops", "embedded target like CropDiseases: natural textures, nearest to the source")
_register("synthetic-satellite", "embedded target like EuroSAT: top-down tiles of small copies")
_register("synthetic-lesions", "embedded target like ISIC: blurred irregular blobs on skin tones")
_register("synthetic-xray", "embedded target like ChestX: grey, low contrast, noisy; farthest")
_register("synthetic-organism", "the source classes as small objects on a constant grey background, with distractors "
          "(the model organism's pretraining world)")
SYNTHETIC_TARGETS = tuple(TARGET_COMBOS)
