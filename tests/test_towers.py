"""The tower adapters against the towers' own computations (random weights, offline).

Each family on a small config: the block inputs a forward pre-hook sees through the adapter equal
the tower's own intermediate outputs (``forward_intermediates``), the recomputed attention equals
the attention the tower computes (timm's unfused path, with rotary embeddings for EVA; PyTorch's
``nn.MultiheadAttention`` weights for open_clip), the token layout counts the prefix tokens
(CLS, registers), and the per-token read-out of the CLS token equals the tower's pooled output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer as TimmViT

from cdfsl_core.errors import ConfigError
from cdfsl_core.models import load_clip
from cdfsl_core.towers import VisionTower, tower_families, vision_tower


def _openclip():
    torch.manual_seed(0)
    return load_clip("cdfsl-test-vit").model.visual.eval()


def _eva():
    """EVA-style: rotary embeddings, a CLS token and 2 registers, a linear head on the CLS token."""
    torch.manual_seed(0)
    return Eva(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, use_rot_pos_emb=True,
               num_reg_tokens=2, num_classes=16, global_pool="token").eval()


def _dinov2_reg():
    """DINOv2-style: a CLS token and 4 registers, no head (vision only)."""
    torch.manual_seed(0)
    return TimmViT(img_size=28, patch_size=14, embed_dim=64, depth=3, num_heads=2, reg_tokens=4,
                   num_classes=0, init_values=1e-5).eval()


TOWERS = {"open_clip": _openclip, "eva": _eva, "dinov2_reg": _dinov2_reg}
SIZES = {"open_clip": 32, "eva": 32, "dinov2_reg": 28}
LAYOUT = {"open_clip": (1, 0, (4, 4)), "eva": (3, 2, (4, 4)), "dinov2_reg": (5, 4, (2, 2))}


def _block_inputs(tower: VisionTower, images: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    seen, extras = [], []

    def hook(module, args, kwargs):
        seen.append(tower.block_input(args, kwargs).detach().clone())
        extras.append({k: v for k, v in kwargs.items() if k != tower.input_keyword})

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in tower.blocks]
    try:
        with torch.no_grad():
            tower.module(images)
    finally:
        for h in handles:
            h.remove()
    return seen, extras


def _intermediates(name: str, module, images) -> list[torch.Tensor]:
    """Every block's output [B, tokens, width], as the tower's own forward_intermediates gives it."""
    with torch.no_grad():
        if name == "open_clip":
            out = module.forward_intermediates(images, intermediates_only=True, output_fmt="NLC",
                                               output_extra_tokens=True)
            return [torch.cat([p, x], dim=1) for p, x in zip(out["image_intermediates_prefix"],
                                                             out["image_intermediates"])]
        tokens = module.forward_intermediates(images, norm=False, output_fmt="NLC", intermediates_only=False,
                                              return_prefix_tokens=True)[1]
        return [torch.cat([p, x], dim=1) for x, p in tokens]


@pytest.mark.parametrize("name", list(TOWERS))
def test_layout_and_block_inputs_equal_the_towers_intermediates(name):
    module = TOWERS[name]()
    tower = vision_tower(module)
    n_prefix, n_registers, grid = LAYOUT[name]
    assert (tower.n_prefix, tower.n_registers, tower.grid) == (n_prefix, n_registers, grid)
    images = torch.randn(2, 3, SIZES[name], SIZES[name])
    inputs, _ = _block_inputs(tower, images)
    outputs = _intermediates(name, module, images)
    assert len(inputs) == tower.n_blocks == len(outputs)
    assert inputs[0].shape[1] == n_prefix + grid[0] * grid[1]
    for i in range(1, tower.n_blocks):  # block i's input is block i - 1's output
        torch.testing.assert_close(inputs[i], outputs[i - 1])
    x = inputs[-1]
    assert tower.patches(x).shape[1] == grid[0] * grid[1]
    assert tower.registers(x).shape[1] == n_registers
    torch.testing.assert_close(tower.cls(x), x[:, 0])


def _towers_own_attention(name: str, tower: VisionTower, block, x, extra) -> torch.Tensor:
    """The probabilities the tower's own attention computes for block input ``x``."""
    with torch.no_grad():
        if name == "open_clip":
            z = block.ln_1(x)
            return block.attn(z, z, z, need_weights=True, average_attn_weights=False)[1]
        captured = []
        attn = block.attn
        attn.fused_attn = False  # the explicit path, whose attn_drop sees the probabilities
        handle = attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(args[0]))
        try:
            attn(block.norm1(x), **extra)
        finally:
            handle.remove()
            attn.fused_attn = True
        return captured[0]


@pytest.mark.parametrize("name", list(TOWERS))
def test_recomputed_attention_equals_the_towers_attention(name):
    module = TOWERS[name]()
    tower = vision_tower(module)
    images = torch.randn(2, 3, SIZES[name], SIZES[name])
    inputs, extras = _block_inputs(tower, images)
    if name == "eva":
        assert extras[0].get("rope") is not None  # the positive control: rotary embeddings are in play
    for i, block in enumerate(tower.blocks):
        ours = tower.attention_probs(block, inputs[i], extras[i])
        theirs = _towers_own_attention(name, tower, block, inputs[i], extras[i])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    if name == "eva":  # without the rotary embeddings the probabilities differ: the check can fail
        wrong = tower.attention_probs(tower.blocks[0], inputs[0], {})
        assert (wrong - _towers_own_attention(name, tower, tower.blocks[0], inputs[0], extras[0])).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["open_clip", "eva"])
def test_the_cls_tokens_readout_is_the_towers_output(name):
    module = TOWERS[name]()
    tower = vision_tower(module)
    images = torch.randn(3, 3, SIZES[name], SIZES[name])
    last = _intermediates(name, module, images)[-1]  # the last block's output, before any norm
    with torch.no_grad():
        pooled = module(images)
        tokens = tower.readout(last)
    torch.testing.assert_close(tokens[:, 0], pooled, atol=1e-5, rtol=1e-5)
    # the affine parts give the same read-out (ATHA solves through them)
    affine = tower.readout_affine()
    z = F.layer_norm(last, last.shape[-1:], affine.gamma, affine.beta, tower.readout_eps)
    if affine.projection is not None:
        z = z @ affine.projection
    if affine.bias is not None:
        z = z + affine.bias
    torch.testing.assert_close(z, tokens, atol=1e-5, rtol=1e-5)


def test_a_head_free_tower_reports_it_has_no_readout_and_an_unknown_module_is_refused():
    tower = vision_tower(_dinov2_reg())
    assert tower.readout(torch.randn(1, 9, 64)).shape == (1, 9, 64)  # no head: the normalised tokens
    with pytest.raises(ConfigError, match="no vision tower of a supported family"):
        vision_tower(torch.nn.Linear(2, 2))
    assert {f.family for f in tower_families()} >= {"open_clip", "timm"}


def _map_trunk():
    """SigLIP-style: no CLS token, an attention-pooling ('map') head with its MLP, a linear head."""
    torch.manual_seed(0)
    return TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, class_token=False,
                   global_pool="map", num_classes=8).eval()


def test_an_attention_pooled_token_is_read_out_as_if_pooled_alone():
    """The definition against timm's own head: token j's read-out is the model's pooled output for
    the one-token sequence x_j (forward_features normalises, forward_head pools and projects)."""
    trunk = _map_trunk()
    tower = vision_tower(trunk)
    assert tower.n_prefix == 0 and not tower.has_cls
    x = torch.randn(3, 16, 64)
    with torch.no_grad():
        ours = tower.readout(x)
        theirs = torch.stack([trunk.forward_head(trunk.norm(x[:, j:j + 1])) for j in range(16)], dim=1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="no CLS token"):
        tower.cls(x)


def test_the_map_readouts_linear_part_and_the_uniform_attention_case():
    """Hand-checkable: with the pool's MLP branch zeroed the read-out is affine, and its affine
    parts give it exactly; with the latent query zeroed every token gets attention 1/16, so the
    image's pooled output is the mean of its tokens' read-outs. With the MLP on, the affine parts
    are marked approximate and differ."""
    trunk = _map_trunk()
    tower = vision_tower(trunk)
    assert tower.readout_affine().exact is False
    x = torch.randn(2, 16, 64)

    def affine_readout(affine):
        z = F.layer_norm(x, (64,), affine.gamma, affine.beta, trunk.norm.eps)
        return z @ affine.projection + affine.bias

    with torch.no_grad():
        assert (affine_readout(tower.readout_affine()) - tower.readout(x)).abs().max() > 1e-3
        pool = trunk.attn_pool
        pool.mlp.fc2.weight.zero_()
        pool.mlp.fc2.bias.zero_()
        pool.q.weight.zero_()
        pool.q.bias.zero_()
        affine = tower.readout_affine()
        assert affine.exact is False  # still declared: the head has an MLP branch (zero or not)
        torch.testing.assert_close(affine_readout(affine), tower.readout(x), atol=1e-5, rtol=1e-5)
        pooled = trunk.forward_head(trunk.norm(x))
        torch.testing.assert_close(pooled, tower.readout(x).mean(dim=1), atol=1e-5, rtol=1e-5)


def test_the_adapter_is_one_per_module_and_found_inside_a_clip():
    bundle = load_clip("cdfsl-test-vit")
    assert vision_tower(bundle.model) is vision_tower(bundle.model.visual)
    assert vision_tower(vision_tower(bundle.model)) is vision_tower(bundle.model.visual)


def test_the_composed_readout_is_kept_until_a_weight_changes():
    """ATHA asks for the affine parts every forward: the composition is reused while the weights stay,
    and follows an in-place edit of the head (the cache can miss: a positive control)."""
    tower = vision_tower(_map_trunk())
    first = tower.readout_affine()
    assert tower.readout_affine() is first
    with torch.no_grad():
        tower.trunk.head.weight.mul_(2.0)
    second = tower.readout_affine()
    assert second is not first
    torch.testing.assert_close(second.projection, 2.0 * first.projection)
