"""One real-size model per tower family, random weights, offline (slow): PE-Core-B-16 and EVA02-B-16
(CLIP's tokenizer, everything), ViT-B-16-SigLIP2 (its tokenizer needs hub files: refused with a
message, its vision side without one) and timm's vit_small_patch14_reg4_dinov2 (vision only).

Checks per family: the block inputs equal the tower's own intermediates, the recomputed attention
equals the tower's own (rotary embeddings for EVA/PE), the planted high-norm patch token is found
at its patch index with the registers excluded, and for the CLIP families LoRA with B = 0 leaves
the logits unchanged and one coop+lora step with ATHA and with TIR changes them."""

from __future__ import annotations

import pytest
import torch

from analysis.config import AnalysisConfig
from analysis.controls import Plant, planted
from analysis.diagnostics import TokenDiagnostics
from analysis.recorder import record
from cdfsl_core.errors import ConfigError
from cdfsl_core.methods import create_method
from cdfsl_core.models import NoTokenizer, load_clip
from cdfsl_core.towers import vision_tower

pytestmark = pytest.mark.slow
NAMES = ["striped red shape", "dotted blue shape", "plain green shape"]


def _check_tower(module, size: int, expected_prefix: int) -> None:
    """Block inputs against forward_intermediates, attention against the tower's unfused path."""
    tower = vision_tower(module)
    assert tower.n_prefix == expected_prefix
    trunk = getattr(module, "trunk", module)
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    seen, extras = [], []

    def hook(m, args, kwargs):
        seen.append(tower.block_input(args, kwargs).detach().clone())
        extras.append({k: v for k, v in kwargs.items() if k != tower.input_keyword})

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in tower.blocks]
    try:
        with torch.no_grad():
            outputs = trunk.forward_intermediates(images, norm=False, output_fmt="NLC", intermediates_only=False,
                                                  return_prefix_tokens=True)[1]
    finally:
        for h in handles:
            h.remove()
    # (tokens, prefix tokens) per block; a tower without prefix tokens gives the tokens alone
    outputs = [o if torch.is_tensor(o) else torch.cat([o[1], o[0]], dim=1) for o in outputs]
    for i in (1, len(seen) // 2, len(seen) - 1):
        torch.testing.assert_close(seen[i], outputs[i - 1], atol=1e-4, rtol=1e-4)
    block = tower.blocks[len(seen) // 2]
    attn = block.attn
    captured = []
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        with torch.no_grad():
            attn(block.norm1(seen[len(seen) // 2]), **extras[len(seen) // 2])
    finally:
        handle.remove()
        attn.fused_attn = True
    ours = tower.attention_probs(block, seen[len(seen) // 2], extras[len(seen) // 2])
    torch.testing.assert_close(ours, captured[0], atol=1e-5, rtol=1e-4)


def _check_clip(bundle, prefix: int) -> None:
    visual = bundle.model.visual
    size = visual.trunk.patch_embed.img_size[0]
    _check_tower(visual, size, prefix)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        zero_shot = create_method(bundle, NAMES, "zeroshot", "none").eval()(images)
        lora = create_method(bundle, NAMES, "lora", "none").eval()(images)
    torch.testing.assert_close(lora, zero_shot, atol=1e-4, rtol=1e-4)
    for intervention in ("atha", "tir"):
        method = create_method(bundle, NAMES, "coop+lora", intervention)
        with torch.no_grad():
            before = method.eval()(images)
        method.train()
        loss = torch.nn.functional.cross_entropy(method(images), torch.tensor([0, 1, 2]))
        loss.backward()
        torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2).step()
        with torch.no_grad():
            after = method.eval()(images)
        assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-5
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    _, readout = method.text_features(readout=True)
    layer = vision_tower(method).n_blocks // 2
    diagnostics = TokenDiagnostics(vision_tower(method), readout, [layer], sinks=AnalysisConfig().sinks())
    with torch.no_grad(), planted(method, [Plant("high-norm", layer=layer, token=7)]), \
            record(method, layers=[layer]) as cache:
        method.encode_image(images, readout)
    found = diagnostics.sink_masks(cache)[layer]["high-norm"]
    assert found[:, 7].all()


def test_pe_core_b16():
    _check_clip(load_clip("PE-Core-B-16"), prefix=1)


def test_eva02_b16():
    _check_clip(load_clip("EVA02-B-16"), prefix=1)


def test_siglip2_asks_for_its_tokenizer_and_runs_its_vision_side_without_one(tmp_path):
    with pytest.raises(ConfigError, match="Hugging Face tokenizer 'timm/ViT-B-16-SigLIP2'.*--tokenizer PATH"):
        load_clip("ViT-B-16-SigLIP2")
    with pytest.raises(ConfigError, match="tokenizer folder .* does not exist"):
        load_clip("ViT-B-16-SigLIP2", tokenizer=tmp_path / "missing")
    bundle = load_clip("ViT-B-16-SigLIP2", tokenizer="none")
    assert isinstance(bundle.tokenizer, NoTokenizer)
    with pytest.raises(ConfigError, match="loaded without a tokenizer"):
        create_method(bundle, NAMES, "zeroshot", "none")
    _check_tower(bundle.model.visual, 224, expected_prefix=0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = vision_tower(bundle.model).readout(torch.randn(2, 196, 768))  # per-token read-out through the MAP head
        pooled = bundle.model.encode_image(images)
    assert tokens.shape == (2, 196, pooled.shape[-1])


def test_dinov2_with_registers_vision_only():
    import timm

    trunk = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0).eval()
    tower = vision_tower(trunk)
    assert (tower.n_prefix, tower.n_registers, tower.has_cls) == (5, 4, True)
    _check_tower(trunk, trunk.patch_embed.img_size[0], expected_prefix=5)
