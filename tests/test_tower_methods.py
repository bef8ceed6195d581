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
    ablation with its control, and patching between two methods; direct logit attribution says
    it is open_clip's only."""
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
    with pytest.raises(ConfigError, match="open_clip's VisionTransformer only"):
        logit_attribution(method, images)
