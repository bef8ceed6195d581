"""Positive controls: every sink definition finds exactly the artefacts planted for it.

On the embedded CLIP and four source images, at a middle block where no norm-, activation- or
Sum-score sink exists without a plant (asserted, so the expected counts are exact): one planted
token per image is one sink per image, two planted tokens two, under the definition meant to find
them. Planted attention sinks take CLS's attention from the model's natural ones, so exactly the
planted tokens remain above the threshold.
"""

from __future__ import annotations

import pytest
import torch
from helpers import embedded_images

from analysis.controls import FINDS, PLANTS, Plant, planted
from analysis.diagnostics import TokenDiagnostics
from analysis.keys import act_name
from analysis.recorder import record
from cdfsl_core.methods import create_method

LAYER = 3
NAMES = ["striped red shape", "dotted blue shape", "plain green shape", "wavy pink shape", "checked black shape"]


@pytest.fixture(scope="module")
def setting():
    bundle, images = embedded_images((0, 9, 20, 41))
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    with torch.no_grad():
        _, readout = method.text_features(readout=True)
    return method, images, readout


def _counts(method, images, readout, plants=(), masks=None) -> dict[str, float]:
    """Mean sink tokens per image at LAYER under every definition (and the sink masks, into ``masks``)."""
    diagnostics = TokenDiagnostics(method.model.visual, readout, [LAYER], head_tail=False)
    with planted(method, plants, text=readout), record(method, layers=[LAYER]) as cache, torch.no_grad():
        method.encode_image(images, readout)
    diagnostics.update(cache)
    if masks is not None:
        masks.update(diagnostics.sink_masks(cache)[LAYER])
    table = diagnostics.tables()["sinks"]
    assert (table["images"] == len(images)).all()
    return dict(zip(table["definition"], table["mean_count"]))


def test_without_a_plant_only_the_attention_definition_finds_sinks_at_the_control_layer(setting):
    counts = _counts(*setting)
    assert {k: v for k, v in counts.items() if k != "attention-mass"} == {"sum-all": 0.0, "high-norm": 0.0,
                                                                          "massive-activation": 0.0}
    assert counts["attention-mass"] > 1.0  # the embedded CLIP has natural attention sinks here


@pytest.mark.parametrize("kind", PLANTS)
def test_each_definition_finds_exactly_one_planted_token_per_image(setting, kind):
    # attention sinks: the planted token takes CLS's attention, natural sinks drop below 5 x uniform
    masks = {}
    counts = _counts(*setting, plants=[Plant(kind, LAYER, token=5)], masks=masks)
    assert counts[FINDS[kind]] == 1.0
    flagged = masks[FINDS[kind]]  # [images, patches]: exactly the planted token, patch 5, in every image
    assert flagged[:, 5].all() and flagged.sum() == len(flagged)


@pytest.mark.parametrize("kind", PLANTS)
def test_two_planted_tokens_are_two_sinks(setting, kind):
    counts = _counts(*setting, plants=[Plant(kind, LAYER, token=5), Plant(kind, LAYER, token=40)])
    assert counts[FINDS[kind]] == 2.0


def test_a_high_norm_token_is_only_a_high_norm_sink(setting):
    # scaling a token changes neither its direction (Sum score), nor the attention of its block
    # (computed on the block's input), nor, at 10x the median norm, passes 100x the median activation
    counts, plain = _counts(*setting, plants=[Plant("high-norm", LAYER, token=5)]), _counts(*setting)
    assert counts == {**plain, "high-norm": 1.0}


def test_a_weak_plant_below_the_threshold_is_not_found(setting):
    # 1.5x the median norm is below the high-norm threshold of 2x: the detector must not fire
    assert _counts(*setting, plants=[Plant("high-norm", LAYER, token=5, strength=1.5)])["high-norm"] == 0.0


def test_plants_are_removed_after_the_block_and_bad_plants_are_refused(setting):
    method, images, readout = setting
    modules = list(method.model.visual.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with planted(method, [Plant(kind, LAYER) for kind in PLANTS], text=readout):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    with pytest.raises(ValueError, match="unknown plant 'bright'"):
        with planted(method, [Plant("bright", LAYER)]):
            pass
    with pytest.raises(ValueError, match="layer 9 out of range"):
        with planted(method, [Plant("high-norm", 9)]):
            pass
    with pytest.raises(ValueError, match="needs the class text features"):
        with planted(method, [Plant("every-class-top", LAYER)]):
            pass


def test_a_registered_plant_goes_in_through_planted_and_lists_among_the_controls(setting):
    """A plant registered from outside (as a plug-in's entry point would) is planted by
    ``planted``, listed in PLANTS (so the study's sink controls run it), gets its default strength,
    and is removed again; the built-ins cannot be removed and an unknown kind is named."""
    import analysis.controls as controls
    from analysis.controls import PlantSpec, list_plants, register_plant, unregister_plant
    from cdfsl_core.errors import ConfigError

    method, images, readout = setting

    def install(context, plants):
        (plant,) = plants

        def hook(module, args, out):
            out = out.clone()
            out[:, context.prefix + plant.token] = 0.0  # the token zeroed: a known, checkable artefact
            return out

        return [context.blocks[plant.layer].register_forward_hook(hook, prepend=True)]

    register_plant(PlantSpec("zeroed-token", install, 0.0, description="a patch token set to zero"))
    try:
        assert "zeroed-token" in controls.PLANTS and controls.DEFAULT_STRENGTH["zeroed-token"] == 0.0
        assert list(list_plants())[-1] == "zeroed-token"
        with planted(method, [Plant("zeroed-token", LAYER, token=4)]), record(method, layers=[LAYER]) as cache, \
                torch.no_grad():
            method.encode_image(images, readout)
        norms = cache[act_name("resid_post", LAYER)][:, 1:].norm(dim=-1)  # [images, patches]
        assert (norms[:, 4] == 0).all() and (norms[:, [3, 5]] > 0).all()
    finally:
        unregister_plant("zeroed-token")
    assert "zeroed-token" not in controls.PLANTS
    with pytest.raises(ConfigError, match="built in"):
        unregister_plant("high-norm")
    with pytest.raises(ConfigError, match="unknown plant 'zeroed-token'"):
        with planted(method, [Plant("zeroed-token", LAYER)]):
            pass


def test_plants_are_loaded_from_the_entry_point_group(monkeypatch):
    """list_plants asks the plug-in loader for the group cdfsl.plants, as the other registries do."""
    import analysis.controls as controls

    asked = []
    monkeypatch.setattr(controls, "load_plugins", lambda group: asked.append(group) or [])
    controls.list_plants()
    assert asked == ["cdfsl.plants"]
