"""Register neurons and the test-time register (Jiang et al. 2025), with their positive controls.

The control: a planted register neuron (one MLP neuron of block 2 fires on patch 5 and writes 10x
the median patch norm) must be found by its index, must make patch 5 a high-norm sink from block 2
on, and the test-time register at that neuron must remove the sink from the patches and carry the
outlier in its own norm. The negative case: no neuron selected changes nothing, to the bit.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import TINY, embedded_images
from timm.models.vision_transformer import VisionTransformer as TimmViT

from analysis.controls import Plant, planted
from analysis.diagnostics import TokenDiagnostics
from analysis.recorder import record
from cdfsl_core.config import MethodConfig, RunConfig, TestTimeRegisterConfig, TIRRegisterConfig, TrainConfig
from cdfsl_core.errors import ConfigError
from cdfsl_core.interventions import build_intervention, find_register_neurons, list_interventions
from cdfsl_core.lora import LoRAConfig
from cdfsl_core.methods import create_method
from cdfsl_core.models import load_clip
from cdfsl_core.towers import vision_tower

NAMES = ["striped red shape", "dotted blue shape", "plain green shape", "wavy pink shape", "checked black shape"]
LAYER, TOKEN, NEURON = 2, 5, 7
PLANT = Plant("register-neuron", LAYER, token=TOKEN, channel=NEURON)


def _register(neurons=((LAYER, NEURON),), **settings) -> TestTimeRegisterConfig:
    return TestTimeRegisterConfig(neurons=neurons, **settings)


@pytest.fixture(scope="module")
def setting():
    bundle, images = embedded_images((0, 9, 20, 41))
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    with torch.no_grad():
        _, readout = method.text_features(readout=True)
    return bundle, images, method, readout


def _high_norm(method, images, readout, plants=()):
    """Per block: mean high-norm tokens per image, the masks, and the appended tokens' norms."""
    blocks = list(range(vision_tower(method.model).n_blocks))
    diagnostics = TokenDiagnostics(method.model.visual, readout, blocks, head_tail=False)
    with planted(method, plants), record(method) as cache, torch.no_grad():
        method.encode_image(images, readout)
    diagnostics.update(cache)
    table = diagnostics.tables()["sinks"]
    table = table[table["definition"] == "high-norm"].set_index("layer")["mean_count"]
    masks = diagnostics.sink_masks(cache)
    appended = {b: cache.appended[f"blocks.{b}.resid_post"].norm(dim=-1)[:, 0] for b in blocks
                if f"blocks.{b}.resid_post" in cache.appended}
    medians = {b: cache[f"blocks.{b}.resid_post"][:, 1:].norm(dim=-1).median(dim=-1).values for b in blocks}
    return table.to_dict(), {b: masks[b]["high-norm"] for b in blocks}, appended, medians


def test_the_detector_finds_the_planted_register_neuron_by_its_index(setting):
    bundle, images, method, _ = setting
    with planted(method, [PLANT]):
        found = find_register_neurons(method.model, images, top_k=3)
    assert found.neurons[0] == (LAYER, NEURON)
    assert found.images_with_outliers == len(images) and found.outliers_per_image == 1.0  # the planted token only
    # its score is its activation at the outlier: 10 x the median norm / |w_out|, far above any natural neuron
    assert found.score(LAYER, NEURON) > 50 * found.score(*found.neurons[1])


def test_without_an_outlier_no_neuron_is_detected(setting):
    bundle, images, method, _ = setting
    found = find_register_neurons(method.model, images)  # the embedded CLIP has no high-norm token
    assert found.neurons == [] and found.images_with_outliers == 0 and found.images == len(images)


def test_the_register_removes_the_planted_sink_and_carries_its_norm(setting):
    bundle, images, method, readout = setting
    counts, masks, _, _ = _high_norm(method, images, readout, [PLANT])
    assert all(counts[b] == (1.0 if b >= LAYER else 0.0) for b in counts)  # the plant: one sink from its block on
    assert all(bool(masks[b][:, TOKEN].all()) for b in counts if b >= LAYER)
    register = create_method(bundle, NAMES, "zeroshot", "test-time-register",
                             intervention_config=_register()).eval()
    counts, masks, appended, medians = _high_norm(register, images, readout, [PLANT])
    assert all(v == 0.0 for v in counts.values())  # no patch is high-norm any more
    for b in counts:  # the register carries the outlier: above the high-norm threshold from the block on
        if b >= LAYER:
            assert bool((appended[b] > 2.0 * medians[b]).all()), b
    assert masks[LAYER].shape == (len(images), 64)  # the recordings hold the image's tokens only


def test_the_move_is_the_papers_max_into_the_register_and_zero_on_the_patches(setting):
    bundle, images, _, readout = setting
    register = create_method(bundle, NAMES, "zeroshot", "test-time-register",
                             intervention_config=_register(((LAYER, NEURON), (LAYER, 11)))).eval()
    tower = vision_tower(bundle.model)
    act = tower.mlp_activation(tower.blocks[LAYER])
    seen = {}
    before = act.register_forward_hook(lambda m, a, out: seen.__setitem__("before", out.clone()), prepend=True)
    after = tower.mlp_output(tower.blocks[LAYER]).register_forward_pre_hook(  # what the projection reads
        lambda m, args: seen.__setitem__("after", args[0].clone()))
    try:
        with torch.no_grad():
            register.encode_image(images, readout)
    finally:
        before.remove(), after.remove()
    b, a = seen["before"], seen["after"]
    assert b.shape[1] == 1 + 64 + 1  # CLS, 64 patches, the register at the end
    for n in (NEURON, 11):
        torch.testing.assert_close(a[:, -1, n], b[:, :, n].max(dim=1).values)
        assert bool((a[:, 1:-1, n] == 0).all())
        torch.testing.assert_close(a[:, 0, n], b[:, 0, n])  # CLS keeps its activation
    others = [n for n in range(b.shape[-1]) if n not in (NEURON, 11)]
    torch.testing.assert_close(a[:, :, others], b[:, :, others])
    assert tower.appended == 0  # the adapter's count is back after the forward


def test_no_neuron_changes_nothing_and_detection_on_a_model_without_outliers_selects_none(setting):
    bundle, images, method, readout = setting
    base = create_method(bundle, NAMES, "coop+lora", "none").eval()
    for config in (_register(()), None):  # None: detected when built; the embedded CLIP has no outlier
        register = create_method(bundle, NAMES, "coop+lora", "test-time-register", intervention_config=config).eval()
        assert register.intervention.neurons == []
        with torch.no_grad():
            assert torch.equal(register(images), base(images))
    assert register.intervention.episode_log() == {"register_neurons": []}


def test_with_neurons_the_features_change_and_tir_with_the_register_is_not_tir(setting):
    bundle, images, method, readout = setting
    neurons = ((1, 3), (2, 7), (2, 100))
    with torch.no_grad():
        plain = create_method(bundle, NAMES, "coop+lora", "none").eval()(images)
        moved = create_method(bundle, NAMES, "coop+lora", "test-time-register",
                              intervention_config=_register(neurons)).eval()(images)
        tir = create_method(bundle, NAMES, "coop+lora", "tir").eval()(images)
        both = create_method(bundle, NAMES, "coop+lora", "tir+test-time-register",
                             intervention_config=TIRRegisterConfig(neurons=neurons)).eval()(images)
        tir_alone = create_method(bundle, NAMES, "coop+lora", "tir+test-time-register",
                                  intervention_config=TIRRegisterConfig(neurons=())).eval()(images)
    assert (moved - plain).abs().max() > 1e-3 and (both - tir).abs().max() > 1e-3
    assert torch.equal(tir_alone, tir)  # no neuron: exactly TIR
    assert {"test-time-register", "tir+test-time-register"} <= set(list_interventions())


def test_settings_are_checked_and_survive_the_run_config(setting):
    with pytest.raises(ConfigError, match="register_init='ones'"):
        build_intervention("test-time-register", 6, TestTimeRegisterConfig(register_init="ones"))
    with pytest.raises(ConfigError, match=r"blocks \[9\] out of range"):
        build_intervention("test-time-register", 6, _register(((9, 0),)))
    bundle, images, method, _ = setting
    with pytest.raises(ConfigError, match="neuron 5000 out of range"):
        with planted(method, [Plant("register-neuron", LAYER, channel=5000)]):
            pass
    config = replace(TINY, method=MethodConfig("coop+lora", "test-time-register",
                                               intervention_config=_register(((1, 2), (3, 4)), top_k=4)))
    again = RunConfig.from_dict(config.to_dict())
    assert again == config and again.method.intervention_config.neurons == ((1, 2), (3, 4))


def test_batched_episodes_equal_one_at_a_time():
    from test_episode_batch import _batched, _max_difference, _sequential

    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    config = replace(TINY, method=MethodConfig("coop+lora", "tir+test-time-register", lora=LoRAConfig(rank=2),
                                               intervention_config=TIRRegisterConfig(neurons=((0, 1), (1, 5)))),
                     train=TrainConfig(steps=3))
    config = replace(config, episodes=replace(config.episodes, n_episodes=3))
    assert _max_difference(_sequential(config, bundle), _batched(config, bundle)) < 1e-5


def test_a_timm_trunk_goes_through_the_same_adapter():
    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    trunk = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2,
                    num_classes=bundle.model.text_projection.shape[1], global_pool="token")
    trunk.preprocess_cfg = bundle.model.visual.preprocess_cfg
    bundle.model.visual = trunk.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    method = create_method(bundle, NAMES[:3], "zeroshot", "none").eval()
    with planted(method, [Plant("register-neuron", 1, token=3, channel=9)]):
        found = find_register_neurons(method.model, images, highest_block=2)
    assert found.neurons[0] == (1, 9)
    register = create_method(bundle, NAMES[:3], "zeroshot", "test-time-register",
                             intervention_config=_register(((1, 9),))).eval()
    with planted(register, [Plant("register-neuron", 1, token=3, channel=9)]), record(register, [3]) as cache, \
            torch.no_grad():
        logits = register(images)
    norms = cache["blocks.3.resid_post"][:, 1:].norm(dim=-1)
    assert cache["blocks.3.resid_post"].shape[1] == 1 + 16 and logits.shape == (3, 3)
    assert bool((norms[:, 3] < 2 * norms.median(dim=-1).values).all())  # moved out of the patch
    assert bool((cache.appended["blocks.3.resid_post"].norm(dim=-1)[:, 0] > 2 * norms.median(dim=-1).values).all())


def test_the_control_on_a_whole_model_reports_the_plant_found_and_removed(setting):
    from analysis.controls import register_neuron_control
    from analysis.figures import register_control

    bundle, images, _, _ = setting
    table, maps = register_neuron_control(bundle, images, layer=LAYER, neuron=NEURON, token=TOKEN)
    rows = table.set_index("model")
    assert set(rows["detected_first"]) == {f"{LAYER}:{NEURON}"}
    assert rows.loc["planted", "high_norm_per_image"] == 1.0 and rows.loc["planted", "planted_patch_over_median"] > 2
    with_register = rows.loc["planted + test-time register"]
    assert with_register["high_norm_per_image"] == 0.0 and with_register["register_over_median"] > 2
    assert maps["planted"]["activation"].shape == (len(images), 8, 8)
    assert maps["planted"]["activation"][:, TOKEN // 8, TOKEN % 8].min() > maps["planted"]["activation"].median()
    assert float(maps["planted + test-time register"]["activation"][:, TOKEN // 8, TOKEN % 8].abs().max()) == 0.0
    figure = register_control(table, maps)
    assert len(figure.axes) == 2 * 2 + 4  # two rows of two maps with colour bars
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_a_run_config_naming_the_register_reads_back_without_importing_the_interventions():
    """A run folder's config.json is read by commands that never import the interventions
    (analysis.organism --finetune): the settings type must be known to the config layer itself."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from cdfsl_core.config import RunConfig; "
            "c = RunConfig.from_dict(json.loads(sys.stdin.read())); print(type(c.method.intervention_config).__name__)")
    config = replace(TINY, method=MethodConfig("coop+lora", "test-time-register", intervention_config=_register()))
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(config.to_dict()), capture_output=True, text=True)
    assert out.stdout.strip() == "TestTimeRegisterConfig", out.stderr


@pytest.mark.slow
def test_vit_b16_with_random_weights_detects_a_planted_neuron_and_fine_tunes_with_the_register(tmp_path):
    """ViT-B/16 (12 blocks, 3072 hidden units per MLP), random weights: the detector finds a planted
    neuron among 6 x 3072 candidates, and a coop+lora run with TIR and the register trains, records
    its neurons and measures its trajectory."""
    from cdfsl_core.config import ModelConfig
    from cdfsl_core.run_folder import RunFolder
    from cdfsl_core.runner import run

    torch.manual_seed(0)
    bundle = load_clip("ViT-B-16")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    method = create_method(bundle, NAMES[:2], "zeroshot", "none").eval()
    with planted(method, [Plant("register-neuron", 4, token=30, channel=2000)]):
        found = find_register_neurons(method.model, images)
    assert found.neurons[0] == (4, 2000) and found.scores.shape == (6, 3072)  # blocks 0..round(5 x 12 / 12)
    config = replace(TINY, model=ModelConfig("ViT-B-16", None, "cpu"),
                     data=replace(TINY.data, episode_file=str(tmp_path / "ep.json")),
                     method=MethodConfig("coop+lora", "tir+test-time-register", lora=LoRAConfig(rank=2),
                                         intervention_config=TIRRegisterConfig(neurons=((2, 10), (4, 2000)))),
                     episodes=replace(TINY.episodes, n_way=2, n_query=1, n_episodes=1),
                     train=TrainConfig(steps=1, trajectory_steps=(0, 1)))
    assert run(config, tmp_path / "run", progress=False)["episodes"] == 1
    rows, _ = RunFolder(tmp_path / "run").lines()
    assert rows[0]["status"] == "ok" and rows[0]["intervention_log"]["register_neurons"] == ["2:10", "4:2000"]
    assert [point["step"] for point in rows[0]["trajectory"]] == [0, 1]
    assert "high-norm" in rows[0]["trajectory"][0]["token-diagnostics"]["sinks"]


def test_the_register_enters_block_0_as_zeros_or_as_the_mean_patch_token(setting):
    bundle, images, _, readout = setting
    for init in ("zeros", "mean"):
        method = create_method(bundle, NAMES, "zeroshot", "test-time-register",
                               intervention_config=_register(register_init=init)).eval()
        with record(method, layers=[0], what=("resid_pre",)) as cache, torch.no_grad():
            method.encode_image(images, readout)
        entering, register = cache["blocks.0.resid_pre"], cache.appended["blocks.0.resid_pre"][:, 0]
        expected = torch.zeros_like(register) if init == "zeros" else entering[:, 1:].mean(dim=1)
        torch.testing.assert_close(register, expected)
        assert entering.shape[1] == 1 + 64  # the recording holds the image's tokens only
