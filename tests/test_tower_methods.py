"""The methods, diagnostics and positive controls on a timm EVA trunk (rotary embeddings, a CLS
token and two registers, a linear head) in place of the embedded CLIP's vision tower: everything
goes through the tower adapters, so the prefix tokens and LoRA's places come from them."""

from __future__ import annotations

import pytest
import torch
from timm.models.eva import Eva

from analysis.config import AnalysisConfig
from analysis.controls import Plant, planted
from analysis.diagnostics import TokenDiagnostics
from analysis.recorder import record
from cdfsl_core.errors import ConfigError
from cdfsl_core.lora import LoRAAdapters, LoRAConfig, LoRALinear
from cdfsl_core.methods import ADAPTATIONS, INTERVENTIONS, create_method
from cdfsl_core.models import load_clip
from cdfsl_core.towers import vision_tower

NAMES = ["striped red shape", "dotted blue shape", "plain green shape"]


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    embed_dim = bundle.model.text_projection.shape[1]
    trunk = Eva(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, use_rot_pos_emb=True,
                num_reg_tokens=2, num_classes=embed_dim, global_pool="token", qkv_fused=False)  # as EVA02-B-16
    trunk.preprocess_cfg = bundle.model.visual.preprocess_cfg
    bundle.model.visual = trunk.eval()
    return bundle


@pytest.fixture
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _logits(method, images):
    with torch.no_grad():
        return method.eval()(images)


def test_the_adapter_sees_the_eva_layout(bundle):
    tower = vision_tower(bundle.model)
    assert (tower.family, tower.n_prefix, tower.n_registers, tower.grid) == ("timm", 3, 2, (4, 4))


def test_lora_b_zero_leaves_the_logits_unchanged_and_wraps_the_linear_projections(bundle, images):
    before = _logits(create_method(bundle, NAMES, "zeroshot", "none"), images)
    adapters = LoRAAdapters(bundle.model, LoRAConfig(rank=2, towers=("visual",)))
    assert len(adapters.adapters) == 4 * 3  # EVA's separate q, k, v projections in 4 blocks
    assert all(isinstance(a, LoRALinear) for a in adapters.adapters)
    method = create_method(bundle, NAMES, "lora", "none")
    torch.testing.assert_close(_logits(method, images), before, atol=1e-5, rtol=1e-5)
    assert isinstance(bundle.model.visual.blocks[0].attn.q_proj, torch.nn.Linear)  # put back after the forward


def test_lora_refuses_a_fused_projection_with_biases_outside_its_linear_layer():
    torch.manual_seed(0)
    trunk = Eva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=8)  # fused qkv, q/v biases
    with pytest.raises(ConfigError, match="visual block 0: EvaAttention adds separate q/v biases"):
        LoRAAdapters(torch.nn.ModuleDict({"visual": trunk}), LoRAConfig(rank=2, towers=("visual",)))


@pytest.mark.parametrize("intervention", ["atha", "tir"])
def test_one_coop_lora_step_with_the_intervention_runs_and_changes_the_logits(bundle, images, intervention):
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    method = create_method(bundle, NAMES, "coop+lora", intervention)
    before = _logits(method, images)
    method.train()
    optimiser = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(method(images), labels)
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert (_logits(method, images) - before).abs().max() > 1e-4


@pytest.mark.parametrize("adaptation", ADAPTATIONS)
@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_every_method_forwards_on_the_eva_trunk(bundle, images, adaptation, intervention):
    method = create_method(bundle, NAMES, adaptation, intervention)
    logits = _logits(method, images)
    assert logits.shape == (6, 3) and torch.isfinite(logits).all()


def test_tir_keeps_the_prefix_tokens_and_weights_the_patches(bundle, images):
    """TIR's weights act on the 16 patch tokens only: the CLS and register rows pass unchanged."""
    method = create_method(bundle, NAMES, "zeroshot", "tir").eval()
    tower = vision_tower(bundle.model)
    block = method.intervention.blocks(tower.n_blocks)[0]
    seen = {}

    def before(module, args, kwargs):
        seen["in"] = tower.block_input(args, kwargs).detach().clone()

    handle = tower.blocks[block].register_forward_pre_hook(before, with_kwargs=True, prepend=True)
    after = {}
    handle2 = tower.pre_norm(tower.blocks[block]).register_forward_pre_hook(
        lambda m, args: after.__setitem__("x", args[0].detach().clone()))
    try:
        _logits(method, images)
    finally:
        handle.remove()
        handle2.remove()
    torch.testing.assert_close(after["x"][:, :3], seen["in"][:, :3])
    ratio = after["x"][:, 3:].norm(dim=-1) / seen["in"][:, 3:].norm(dim=-1)
    assert (ratio - 1).abs().max() > 0.1  # some patch tokens re-weighted (the check can fail)


def test_a_planted_high_norm_patch_token_is_found_at_its_patch_index(bundle, images):
    """The positive control on the prefix-aware stream: patch 5 is stream token 3 + 5; the
    diagnostics find patch 5 and no register."""
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    _, readout = method.text_features(readout=True)
    diagnostics = TokenDiagnostics(vision_tower(method), readout, [2], sinks=AnalysisConfig().sinks())
    with torch.no_grad(), planted(method, [Plant("high-norm", layer=2, token=5)]), record(method, layers=[2]) as cache:
        method.encode_image(images, readout)
    found = diagnostics.sink_masks(cache)[2]["high-norm"]
    assert found.shape == (6, 16)
    assert found[:, 5].all() and found.sum() == 6


def test_the_analysis_layer_runs_on_the_eva_trunk(bundle, images):
    """Token maps (16 patches on a 4 x 4 grid, registers excluded), the diagnostics' tables,
    ablation with its control, patching between two methods, and direct logit attribution."""
    from analysis.causal import ablation_effects, logit_attribution, patch_effects
    from analysis.run_diagnostics import diagnose_model
    from analysis.token_maps import token_maps

    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    method = create_method(bundle, NAMES, "zeroshot", "tir").eval()
    maps = token_maps(method, images[:2], layers=[1])
    assert maps["token"].nunique() == 16 and set(maps["row"]) == {0, 1, 2, 3} and maps["image"].nunique() == 2
    tables = diagnose_model(method, images, labels, {"model": "eva"}, AnalysisConfig(attribution_steps=2))
    assert tables["sinks"]["images"].eq(6).all()
    effects = ablation_effects(method, images, labels, block=2, sets=("head", "all"))
    assert set(effects["variant"]) == {"set", "control"} and effects["tokens"].max() == 16
    other = create_method(bundle, NAMES, "zeroshot", "none").eval()
    patched = patch_effects(other, method, images, labels, blocks=[1])
    assert len(patched) > 0
    table = logit_attribution(method, images, labels)  # rotary keys, 2 registers: still adds up to the logits
    with torch.no_grad():
        logits = method(images).numpy()
    assert abs(table.groupby(["image", "class"])["value"].sum().unstack().to_numpy() - logits).max() < 1e-4
    assert set(table[table["component"] == "attention"]["head"]) == {0, 1}


def test_direct_logit_attribution_adds_up_through_layer_scales_and_lora_on_a_fused_qkv_trunk():
    """A timm ViT trunk (fused qkv, layer scale, CLS pooling) in a CLIP with a trained LoRA: the
    per-head writes (through the adapted projections and the layer scale) plus the MLPs, the
    embedding and the read-out's constant give the logits back; the MLP's share is measured at
    its own norm's input, so a wrong head split cannot be absorbed by it."""
    from timm.models.vision_transformer import VisionTransformer

    from analysis.causal import logit_attribution

    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    trunk = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, init_values=0.3,
                              num_classes=bundle.model.text_projection.shape[1], global_pool="token")
    trunk.preprocess_cfg = bundle.model.visual.preprocess_cfg
    bundle.model.visual = trunk.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0])
    method = create_method(bundle, NAMES, "coop+lora", "none")
    method.train()
    optimiser = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=5e-2)
    torch.nn.functional.cross_entropy(method(images), labels).backward()
    optimiser.step()
    method.eval()
    table = logit_attribution(method, images, labels)
    with torch.no_grad():
        logits = method(images).numpy()
    assert abs(table.groupby(["image", "class"])["value"].sum().unstack().to_numpy() - logits).max() < 1e-4
    assert set(table[table["component"] == "attention"]["head"]) == {0, 1, 2, 3}
    trunk.global_pool = "avg"
    with pytest.raises(ConfigError, match="pools its image feature otherwise"):
        logit_attribution(method, images)


def test_the_attention_sink_plant_solves_through_rotary_keys(bundle, images):
    """The positive control of the attention-mass definition on the EVA trunk: the planted patch's
    key is solved through the rotary embedding of its own position, so it takes CLS's attention."""
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    _, readout = method.text_features(readout=True)
    diagnostics = TokenDiagnostics(vision_tower(method), readout, [2], sinks=AnalysisConfig().sinks())
    with torch.no_grad(), planted(method, [Plant("attention-sink", layer=2, token=9)]), \
            record(method, layers=[2]) as cache:
        method.encode_image(images, readout)
    pattern = cache["blocks.2.attn.pattern"]  # [B, H, T, T], recomputed by the recorder
    assert pattern[:, :, 0, 3 + 9].min() > 0.9  # exp(-margin) bound: the rest share < 1 - 1 / (1 + T e^-m)
    found = diagnostics.sink_masks(cache)[2]["attention-mass"]
    assert found[:, 9].all() and found.sum() == 6


def test_key_affine_reproduces_the_towers_keys_at_a_rotated_position(bundle):
    torch.manual_seed(3)
    tower = vision_tower(bundle.model)
    block = tower.blocks[1]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        bundle.model.encode_image(torch.randn(1, 3, 32, 32))
    handle.remove()
    kwargs = {k: v for k, v in captured.items() if k != tower.input_keyword}
    assert kwargs.get("rope") is not None  # the rotary case: keys depend on the position
    z = torch.randn(2, 19, 64)
    weight, offset = tower.key_affine(block, z, 3 + 7, kwargs)
    with torch.no_grad():
        _, keys, _ = tower.query_key(block, z, kwargs)
    torch.testing.assert_close(z[:, 10] @ weight + offset, keys[:, :, 10].flatten(1), atol=1e-4, rtol=1e-4)
    other, _ = tower.key_affine(block, z, 3 + 2, kwargs)
    assert (other - weight).abs().max() > 1e-3  # another position, another rotation (the check can fail)


def test_direct_logit_attribution_adds_up_through_an_inner_layer_norm():
    """EVA02's sub-LN (a layer norm on the joined heads before the output projection), linearised
    with its scale frozen: the heads' writes still sum to the branch, so the logits come back."""
    from analysis.causal import logit_attribution

    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    trunk = Eva(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, use_rot_pos_emb=True, qkv_fused=False,
                scale_attn_inner=True, init_values=0.5, num_classes=bundle.model.text_projection.shape[1],
                global_pool="token")
    with torch.no_grad():
        for block in trunk.blocks:  # a non-trivial norm: gain and bias away from (1, 0)
            block.attn.norm.weight.uniform_(0.5, 1.5)
            block.attn.norm.bias.normal_(0, 0.3)
    trunk.preprocess_cfg = bundle.model.visual.preprocess_cfg
    bundle.model.visual = trunk.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    table = logit_attribution(method, images)
    with torch.no_grad():
        logits = method(images).numpy()
    assert abs(table.groupby(["image", "class"])["value"].sum().unstack().to_numpy() - logits).max() < 1e-4
