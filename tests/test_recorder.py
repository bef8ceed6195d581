"""The recorder: key scheme, agreement with open_clip and torch, interventions seen, hooks removed."""

from __future__ import annotations

import pytest
import torch

from analysis.keys import act_name
from analysis.recorder import record
from cdfsl_core.interventions import TIRConfig
from cdfsl_core.lora import LoRAConfig
from cdfsl_core.methods import create_method


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_the_key_scheme_is_a_contract(bundle, images):
    with record(bundle.model) as cache, torch.no_grad():
        bundle.model.encode_image(images)
    assert sorted(cache) == sorted([
        "blocks.0.resid_pre", "blocks.0.resid_post", "blocks.0.attn.pattern",
        "blocks.1.resid_pre", "blocks.1.resid_post", "blocks.1.attn.pattern",
    ])
    assert cache["blocks.0.resid_pre"].shape == (3, 17, 64)  # CLS + 16 patches, width 64
    assert cache["blocks.1.attn.pattern"].shape == (3, 2, 17, 17)  # 2 heads
    assert cache.stack("resid_post").shape == (2, 3, 17, 64)


def test_tokens_equal_open_clips_forward_intermediates(bundle, images):
    with record(bundle.model, what=("resid_post",)) as cache, torch.no_grad():
        bundle.model.encode_image(images)
        native = bundle.model.visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True)
    for i in range(2):
        ours = cache[act_name("resid_post", i)]
        assert torch.allclose(ours[:, 1:], native["image_intermediates"][i], atol=1e-6)
        assert torch.allclose(ours[:, :1], native["image_intermediates_prefix"][i], atol=1e-6)


def test_resid_pre_of_a_block_is_resid_post_of_the_previous(bundle, images):
    with record(bundle.model, what=("resid_pre", "resid_post")) as cache, torch.no_grad():
        bundle.model.encode_image(images)
    assert torch.equal(cache["blocks.1.resid_pre"], cache["blocks.0.resid_post"])


def test_attention_equals_torch_multihead_attention_weights(bundle, images):
    block = bundle.model.visual.transformer.resblocks[1]
    with record(bundle.model, layers=[1], what=("resid_pre", "attn.pattern")) as cache, torch.no_grad():
        bundle.model.encode_image(images)
        x = block.ln_1(cache["blocks.1.resid_pre"])
        _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=False)
    assert torch.allclose(cache["blocks.1.attn.pattern"], weights, atol=1e-6)
    assert torch.allclose(cache["blocks.1.attn.pattern"].sum(-1), torch.ones(3, 2, 17), atol=1e-6)


def test_records_what_an_adapted_model_with_tir_really_computes(bundle, images):
    method = create_method(bundle, ["a", "b", "c"], "coop+lora", "tir", lora=LoRAConfig(rank=2),
                           intervention_config=TIRConfig(blocks=(1,))).eval()
    with torch.no_grad():
        for adapter in method.lora.adapters:
            for b in adapter.lora_B.values():
                b.normal_(0, 0.1)
    with record(method, what=("resid_pre", "resid_post", "attn.pattern")) as cache, torch.no_grad():
        method(images)
    # TIR edits the stream entering block 1: what block 1 saw differs from block 0's output
    assert not torch.allclose(cache["blocks.1.resid_pre"], cache["blocks.0.resid_post"])
    block = bundle.model.visual.transformer.resblocks[1]
    assert isinstance(block.attn, torch.nn.MultiheadAttention)  # the method's adapters left with its forward
    with torch.no_grad():
        x = block.ln_1(cache["blocks.1.resid_pre"])
        with method.adapted():
            expected = block(cache["blocks.1.resid_pre"])
        # q and k written out from the parameters: W x + b + scale B (A x), per projection
        attn = method.lora.adapters[1]  # visual block 1
        weight, bias, width = attn.base.in_proj_weight, attn.base.in_proj_bias, 64
        q = x @ weight[:width].T + bias[:width] + attn.scale * (x @ attn.lora_A["q"].T) @ attn.lora_B["q"].T
        k = x @ weight[width:2 * width].T + bias[width:2 * width] + attn.scale * (x @ attn.lora_A["k"].T) @ attn.lora_B["k"].T
        q = q.reshape(3, 17, 2, 32).transpose(1, 2)
        k = k.reshape(3, 17, 2, 32).transpose(1, 2)
        pattern = torch.softmax(q @ k.transpose(-2, -1) / 32**0.5, dim=-1)
    assert torch.allclose(cache["blocks.1.resid_post"], expected, atol=1e-5)
    assert torch.allclose(cache["blocks.1.attn.pattern"], pattern, atol=1e-5)


def test_no_hook_remains_after_the_forward_raises(bundle, images):
    modules = list(bundle.model.visual.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with record(bundle.model) as cache:
            bundle.model.encode_image(images)
            assert len(cache) == 6
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def test_bad_layers_and_recordings(bundle):
    with pytest.raises(ValueError, match=r"layers \[2\] out of range.*0..1"):
        with record(bundle.model, layers=[2]):
            pass
    with pytest.raises(ValueError, match="unknown recording"):
        with record(bundle.model, what=("attn.scores",)):
            pass


def test_a_cache_from_tensors_and_on_another_device(bundle, images):
    from analysis.recorder import ActivationCache

    with record(bundle.model, layers=[1], what=("resid_post",)) as cache, torch.no_grad():
        bundle.model.encode_image(images)
    copy = ActivationCache.from_tensors(dict(cache)).to("cpu")
    assert list(copy) == ["blocks.1.resid_post"] and copy.layers == [1] and copy.what == ("resid_post",)
    assert torch.equal(copy["blocks.1.resid_post"], cache["blocks.1.resid_post"])
    with pytest.raises(ValueError, match="cache key 'layer1.resid'"):
        ActivationCache.from_tensors({"layer1.resid": torch.zeros(1)})
