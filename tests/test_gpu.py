"""The CUDA path: bf16 training against fp32 selections, recorder and diagnostics on the device.

Marked ``gpu`` and skipped without CUDA (the default run deselects them): run with
``.venv/bin/python -m pytest -m gpu tests/test_gpu.py`` on a machine with a GPU. The CPU proxy of
the same contract (bf16 autocast on the CPU) runs everywhere in ``test_precision.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from analysis.config import AnalysisConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NAMES = ["striped red shape", "dotted blue shape", "plain green shape", "wavy pink shape", "checked black shape"]


@pytest.fixture(scope="module")
def on_gpu():
    from cdfsl_core.data import load_dataset
    from cdfsl_core.methods import create_method
    from cdfsl_core.models import EMBEDDED_MODEL, load_clip
    from cdfsl_core.preprocess import protocol_transform

    bundle = load_clip(*EMBEDDED_MODEL, device="cuda")
    dataset = load_dataset("synthetic-lesions", images_per_class=4)
    transform = protocol_transform(bundle, 1.15)
    images = torch.stack([transform(dataset.load_image(i)) for i in range(0, 28, 2)]).cuda()
    method = create_method(bundle, NAMES, "coop+lora", "tir").eval()
    return bundle, method, images


def test_tir_sum_scores_and_atha_sets_under_cuda_bf16_equal_fp32(on_gpu):
    from analysis.recorder import record
    from cdfsl_core.methods import create_method
    from cdfsl_core.token_text import project_tokens, sum_score, token_class_similarity

    bundle, method, images = on_gpu
    with torch.no_grad():
        _, readout = method.text_features()
        with record(method, layers=[4], what=("resid_pre",)) as cache:
            method.encode_image(images, readout)
    x = cache["blocks.4.resid_pre"]
    visual = bundle.model.visual
    fp32 = sum_score(token_class_similarity(project_tokens(visual, x[:, 1:]), readout), 0.3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = sum_score(token_class_similarity(project_tokens(visual, x[:, 1:]), readout), 0.3)
        atha = create_method(bundle, NAMES, "coop", "atha").eval().intervention
        state = atha.prepare(visual, readout)
        proxy = atha.selection(x[:, 1:], state["unit"])
    assert torch.equal(fp32, bf16)
    state = atha.prepare(visual, readout)
    assert all(torch.equal(a, b) for a, b in zip(proxy, atha.selection(x[:, 1:], state["unit"])))


def test_diagnostics_reduce_on_the_device(on_gpu):
    from analysis.run_diagnostics import diagnose_model

    _, method, images = on_gpu
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tables = diagnose_model(method, images[:5], torch.arange(5, device="cuda"), {"model": "m"}, AnalysisConfig(attribution_steps=2))
    assert tables["sinks"]["images"].eq(5).all()
    assert tables["norms"]["count"].sum() > 0


def test_a_short_run_on_cuda_records_bf16(tmp_path):
    from dataclasses import replace

    from helpers import TINY

    from cdfsl_core.runner import run

    config = replace(TINY, model=replace(TINY.model, device="cuda"))
    summary = run(config, tmp_path / "run", progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["device"] == "cuda" and manifest["precision"] == "bf16" and summary["episodes"] == 4


def test_batched_episodes_on_the_device_equal_sequential_ones():
    """E episodes trained together on the GPU (fp32) end with the parameters each gets alone: the
    dropout masks come from per-episode CUDA generators in the state the global one would hold."""
    # TF32 off: with cuDNN's default TF32 convolutions the patch embedding's rounding differs between
    # the batched and the one-episode shapes, and AdamW's normalised steps carry that to ~1e-3 in 4
    # steps (measured on an H200; with TF32 off the two agree to 4e-6)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _batched_equal_sequential()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _batched_equal_sequential():
    from dataclasses import replace

    from helpers import TINY

    from cdfsl_core.config import MethodConfig, ModelConfig, TrainConfig
    from cdfsl_core.data import load_dataset
    from cdfsl_core.episode_batch import generator_like_global, train_batch
    from cdfsl_core.episode_loop import prepare_episode, train_episode
    from cdfsl_core.episodes import generate_episodes
    from cdfsl_core.models import load_clip
    from cdfsl_core.preprocess import protocol_transform

    config = replace(TINY, model=ModelConfig("cdfsl-test-vit", None, "cuda", "fp32"),
                     method=MethodConfig("coop+lora", "atha"), train=TrainConfig(steps=4))
    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit", device="cuda")
    dataset = load_dataset(config.data.dataset, None, **config.data.options)
    episodes = generate_episodes(dataset, config.episodes)
    transform = protocol_transform(bundle, config.train.resize_ratio)
    alone = []
    for i in range(3):
        method, support, labels, _, _ = prepare_episode(config, bundle, dataset, episodes, i, None, transform)
        train_episode(method, support, labels, config.train, "fp32")
        alone.append(method.trainable_state())
    prepared, generators = [], []
    for i in range(3):
        prepared.append(prepare_episode(config, bundle, dataset, episodes, i, None, transform))
        generators.append(generator_like_global(prepared[-1][1].device))
    train_batch([p[0] for p in prepared], [p[1] for p in prepared], [p[2] for p in prepared], config.train, "fp32",
                generators=generators)
    for state, p in zip(alone, prepared):
        together = p[0].trainable_state()
        assert max(float((state[k] - together[k]).abs().max()) for k in state) < 1e-4


def test_a_run_on_the_device_writes_the_same_lines_at_any_episode_batch(tmp_path):
    """The whole GPU path in one run: images cached on the device, fused optimisers, the step loop
    without host reads, the batched evaluation of queries and trajectory points; fp32 lines at E = 1
    and E = 3 equal to rounding (1e-4 on the device)."""
    import math
    from dataclasses import replace

    from helpers import TINY

    from cdfsl_core.config import MethodConfig, ModelConfig, TrainConfig
    from cdfsl_core.models import load_clip
    from cdfsl_core.run_folder import RunFolder
    from cdfsl_core.runner import run

    config = replace(TINY, model=ModelConfig("cdfsl-test-vit", None, "cuda", "fp32"),
                     method=MethodConfig("coop+lora", "atha"), train=TrainConfig(steps=4, trajectory_steps=(0, 4)))
    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit", device="cuda")
    run(config, tmp_path / "one", bundle=bundle, progress=False)
    run(config, tmp_path / "three", bundle=bundle, progress=False, episode_batch=3)

    def lines(folder):
        rows = RunFolder(folder).lines()[0]
        return sorted(rows, key=lambda row: row["episode"])

    def close(x, y, where):
        if isinstance(x, dict):
            assert set(x) == set(y), where
            for key in x:
                if key not in ("seconds", "episode_batch", "timestamp"):
                    close(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                close(u, v, f"{where}[{i}]")
        elif isinstance(x, float) and math.isfinite(x):
            assert y == pytest.approx(x, abs=1e-4, rel=1e-4), where
        else:
            assert x == y, where

    one, three = lines(tmp_path / "one"), lines(tmp_path / "three")
    assert len(one) == len(three) == config.episodes.n_episodes
    for a, b in zip(one, three):
        close(a, b, f"episode {a['episode']}")
    assert [row.get("episode_batch") for row in three] == [3, 3, 3, None]  # the fourth trained alone
