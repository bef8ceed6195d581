"""The image cache gives the protocol transform's tensors bit for bit, decodes each image once, and
a run through it writes the lines a run without it writes.

The reference is torchvision's own transform applied to each image (``protocol_transform``); the
comparison is ``torch.equal``, not a tolerance. The positive control: a cache whose normalisation
divides before it subtracts (a plausible slip) is caught by the same comparison.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from cdfsl_core.data import load_dataset
from cdfsl_core.episode_loop import run_episode
from cdfsl_core.models import load_clip
from cdfsl_core.preprocess import ImageCache, load_images, protocol_transform


class Counting:
    """A dataset that counts its decodes."""

    def __init__(self, dataset):
        self.dataset, self.decodes = dataset, 0

    def load_image(self, index: int) -> Image.Image:
        self.decodes += 1
        return self.dataset.load_image(index)


@pytest.mark.parametrize("model", ["cdfsl-test-vit", "cdfsl-synth-vit"])
def test_the_cache_equals_the_transform_bit_for_bit(model):
    bundle = load_clip(model)
    transform = protocol_transform(bundle, 1.15)
    dataset = load_dataset("synthetic-satellite", images_per_class=4)
    ids = list(range(0, 16, 3))
    expected = torch.stack([transform(dataset.load_image(i)) for i in ids])
    cache = ImageCache(dataset, transform, "cpu")
    assert torch.equal(cache.load(ids), expected)
    assert torch.equal(cache.load(ids), expected)  # from the kept uint8 images
    assert torch.equal(load_images(dataset, ids, cache), expected)


def test_real_jpegs_are_equal_too(eurosat_root):
    dataset = load_dataset("eurosat", eurosat_root)
    transform = protocol_transform(load_clip("cdfsl-test-vit"), 1.15)
    ids = list(range(len(dataset)))[:8]
    assert torch.equal(ImageCache(dataset, transform, "cpu").load(ids),
                       torch.stack([transform(dataset.load_image(i)) for i in ids]))


def test_positive_control_another_normalisation_is_caught():
    transform = protocol_transform(load_clip("cdfsl-test-vit"), 1.15)
    dataset = load_dataset("synthetic-satellite", images_per_class=2)
    cache = ImageCache(dataset, transform, "cpu")
    ids = [0, 1, 2]
    cached = torch.stack([cache._uint8(i) for i in ids]).float().div(255)
    slipped = cached.div(cache.std).sub(cache.mean)
    assert not torch.equal(slipped, torch.stack([transform(dataset.load_image(i)) for i in ids]))


def test_each_image_is_decoded_once_within_the_budget():
    transform = protocol_transform(load_clip("cdfsl-test-vit"), 1.15)
    counting = Counting(load_dataset("synthetic-satellite", images_per_class=2))
    cache = ImageCache(counting, transform, "cpu")
    cache.load([0, 1, 2]), cache.load([1, 2, 3])
    assert counting.decodes == 4 and len(cache) == 4
    one = cache.bytes // 4
    small = ImageCache(counting, transform, "cpu", max_bytes=2 * one)  # room for two images
    counting.decodes = 0
    small.load([0, 1, 2]), small.load([0, 1, 2])
    assert len(small) == 2 and counting.decodes == 4  # the third, not kept, is decoded each time


def test_augmented_views_and_non_rgb_images_go_through_the_transform():
    transform = protocol_transform(load_clip("cdfsl-test-vit"), 1.15)
    dataset = load_dataset("synthetic-satellite", images_per_class=2)
    cache = ImageCache(dataset, transform, "cpu")
    torch.manual_seed(1)
    expected = load_images(dataset, [0, 1], transform, augment=True)
    torch.manual_seed(1)
    assert torch.equal(load_images(dataset, [0, 1], cache, augment=True), expected)
    grey = T.Compose([T.Grayscale(), *transform.transforms[:-1], T.Normalize([0.5], [0.25])])
    counting = Counting(dataset)
    assert torch.equal(ImageCache(counting, grey, "cpu").load([0, 1]),
                       torch.stack([grey(dataset.load_image(i)) for i in (0, 1)]))
    assert counting.decodes == 2  # not kept, but decoded once per load
    with pytest.raises(ValueError, match="ToTensor and Normalize"):
        ImageCache(dataset, T.Compose(transform.transforms[:2]), "cpu")


def test_a_run_through_the_cache_writes_the_lines_of_the_plain_transform(tmp_path, monkeypatch):
    """The runner's cached images (the runner does use them: an empty cache is not mistaken for no
    transform): every episode's accuracies and losses equal, to the bit, those of the same episode
    prepared with the plain transform."""
    from dataclasses import replace

    from helpers import TINY

    from cdfsl_core.episodes import generate_episodes
    from cdfsl_core.run_folder import RunFolder
    from cdfsl_core.runner import run

    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    config = replace(TINY, method=replace(TINY.method, intervention="atha"))
    loads = []
    original = ImageCache.load
    monkeypatch.setattr(ImageCache, "load", lambda self, ids: loads.append(len(ids)) or original(self, ids))
    run(config, tmp_path / "run", bundle=bundle, progress=False)  # one at a time: bit-exact
    assert len(loads) == 2 * config.episodes.n_episodes  # the support and the queries of every episode
    lines = RunFolder(tmp_path / "run").finished()
    dataset = load_dataset(config.data.dataset, None, **config.data.options)
    episodes = generate_episodes(dataset, config.episodes)
    for i in range(config.episodes.n_episodes):
        _, row = run_episode(config, bundle, dataset, episodes, i, None, protocol_transform(bundle, 1.15), "fp32")
        for key in ("accuracy_init", "accuracy", "loss_first", "loss_last"):
            assert lines[i][key] == row[key], (i, key)
