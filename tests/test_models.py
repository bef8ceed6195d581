"""CLIP loading: tiny registered architectures, checkpoint round trips, offline failures."""

from __future__ import annotations

import pytest
import torch

from cdfsl_core.errors import CheckpointError
from cdfsl_core.models import list_architectures, load_clip, main, save_checkpoint


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("cdfsl-test-vit")


def _outputs(bundle):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    tokens = bundle.tokenizer(["a photo of a forest.", "a photo of a river."])
    with torch.no_grad():
        return bundle.model.encode_image(images), bundle.model.encode_text(tokens)


def test_bundle_unpacks_to_model_preprocess_tokenizer(tiny):
    model, preprocess, tokenizer = tiny[:3]
    assert not model.training
    assert len(model.visual.transformer.resblocks) == 2
    assert tokenizer(["a photo of a cat."]).shape == (1, 16)
    from PIL import Image

    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_package_architectures_are_registered_with_open_clip():
    assert "cdfsl-test-vit" in list_architectures(package_only=True)
    assert "cdfsl-test-vit" in list_architectures()
    assert {"ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-B-16-quickgelu"} <= set(list_architectures())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_checkpoint_round_trip_gives_identical_outputs(tiny, tmp_path, suffix):
    path = save_checkpoint(tiny.model, tmp_path / f"tiny{suffix}")
    reloaded = load_clip("cdfsl-test-vit", pretrained=path)
    assert reloaded.info["checkpoint"] == str(path)
    for a, b in zip(_outputs(tiny), _outputs(reloaded)):
        assert torch.equal(a, b)
    fresh = load_clip("cdfsl-test-vit")  # a different random init: the comparison can fail
    assert not torch.equal(_outputs(tiny)[0], _outputs(fresh)[0])


def test_uncached_tag_fails_fast_without_network(no_network, tmp_path):
    with pytest.raises(CheckpointError, match=r"not on this machine.*cdfsl_core.models download ViT-B-16 openai"):
        load_clip("ViT-B-16", "openai", cache_dir=str(tmp_path))


def test_missing_checkpoint_path(no_network, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_clip("cdfsl-test-vit", tmp_path / "missing.safetensors")


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(CheckpointError, match=r"not a known tag.*openai"):
        load_clip("ViT-B-16", "not-a-tag")


def test_unknown_architecture():
    with pytest.raises(CheckpointError, match="Unknown architecture 'ViT-X-99'"):
        load_clip("ViT-X-99")


def test_checkpoint_of_another_architecture(tmp_path):
    other = load_clip("ViT-B-32")  # random weights; differs in every shape
    path = tmp_path / "b32.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.proj": other.model.visual.proj.detach().clone()}, str(path))
    with pytest.raises(CheckpointError, match="do not fit architecture 'cdfsl-test-vit'"):
        load_clip("cdfsl-test-vit", path)


def test_checkpoint_with_wrong_suffix(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="suffix '.ckpt'"):
        load_clip("cdfsl-test-vit", path)


def test_save_checkpoint_rejects_unknown_suffix(tiny, tmp_path):
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_checkpoint(tiny.model, tmp_path / "x.npz")


def test_models_cli_lists_package_architectures(capsys):
    assert main(["list"]) == 0
    assert "cdfsl-test-vit" in capsys.readouterr().out


@pytest.mark.slow
def test_vit_b16_builds_at_real_size_with_random_weights():
    bundle = load_clip("ViT-B-16")
    visual = bundle.model.visual
    assert len(visual.transformer.resblocks) == 12 and visual.transformer.width == 768
    assert visual.output_dim == 512
    with torch.no_grad():
        out = bundle.model.encode_image(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 512)
