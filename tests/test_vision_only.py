"""Vision-only models (DINOv2 with registers, any tower without class text): every diagnostic
that needs no text runs, registers are kept out of the patch statistics and reported on their
own, and what needs text is named in ``skipped`` rather than silently absent."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from analysis.config import AnalysisConfig
from analysis.diagnostics import TokenDiagnostics
from analysis.recorder import record
from analysis.run_vision import diagnose_vision, main, register_table
from analysis.token_maps import TEXT_QUANTITIES, token_maps
from cdfsl_core.errors import CheckpointError, ConfigError
from cdfsl_core.models import load_vision


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, reg_tokens=2,
                             num_classes=0).eval()  # CLS, 2 registers, a 4 x 4 patch grid


@pytest.fixture
def images():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_what_needs_text_is_skipped_and_named(trunk, images):
    tables = diagnose_vision(trunk, images, AnalysisConfig(token_map_images=2), model="reg")
    assert set(tables) == {"norms", "sinks", "attention", "rollout", "token_maps", "registers", "skipped"}
    assert set(tables["skipped"]["quantity"]) == {"sink:sum-all", "head_tail", "attribution"}
    assert set(tables["sinks"]["definition"]) == {"high-norm", "attention-mass", "massive-activation"}
    quantities = set(tables["token_maps"]["quantity"])
    assert not quantities & set(TEXT_QUANTITIES)
    assert {"norm", "attention_from_cls", "attention_mean", "sink:high-norm"} <= quantities
    assert tables["token_maps"]["token"].max() == 15  # 16 patches: CLS and registers are not map tokens
    assert tables["norms"]["bucket"].isna().all()  # no Sum score without text: one row per layer
    assert len(tables["registers"]) == 3 * 2


def test_norms_are_timm_s_own_patch_tokens(trunk, images):
    # the expected value comes from timm's forward_intermediates, not from the recorder
    tables = diagnose_vision(trunk, images, AnalysisConfig(token_map_images=0), model="reg")
    with torch.no_grad():
        _, intermediates = trunk.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=False)
    for layer, tokens in enumerate(intermediates):
        row = tables["norms"][tables["norms"]["layer"] == layer].iloc[0]
        assert row["count"] == 5 * 16
        assert row["mean"] == pytest.approx(float(tokens.norm(dim=-1).mean()), rel=1e-5)


def _constructed_last_block(trunk, register_norm: float, planted_patch: int | None, patch_norm: float = 5.0):
    """A hook making the last block's output known: every token the unit vector e0, register 0
    ``register_norm`` e0, and patch ``planted_patch`` (if any) ``patch_norm`` e0."""
    def hook(module, args, out):
        x = torch.zeros_like(out)
        x[..., 0] = 1.0
        x[:, 1, 0] = register_norm
        if planted_patch is not None:
            x[:, 3 + planted_patch, 0] = patch_norm
        return x
    return trunk.blocks[-1].register_forward_hook(hook)


def test_a_high_norm_register_is_reported_on_its_own_and_never_counted_as_a_patch(trunk, images):
    handle = _constructed_last_block(trunk, register_norm=7.0, planted_patch=None)
    try:
        registers = register_table(trunk, images)
        diagnostics = TokenDiagnostics(trunk, None, [2])
        with record(trunk, layers=[2]) as cache:
            trunk(images)
        masks = diagnostics.sink_masks(cache)[2]
    finally:
        handle.remove()
    last = registers[registers["block"] == 2].set_index("register")["norm_over_median_patch"]
    assert last[0] == pytest.approx(7.0) and last[1] == pytest.approx(1.0)  # hand-computed: 7 / 1 and 1 / 1
    assert not masks["high-norm"].any()  # the register is outside the patch statistics


def test_a_planted_high_norm_patch_is_found_at_its_patch_index(trunk, images):
    handle = _constructed_last_block(trunk, register_norm=1.0, planted_patch=6)
    try:
        maps = token_maps(trunk, images[:2], layers=[2])
    finally:
        handle.remove()
    flagged = maps[(maps["quantity"] == "sink:high-norm") & (maps["value"] == 1)]
    assert sorted(flagged["token"].unique()) == [6] and len(flagged) == 2  # once per image, patch 6
    assert (flagged["row"].iloc[0], flagged["col"].iloc[0]) == (1, 2)


def test_the_text_dependent_sink_flag_is_absent_from_the_vision_command():
    from analysis.run_vision import build_parser

    options = {o for action in build_parser()._actions for o in action.option_strings}
    assert "--high-norm-tau" in options and "--rho" not in options and "--attribution-steps" not in options


def test_load_vision_builds_timm_towers_and_loads_local_weights_resampled(tmp_path):
    import safetensors.torch

    bundle = load_vision("vit_small_patch14_reg4_dinov2", image_size=28)
    assert bundle.model.visual.preprocess_cfg["size"] == 28
    path = tmp_path / "dino.safetensors"
    safetensors.torch.save_file(bundle.model.visual.state_dict(), str(path))
    same = load_vision("vit_small_patch14_reg4_dinov2", path, image_size=28)
    torch.testing.assert_close(same.model.visual.blocks[3].mlp.fc1.weight, bundle.model.visual.blocks[3].mlp.fc1.weight)
    larger = load_vision("vit_small_patch14_reg4_dinov2", path, image_size=56)  # position embeddings resampled
    assert larger.model.visual.pos_embed.shape[1] == 16
    torch.testing.assert_close(larger.model.visual.blocks[3].mlp.fc1.weight, bundle.model.visual.blocks[3].mlp.fc1.weight)
    with pytest.raises(ConfigError, match="loaded without a tokenizer"):
        bundle.tokenizer(["a photo"])
    with pytest.raises(CheckpointError, match="is not a file.*local weights file"):
        load_vision("vit_small_patch14_reg4_dinov2", tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="Unknown vision model 'no_such_vit'"):
        load_vision("no_such_vit")


def test_the_command_writes_every_text_free_table(tmp_path, capsys):
    out = tmp_path / "vision"
    assert main(["vit_small_patch14_reg4_dinov2", "--image-size", "28", "--images", "3", "--out", str(out)]) == 0
    written = {p.name for p in out.iterdir()}
    assert {"norms.csv", "sinks.csv", "registers.csv", "attention.csv", "token_maps.csv", "skipped.csv",
            "settings.json"} <= written
    settings = json.loads((out / "settings.json").read_text())
    assert settings["image_size"] == 28 and len(settings["images"]) == 3
    printed = capsys.readouterr().out
    assert "4 registers, a CLS token, patch grid 2x2" in printed and "needs class text" in printed
