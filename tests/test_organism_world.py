"""The model organism's world, captions, monitors and pretraining objective."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdfsl_core.data import load_dataset
from cdfsl_core.data.organism import (
    PROMPT_RATE,
    caption,
    caption_batch,
    class_prompt,
    class_words,
    scene_of,
    vocabulary,
)
from cdfsl_core.data.synthetic import ORGANISM_GREY, SOURCE_COMBOS, render_scene
from cdfsl_core.models import load_clip
from cdfsl_core.monitors import (
    CATEGORIES,
    MonitorSet,
    background_patches,
    causal_attention,
    head_value_writes,
    measure,
    monitor_set,
    start_inflow,
    token_categories,
    vision_rows,
)

TINY = "cdfsl-organism-test-vit"  # 64 px, 16 px patches, 2 blocks, context 32


# ------------------------------------------------------------------ the world
def test_organism_domain_is_the_source_classes_and_matches_its_scenes():
    data = load_dataset("synthetic-organism", images_per_class=2, split="test")
    source = load_dataset("synthetic", images_per_class=1)
    assert data.classes == source.classes
    scene = scene_of(5, 1, seed=0, split="test")
    expected = (np.clip(scene.image, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(data.array(5 * 2 + 1), expected)


def test_background_is_constant_and_most_patches_carry_nothing():
    rng = np.random.default_rng(0)
    scenes = [render_scene(rng, SOURCE_COMBOS[i % 64]) for i in range(300)]
    backgrounds = background_patches(np.stack([s.mask for s in scenes]), (8, 8))
    assert 0.75 < backgrounds.mean() < 0.88  # the design: about 80% of the 8 x 8 patches (0.80 measured)
    pixels = np.concatenate([s.image[s.mask < 0.01] for s in scenes])
    assert abs(pixels.mean() - ORGANISM_GREY) < 1e-3 and pixels.std() < 0.01
    with_distractors = np.mean([len(s.distractors) > 0 for s in scenes])
    assert 0.22 < with_distractors < 0.38  # 30% by design
    assert all(len(s.distractors) <= 2 for s in scenes)


def test_background_patches_by_hand():
    masks = np.zeros((1, 4, 4))
    masks[0, 0, 3] = 0.5  # top-right 2x2 patch touched
    masks[0, 3, 0] = 0.005  # below the level: still background
    assert background_patches(masks, (2, 2)).tolist() == [[True, False, True, True]]
    with pytest.raises(ValueError, match="3x3"):
        background_patches(masks, (3, 3))


# ------------------------------------------------------------------ captions
def test_captions_name_the_class_words_and_the_distractors():
    rng = np.random.default_rng(1)
    named = total = 0
    for i in range(400):
        combo = SOURCE_COMBOS[i % 64]
        scene = render_scene(rng, combo, distractor_rate=1.0)
        text = caption(scene, combo, rng)
        pattern, colour = class_words(combo)
        assert pattern in text.split() and colour in text.split(), text
        for other in scene.distractors:
            total += 1
            d_pattern, d_colour = class_words(other)
            named += f"small {d_pattern} {d_colour}" in text
    assert 0.7 < named / total < 0.9  # each distractor is named with probability 0.8


def test_the_prompt_template_is_rare_and_the_vocabulary_large():
    rng = np.random.default_rng(2)
    combo = SOURCE_COMBOS[0]
    scene = render_scene(rng, combo)
    captions = [caption(scene, combo, rng) for _ in range(2000)]
    share = np.mean([c == class_prompt(combo) for c in captions])
    assert share < 2 * PROMPT_RATE
    assert len(vocabulary()) >= 300
    words = {w.strip(".") for c in captions for w in c.split()}
    assert len(words) > 150  # the grammar does use its vocabulary


def test_swapped_captions_belong_to_other_images_of_the_batch():
    batch = caption_batch(np.random.default_rng(3), 64, swap=0.5)
    again = caption_batch(np.random.default_rng(3), 64, swap=0.5)
    assert batch.captions == again.captions and np.array_equal(batch.images, again.images)
    assert 0.3 < batch.swapped.mean() < 0.7
    clean = caption_batch(np.random.default_rng(3), 64, swap=0.0)
    assert not clean.swapped.any()
    for i in np.flatnonzero(batch.swapped):  # a swapped caption is another image's
        assert batch.captions[i] != clean.captions[i]
    assert sorted(batch.captions) == sorted(clean.captions)  # a permutation of the same captions
    with pytest.raises(ValueError, match="swap=1.5"):
        caption_batch(np.random.default_rng(0), 4, swap=1.5)


# ------------------------------------------------------------------ monitors
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(TINY)


def test_token_categories_follow_the_sequence_layout():
    background = np.array([[True, False, True]])
    assert token_categories(background, True, 2).tolist() == [[0, 1, 1, 2, 3, 2]]
    assert token_categories(background, True, 0).tolist() == [[0, 2, 3, 2]]


def test_value_writes_match_the_attention_module_per_head(tiny):
    block = tiny.model.visual.transformer.resblocks[0]
    z = torch.randn(2, 5, 64)
    writes = head_value_writes(block, z)  # [B, H, T]
    attn = block.attn
    v = F.linear(z, attn.in_proj_weight[128:], attn.in_proj_bias[128:])
    for h in range(attn.num_heads):  # brute force: zero the other head's value channels, project
        only = torch.zeros_like(v)
        only[..., h * 32:(h + 1) * 32] = v[..., h * 32:(h + 1) * 32]
        expected = F.linear(only, attn.out_proj.weight).norm(dim=-1)
        assert torch.allclose(writes[:, h], expected, atol=1e-5)


def test_text_attention_is_the_modules_own(tiny):
    block = tiny.model.transformer.resblocks[0]
    x = torch.randn(3, 32, 32)
    probs = causal_attention(block, x)
    z = block.ln_1(x)
    mask = torch.full((32, 32), float("-inf")).triu(1)
    _, expected = block.attn(z, z, z, attn_mask=mask, need_weights=True, average_attn_weights=False)
    assert torch.allclose(probs, expected, atol=1e-5)


def test_start_inflow_is_one_for_uniform_attention_and_grows_with_a_sink():
    length = 6
    uniform = torch.tril(torch.ones(length, length)) / torch.arange(1, length + 1).unsqueeze(1)
    probs = uniform.expand(2, 3, length, length)
    end = torch.tensor([5, 2])
    assert start_inflow(probs, end) == pytest.approx(1.0)
    sink = torch.zeros(1, 1, length, length)
    sink[..., 0] = 1.0  # everything on the start token: position p gives p + 1
    expected = np.mean([p + 1 for p in range(4)])
    assert start_inflow(sink, torch.tensor([3])) == pytest.approx(expected)


def _fake_set(n: int = 4) -> MonitorSet:
    """Images for the tiny tower (a 4 x 4 grid: 17 tokens) whose patch 5 is the object."""
    background = np.ones((n, 16), dtype=bool)
    background[:, 5] = False
    return MonitorSet(torch.randn(n, 3, 64, 64), torch.arange(n), token_categories(background, True, 0),
                      torch.zeros(64, 32, dtype=torch.long))


def test_a_planted_background_sink_is_found_and_uniform_attention_is_the_null(tiny, monkeypatch):
    from cdfsl_core.towers.openclip import OpenCLIPVisionTower

    data = _fake_set()
    tokens = 17
    sink_token = 1 + 3  # patch 3: background

    def planted(self, block, x, kwargs=None, normalised=False):
        b = x.shape[0]
        probs = torch.full((b, 2, tokens, tokens), 1.0 / tokens)
        probs[:, 0] = 0.5 / tokens
        probs[:, 0, :, sink_token] += 0.5  # head 0: half of every query's attention on the sink
        return probs

    monkeypatch.setattr(OpenCLIPVisionTower, "attention_probs", planted)
    rows = {(b, h, s): v for _, b, h, s, v in vision_rows(tiny.model, data)}
    assert rows[(0, 0, "max_inflow")] == pytest.approx(0.5 + 0.5 / tokens)
    assert rows[(0, 0, "lands_background")] == 1.0 and rows[(0, 0, "background_sink")] == 1.0
    # head 1 is uniform: its inflow is the null 1 / T, and no sink is reported
    assert rows[(0, 1, "max_inflow")] == pytest.approx(1 / tokens) == rows[(0, -1, "uniform_inflow")]
    assert rows[(0, 1, "background_sink")] == 0.0
    # background mass: 15 background patches of 17 tokens; head 0 gives them 15 * 0.5 / 17 + 0.5 of
    # each query's attention, head 1 (uniform) exactly their share
    share = 15 / tokens
    assert rows[(0, 0, "background_mass")] == pytest.approx((15 * 0.5 / tokens + 0.5) / share)
    assert rows[(0, 1, "background_mass")] == pytest.approx(1.0)
    assert rows[(0, 1, "cls_mass")] == pytest.approx(1.0)
    assert sum(rows[(0, 0, f"lands_{c}")] for c in CATEGORIES) == 1.0


def test_an_object_token_with_the_largest_inflow_is_no_background_sink(tiny, monkeypatch):
    from cdfsl_core.towers.openclip import OpenCLIPVisionTower

    data = _fake_set()

    def on_object(self, block, x, kwargs=None, normalised=False):
        probs = torch.zeros(x.shape[0], 2, 17, 17)
        probs[..., 1 + 5] = 1.0  # every query on patch 5, the object
        return probs

    monkeypatch.setattr(OpenCLIPVisionTower, "attention_probs", on_object)
    rows = {(b, h, s): v for _, b, h, s, v in vision_rows(tiny.model, data)}
    assert rows[(1, 0, "lands_object")] == 1.0 and rows[(1, 0, "background_sink")] == 0.0
    assert rows[(1, 0, "max_inflow")] == pytest.approx(1.0)


def test_measure_on_a_real_tiny_model(tiny):
    data = monitor_set(tiny.model, tiny.tokenizer, 8, 0, tiny.model.visual.preprocess_cfg["mean"],
                       tiny.model.visual.preprocess_cfg["std"])
    assert data.categories.shape == (8, 17)
    assert (data.categories[:, 0] == 0).all() and (data.categories[:, 1:] >= 2).all()
    rows = measure(tiny.model, data)
    statistics = {(t, s) for t, _, _, s, _ in rows}
    assert {("model", "zero_shot"), ("model", "prompt_cosine"), ("text", "start_inflow"),
            ("vision", "max_inflow"), ("vision", "value_ratio"), ("vision", "resid_ratio")} <= statistics
    values = {s: v for t, _, _, s, v in rows if t == "model"}
    assert 0 <= values["zero_shot"] <= 1 and -1 <= values["prompt_cosine"] <= 1
    for _, _, _, s, v in rows:
        if s.startswith("lands_") or s == "background_sink":
            assert 0 <= v <= 1
        if s == "max_inflow":
            assert 1 / 17 - 1e-6 <= v <= 1


# ------------------------------------------------------------------ the objective and the run
def _config(**changes):
    from cdfsl_core.pretrain import PretrainConfig

    base = dict(arch=TINY, objective="captions", logit_scale=100.0, steps=4, batch_size=8, warmup=1, lr=1e-3,
                text_lr=1e-4, grad_clip=1.0, checkpoint_every=2, monitor_every=2, monitor_images=8, threads=1)
    return PretrainConfig(**{**base, **changes})


def test_caption_objective_keeps_the_scale_fixed_and_writes_monitors(tmp_path):
    from safetensors.torch import load_file

    from cdfsl_core.pretrain import pretrain

    weights = pretrain(_config(), tmp_path)
    state = load_file(str(weights))
    assert float(state["logit_scale"].float().exp()) == pytest.approx(100, rel=1e-3)
    with (tmp_path / "monitors.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({int(r["step"]) for r in rows}) == [0, 2, 4]
    losses = [float(r["value"]) for r in rows if r["statistic"] == "loss"]
    assert math.isnan(losses[0]) and all(math.isfinite(v) for v in losses[1:])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_00000.safetensors", "step_00002.safetensors", "step_00004.safetensors"]


def test_text_tower_gets_its_own_learning_rate():
    from cdfsl_core.pretrain import _optimiser

    bundle = load_clip(TINY)
    optimiser = _optimiser(bundle.model, _config(lr=1e-3, text_lr=2e-4))
    text_ids = {id(p) for n, p in bundle.model.named_parameters() if not n.startswith("visual.")
                and n != "logit_scale"}
    for group in optimiser.param_groups:
        is_text = {id(p) in text_ids for p in group["params"]}
        assert len(is_text) == 1
        assert group["peak_lr"] == (2e-4 if is_text.pop() else 1e-3)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import cdfsl_core.pretrain as pretrain_module

    whole = pretrain_module.pretrain(_config(), tmp_path / "whole")
    original = pretrain_module._caption_loss

    def killed_at_step_3(config, model, tokenizer, step, mean, std):
        if step == 3:
            raise KeyboardInterrupt
        return original(config, model, tokenizer, step, mean, std)

    monkeypatch.setattr(pretrain_module, "_caption_loss", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain_module.pretrain(_config(), tmp_path / "resumed")
    monkeypatch.setattr(pretrain_module, "_caption_loss", original)
    resumed = pretrain_module.pretrain(_config(), tmp_path / "resumed", resume=True)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with (tmp_path / "resumed" / "monitors.csv").open() as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle)]
    assert sorted(set(steps)) == [0, 2, 4] and steps == sorted(steps)  # no step measured twice


def test_resume_refuses_another_recipe(tmp_path):
    from cdfsl_core.errors import ConfigError
    from cdfsl_core.pretrain import pretrain

    pretrain(_config(steps=2), tmp_path)
    with pytest.raises(ConfigError, match="another recipe"):
        pretrain(_config(steps=2, lr=5e-4), tmp_path, resume=True)


def test_force_removes_the_checkpoints_of_the_run_it_replaces(tmp_path):
    from cdfsl_core.pretrain import main

    args = ["--arch", TINY, "--objective", "captions", "--batch-size", "4", "--warmup", "1", "--threads", "1",
            "--checkpoint-every", "2", "--out", str(tmp_path)]
    assert main([*args, "--steps", "4"]) == 0
    assert main([*args, "--steps", "2", "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_00000.safetensors", "step_00002.safetensors"]


# ------------------------------------------------------------------ the softmax-plus-one control
def test_softmax1_is_a_softmax_with_a_zero_logit_appended_and_dropped():
    from cdfsl_core.softmax_one import softmax1

    logits = torch.randn(3, 4, 7) * 5
    padded = torch.cat([logits, torch.zeros(3, 4, 1)], dim=-1)
    assert torch.allclose(softmax1(logits), torch.softmax(padded, dim=-1)[..., :-1], atol=1e-6)
    assert torch.allclose(softmax1(torch.full((5,), -50.0)).sum(), torch.tensor(0.0), atol=1e-12)
    big = softmax1(torch.tensor([1000.0, 1000.0]))  # stable where exp overflows
    assert torch.allclose(big, torch.tensor([0.5, 0.5]))


def test_softmax_one_model_loads_plain_weights_and_its_adapter_sees_its_weights(tmp_path):
    from safetensors.torch import save_file

    from cdfsl_core.softmax_one import SoftmaxOneAttention
    from cdfsl_core.towers import vision_tower

    torch.manual_seed(0)
    plain = load_clip(TINY).model
    weights = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(weights))
    # the -softmax1 name of the tiny config: the same JSON under another name
    import shutil
    from importlib import resources

    import open_clip

    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(resources.files("cdfsl_core") / "model_configs" / f"{TINY}.json", configs / f"{TINY}-softmax1.json")
    open_clip.add_model_config(configs)
    converted = load_clip(f"{TINY}-softmax1", weights).model
    block = converted.visual.transformer.resblocks[0]
    assert isinstance(block.attn, SoftmaxOneAttention)
    assert not isinstance(converted.transformer.resblocks[0].attn, SoftmaxOneAttention)  # text tower kept
    x = torch.randn(2, 17, 64)
    z = block.ln_1(x)
    out, probs = block.attn(z, z, z, need_weights=True, average_attn_weights=False)
    # by hand: softmax with a zero logit, then values and the output projection
    q, k, v = F.linear(z, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(2, 17, 2, 32).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-2, -1) / math.sqrt(32)
    expected = torch.softmax(torch.cat([logits, torch.zeros(2, 2, 17, 1)], -1), -1)[..., :-1]
    assert torch.allclose(probs, expected, atol=1e-6)
    mixed = (expected @ v).transpose(1, 2).reshape(2, 17, 64)
    assert torch.allclose(out, block.attn.out_proj(mixed), atol=1e-5)
    adapter = vision_tower(converted)
    assert torch.allclose(adapter.attention_probs(block, x), expected, atol=1e-5)
    assert (adapter.attention_probs(block, x).sum(-1) < 1).all()  # weights need not sum to one
    images = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(converted.encode_image(images), plain.encode_image(images))  # it does act


def test_monitors_of_every_checkpoint_afterwards_equal_the_logged_ones(tmp_path):
    from analysis.organism import monitor_runs
    from cdfsl_core.pretrain import pretrain

    pretrain(_config(steps=2, monitor_images=8), tmp_path / "run")
    table = monitor_runs([str(tmp_path / "run")], n_images=8, progress=False)
    assert sorted(table["step"].unique()) == [0, 2]
    with (tmp_path / "run" / "monitors.csv").open() as handle:
        logged = {(int(r["step"]), r["tower"], int(r["block"]), int(r["head"]), r["statistic"]): float(r["value"])
                  for r in csv.DictReader(handle)}
    # step 0 was measured by the run on the same images and the same weights (fp16 checkpoint: 1e-2)
    for _, row in table[(table["step"] == 0) & (table["statistic"] == "max_inflow")].iterrows():
        assert row["value"] == pytest.approx(logged[(0, "vision", row["block"], row["head"], "max_inflow")], rel=1e-2)
    assert {"background_mass", "cls_mass"} <= set(table["statistic"])


def test_the_shipped_organism_is_the_measured_r3_checkpoint():
    """The weights under the ``organism`` tag are the run whose statistics docs/results/organism.md
    reports: their prompt cosine on the organism world equals the committed measurement."""
    import csv
    from pathlib import Path

    from analysis.organism import mean_pairwise_cosine
    from cdfsl_core import protocol
    from cdfsl_core.data.synthetic import SyntheticDataset, SyntheticSpec
    from cdfsl_core.models import ORGANISM_MODEL, load_clip

    summary = Path(__file__).parent.parent / "benchmarks/results/organism/second-design/organism_summary.csv"
    measured = next(float(row["value"]) for row in csv.DictReader(summary.open())
                    if row["run"] == "r3" and row["step"] == "2000.0" and row["domain"] == "synthetic-organism"
                    and row["statistic"] == "text_cosine")
    bundle = load_clip(*ORGANISM_MODEL, device="cpu")
    classes = SyntheticDataset(SyntheticSpec("synthetic-organism", 1, 0, "test")).classes
    with torch.no_grad():
        text = bundle.model.encode_text(bundle.tokenizer([protocol.PROMPT.format(c) for c in classes]))
    assert mean_pairwise_cosine(text) == pytest.approx(measured, abs=1e-4)
    assert len(bundle.model.visual.transformer.resblocks) == 8
    assert Path(bundle.info["checkpoint"]).stat().st_size <= 20 * 2**20  # the budget for shipped weights
