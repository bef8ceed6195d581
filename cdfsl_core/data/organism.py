"""The model organism's pretraining data: scenes rendered fresh at every step, and their captions.

The organism is the embedded CLIP pretrained so that the papers' phenomena can emerge in it (the
research behind it: docs "The model organism"). Its source domain, ``synthetic-organism``, shows
each of the 64 source classes as a small object on a constant grey background, with small
distractor objects on some images (:func:`cdfsl_core.data.synthetic.render_scene`). Its objective
is CLIP's: symmetric InfoNCE between images and *captions*, not the 64 class prompts.

A caption is drawn from a grammar with a vocabulary of several hundred words:

    [opening] [article] [size] <pattern> <colour> [noun] [where] [distractors] [filler]

- the class is always named by its pattern and colour words, the words the class prompts
  ("a photo of a striped red shape.") use, so zero-shot through the prompts stays possible;
- the prompt's own template is rare (``PROMPT_RATE``);
- the main object's position is named in words ("in the top left");
- distractor objects are named ("next to a small dotted blue shape");
- filler words unrelated to the image ("on a quiet morning", "says the old farmer") make the text
  noisy as web captions are;
- a share of captions (``swap`` in :func:`caption_batch`) is exchanged between images of the
  batch: the mismatched pairs that keep CLIP's modality gap.

Every draw comes from a numpy ``Generator``, so a batch is a function of the seed and the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdfsl_core.data.synthetic import (
    COLOUR_NAMES,
    PATTERNS,
    SOURCE_COMBOS,
    Combo,
    Scene,
    image_rng,
    render_scene,
    to_uint8,
)

PROMPT_RATE = 0.05  # share of captions that are exactly the class prompt "a photo of a {class}."

OPENINGS = (
    "", "", "", "a photo of", "a picture of", "an image of", "a close view of", "a drawing of", "a sketch of",
    "here is", "look at", "we see", "there is", "this shows", "a snapshot of", "a render of", "my photo of",
    "a print of", "a scan of", "a card with",
)
SIZES = ("", "", "", "small", "tiny", "little", "modest", "compact", "neat", "bright", "pale", "soft", "plain-looking",
         "odd", "simple", "lonely", "single")
NOUNS = ("shape", "shape", "shape", "object", "thing", "figure", "form", "item", "piece", "token", "sign", "mark",
         "symbol", "patch", "blob", "badge", "emblem", "sticker", "tile", "cutout")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
WHERE = ("in the {row} {column}", "at the {row} {column}", "near the {row} {column} corner",
         "placed {row} {column}", "toward the {row} {column}")
FILLER_SUBJECTS = (
    "the old farmer", "my sister", "a tired teacher", "the museum", "our neighbour", "a young pilot",
    "the bakery", "a travelling singer", "the school", "my grandfather", "a sleepy cat", "the library",
    "a busy doctor", "the harbour", "a careful painter", "the village", "a quiet student", "the gallery",
    "a noisy parrot", "the garden club", "a retired sailor", "the city council", "a curious child",
    "the weather station", "an honest merchant", "the orchestra", "a patient nurse", "the fire station",
)
FILLER_VERBS = (
    "says", "thinks", "remembers", "believes", "noticed", "wrote", "mentioned", "claimed", "guessed",
    "reported", "whispered", "announced", "doubted", "explained", "imagined", "promised",
)
FILLER_TIMES = (
    "on a quiet morning", "after the rain", "during the long winter", "before breakfast", "at midnight",
    "in early spring", "on a windy evening", "last summer", "every tuesday", "during the festival",
    "after lunch", "in the late afternoon", "before the storm", "on a sunny weekend", "at dawn",
    "around noon", "in autumn", "over the holidays", "before the exam", "after the concert",
)
FILLER_WORDS = (
    "apple", "bridge", "candle", "desert", "engine", "forest", "guitar", "hammer", "island", "jacket", "kettle",
    "ladder", "mirror", "needle", "ocean", "pencil", "quilt", "river", "saddle", "tunnel", "umbrella", "valley",
    "window", "yacht", "zebra", "anchor", "basket", "cabin", "dragon", "feather", "glacier", "helmet", "igloo",
    "jungle", "kitten", "lantern", "meadow", "napkin", "orchard", "pepper", "rocket", "spoon", "tractor",
    "violin", "walrus", "blanket", "compass", "dolphin", "envelope", "fountain", "goblet", "harvest", "ivory",
    "journal", "kingdom", "lemon", "marble", "nest", "oven", "parade", "quarry", "ribbon", "scarf", "thunder",
    "velvet", "whistle", "arrow", "butter", "cactus", "dune", "elbow", "fence", "garlic", "honey", "insect",
    "jelly", "kite", "lobster", "mountain", "noodle", "olive", "piano", "rabbit", "salad", "tomato", "vase",
    "wagon", "almond", "bicycle", "cherry", "donkey", "eagle", "falcon", "giraffe", "hazel", "iceberg", "jasmine",
    "koala", "lizard", "mango", "nutmeg", "otter", "pumpkin", "raven", "squirrel", "tulip", "wheat", "yogurt",
    "acorn", "barrel", "canyon", "daisy", "ember", "fossil", "gravel", "hollow", "lagoon", "moss", "pebble",
    "reef", "sparrow", "timber", "willow", "beacon", "chimney", "ferry", "granite", "market", "pillow",
    "saucer", "teapot", "statue", "railway", "stadium", "bakery", "theatre", "castle", "temple", "factory",
)
FILLERS = (
    "{time}", "{subject} {verb}", "{subject} {verb} {time}", "beside a {word}", "with a {word} nearby",
    "not a {word}", "like a {word} and a {word}", "from the {word} series", "{time} near the {word}",
)
DISTRACTOR_LINKS = ("next to", "beside", "with", "and", "near", "together with")


def class_words(combo: Combo) -> tuple[str, str]:
    """The pattern and colour words of a class (the words of its prompt)."""
    return PATTERNS[combo[1]], COLOUR_NAMES[combo[0]]


def class_prompt(combo: Combo) -> str:
    """The zero-shot prompt of a class, "a photo of a striped red shape."."""
    pattern, colour = class_words(combo)
    return f"a photo of a {pattern} {colour} shape."


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _where(centre: tuple[float, float], rng: np.random.Generator) -> str:
    """The main object's position in words, from its centre in pixels from the image centre."""
    cx, cy = centre
    column = COLUMNS[0 if cx < -6 else 2 if cx > 6 else 1]
    row = ROWS[0 if cy < -6 else 2 if cy > 6 else 1]
    return _pick(rng, WHERE).format(row=row, column=column)


def _filler(rng: np.random.Generator) -> str:
    return _pick(rng, FILLERS).format(time=_pick(rng, FILLER_TIMES), subject=_pick(rng, FILLER_SUBJECTS),
                                      verb=_pick(rng, FILLER_VERBS), word=_pick(rng, FILLER_WORDS))


def caption(scene: Scene, combo: Combo, rng: np.random.Generator) -> str:
    """One caption of ``scene`` (whose main object is of class ``combo``), drawn from the grammar."""
    if rng.random() < PROMPT_RATE:
        return class_prompt(combo)
    pattern, colour = class_words(combo)
    if rng.random() < 0.5:  # both orders: the words, not one sentence per class
        words = [_pick(rng, SIZES), pattern, colour, _pick(rng, NOUNS)]
    else:
        words = [_pick(rng, SIZES), colour, pattern, _pick(rng, NOUNS)]
    opening = _pick(rng, OPENINGS)
    article = "an" if next(w for w in words if w)[0] in "aeiou" else "a"
    parts = [opening, article, *words]
    if rng.random() < 0.5:
        parts.append(_where(scene.centre, rng))
    for other in scene.distractors:
        if rng.random() < 0.8:  # usually named: something some heads are about, on some images only
            d_pattern, d_colour = class_words(other)
            parts.append(f"{_pick(rng, DISTRACTOR_LINKS)} a small {d_pattern} {d_colour} {_pick(rng, NOUNS)}")
    if rng.random() < 0.6:
        parts.append(_filler(rng))
    return " ".join(p for p in parts if p) + "."


def vocabulary() -> set[str]:
    """Every word the grammar can write (the class words included)."""
    pieces = (OPENINGS + SIZES + NOUNS + ROWS + COLUMNS + WHERE + FILLER_SUBJECTS + FILLER_VERBS + FILLER_TIMES
              + FILLER_WORDS + FILLERS + DISTRACTOR_LINKS + PATTERNS + COLOUR_NAMES + ("a", "an", "small"))
    words = set()
    for piece in pieces:
        for word in piece.replace("{", " {").split():
            if not word.startswith("{"):
                words.add(word.strip("."))
    return words


@dataclass(frozen=True)
class CaptionBatch:
    """One pretraining batch of the organism world."""

    images: np.ndarray  # uint8 [B, 64, 64, 3]
    captions: list[str]  # caption i describes image i, except where ``swapped`` is True
    labels: np.ndarray  # int [B]: source class of each image's main object
    swapped: np.ndarray  # bool [B]: the caption belongs to another image of the batch


def caption_batch(rng: np.random.Generator, batch_size: int, swap: float = 0.15,
                  distractor_rate: float = 0.3) -> CaptionBatch:
    """``batch_size`` scenes rendered fresh from ``rng`` with their captions; a share ``swap`` of the
    captions is exchanged among themselves (a random derangement of that subset), so those
    images are paired with another image's caption."""
    if not 0 <= swap <= 1:
        raise ValueError(f"swap={swap}: expected a share in [0, 1]")
    labels = rng.integers(len(SOURCE_COMBOS), size=batch_size)
    images = np.empty((batch_size, 64, 64, 3), dtype=np.uint8)
    captions = []
    for i, label in enumerate(labels):
        combo = SOURCE_COMBOS[int(label)]
        scene = render_scene(rng, combo, distractor_rate)
        images[i] = to_uint8(scene.image)
        captions.append(caption(scene, combo, rng))
    swapped = np.zeros(batch_size, dtype=bool)
    chosen = np.flatnonzero(rng.random(batch_size) < swap)
    if len(chosen) >= 2:
        shifted = np.roll(chosen, 1)  # a cycle: nobody keeps their own caption
        texts = [captions[j] for j in shifted]
        for i, text in zip(chosen, texts):
            captions[i] = text
        swapped[chosen] = True
    return CaptionBatch(images, captions, labels, swapped)


def scene_of(class_index: int, index: int, seed: int = 0, split: str = "test") -> Scene:
    """The scene behind ``synthetic-organism`` image ``index`` of class ``class_index`` (the same
    pixels as the registered dataset's, with its mask): what the monitors need to tell background
    from object patches."""
    rng = image_rng("synthetic-organism", class_index, index, seed, split)
    return render_scene(rng, SOURCE_COMBOS[class_index])
