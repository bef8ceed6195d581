"""The precision contract, tested on the CPU with bf16 autocast (the GPU proxy).

Training and plain forwards may run in bf16; selections and rankings (token-class cosines, Sum
scores, top-k and head/tail sets, the projection solve, recomputed attention) run in fp32
whatever the autocast context. So on the same residual stream, TIR's Sum scores and ATHA's head
and tail sets are identical with and without bf16 autocast, while the same quantities computed in
bf16 (the negative control) differ for some tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY

from analysis.config import AnalysisConfig
from analysis.recorder import attention_pattern, record
from analysis.run_diagnostics import diagnose_model
from cdfsl_core.config import TrainConfig
from cdfsl_core.data import load_dataset
from cdfsl_core.episode_loop import train_episode
from cdfsl_core.errors import DeviceError
from cdfsl_core.interventions import TIR
from cdfsl_core.lora import LoRAConfig
from cdfsl_core.methods import ADAPTATIONS, INTERVENTIONS, create_method
from cdfsl_core.models import EMBEDDED_MODEL, load_clip, resolve_device, resolve_precision
from cdfsl_core.preprocess import protocol_transform
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.runner import run
from cdfsl_core.token_text import project_tokens, sum_score, token_class_similarity
from cdfsl_core.towers import vision_tower

NAMES = ["striped red shape", "dotted blue shape", "plain green shape", "wavy pink shape", "checked black shape"]
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def embedded():
    """The embedded CLIP, 16 target images and the stream entering block 4 (where TIR acts), in fp32."""
    bundle = load_clip(*EMBEDDED_MODEL)
    dataset = load_dataset("synthetic-lesions", images_per_class=4)
    transform = protocol_transform(bundle, 1.15)
    images = torch.stack([transform(dataset.load_image(i)) for i in range(0, 28, 2)])
    method = create_method(bundle, NAMES, "zeroshot", "none").eval()
    with torch.no_grad():
        _, readout = method.text_features(readout=True)
    with record(method, layers=[4], what=("resid_pre",)) as cache, torch.no_grad():
        method.encode_image(images, readout)
    return bundle, method, readout, cache["blocks.4.resid_pre"], images


def _tir_counts(visual, x, text):
    patches = project_tokens(visual, x[:, 1:].float())
    return sum_score(token_class_similarity(patches, text), 0.3)


def test_sum_scores_are_the_same_with_and_without_bf16_autocast(embedded):
    bundle, _, readout, x, _ = embedded
    visual = bundle.model.visual
    fp32 = _tir_counts(visual, x, readout)
    with torch.autocast(**BF16):
        proxy = _tir_counts(visual, x, readout)
        edited = TIR().edit(4, x, {"visual": visual, "text": readout})  # TIR's own path
    assert torch.equal(proxy, fp32)
    weights = (edited[:, 1:].float().norm(dim=-1) / x[:, 1:].norm(dim=-1))
    from cdfsl_core.token_text import tir_weights
    assert torch.allclose(weights, tir_weights(fp32, 5), atol=1e-2)  # bf16 scaling, fp32 selection


def test_the_negative_control_bf16_rankings_change_some_sum_scores(embedded):
    # what the code did before the contract: the same cosines computed in bf16
    bundle, _, readout, x, _ = embedded
    with torch.no_grad():
        projected = project_tokens(bundle.model.visual, x[:, 1:]).bfloat16()
        cosines = F.normalize(projected, dim=-1) @ F.normalize(readout.bfloat16(), dim=-1).T
    changed = (sum_score(cosines, 0.3) != _tir_counts(bundle.model.visual, x, readout)).sum()
    assert changed > 0


def test_head_and_tail_sets_are_the_same_with_and_without_bf16_autocast(embedded):
    bundle, _, readout, x, _ = embedded
    method = create_method(bundle, NAMES, "coop", "atha").eval()
    state = method.intervention.prepare(bundle.model.visual, readout)
    fp32 = method.intervention.selection(x[:, 1:], state["unit"])
    with torch.autocast(**BF16):
        state = method.intervention.prepare(bundle.model.visual, readout)
        proxy = method.intervention.selection(x[:, 1:].bfloat16(), state["unit"])  # a bf16 stream too
        assert state["vectors"].dtype == torch.float32  # the projection solve in fp32
    # the bf16 stream rounds the tokens; the selection from the same fp32 stream is identical
    with torch.autocast(**BF16):
        same = method.intervention.selection(x[:, 1:], state["unit"])
    assert all(torch.equal(a, b) for a, b in zip(same, fp32))
    assert all(a.dtype == torch.float32 for a in proxy)


def test_recomputed_attention_is_fp32_under_autocast(embedded):
    bundle, _, _, x, _ = embedded
    block = bundle.model.visual.transformer.resblocks[4]
    with torch.no_grad():
        z = block.ln_1(x)
        fp32 = attention_pattern(vision_tower(bundle.model), block, z)
        with torch.autocast(**BF16):
            proxy = attention_pattern(vision_tower(bundle.model), block, z)
    assert proxy.dtype == torch.float32 and torch.allclose(proxy, fp32, atol=1e-6)


@pytest.mark.parametrize("adaptation", ADAPTATIONS)
@pytest.mark.parametrize("intervention", INTERVENTIONS)
def test_every_method_trains_under_bf16_autocast_on_the_cpu(bundle, adaptation, intervention):
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    method = create_method(bundle, NAMES[:3], adaptation, intervention, lora=LoRAConfig(rank=2))
    seen = []
    handle = bundle.model.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype))
    try:
        result = train_episode(method, images, labels, TrainConfig(steps=2), precision="bf16")
    finally:
        handle.remove()
    if adaptation != "zeroshot":
        assert result["steps"] == 2 and all(map(lambda v: v == v, (result["loss_first"], result["loss_last"])))
        assert seen and set(seen) == {torch.bfloat16}  # the forward really ran under bf16 autocast


def test_every_diagnostic_runs_under_bf16_autocast(embedded):
    bundle, _, _, _, images = embedded
    method = create_method(bundle, NAMES, "coop+lora", "tir").eval()
    with torch.autocast(**BF16):
        tables = diagnose_model(method, images[:5], torch.arange(5), {"model": "m"}, AnalysisConfig(attribution_steps=2))
    with torch.no_grad():
        plain = diagnose_model(method, images[:5], torch.arange(5), {"model": "m"}, AnalysisConfig(attribution_steps=2))
    assert set(tables) == {"norms", "sinks", "head_tail", "attention", "rollout", "attribution", "token_maps"}
    for name in ("norms", "sinks", "head_tail", "attention", "rollout", "token_maps"):
        assert tables[name].select_dtypes("number").notna().any().all(), name
    # the Sum-score buckets (counts) may differ only through the bf16 forward before the block, not
    # through the ranking: sink definitions read fp32 statistics of the recorded stream
    assert tables["sinks"]["images"].eq(5).all() and len(tables["norms"]) == len(plain["norms"])


def test_a_run_in_bf16_on_the_cpu_records_its_precision(tmp_path):
    config = TINY.__class__.from_dict({**TINY.to_dict(), "model": {**TINY.to_dict()["model"], "precision": "bf16"}})
    run(config, tmp_path / "run", progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    rows = RunFolder(tmp_path / "run").lines()[0]
    assert manifest["precision"] == "bf16" and manifest["device"] == "cpu"
    assert {r["precision"] for r in rows} == {"bf16"} and all(r["status"] == "ok" for r in rows)


def test_a_resume_in_another_precision_is_refused_unless_allowed(tmp_path, monkeypatch):
    import cdfsl_core.episode_loop as episode_loop

    folder = tmp_path / "run"
    real_train = episode_loop.train_episode
    calls = {"n": 0}

    def dies_on_the_second_episode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(episode_loop, "train_episode", dies_on_the_second_episode)
    with pytest.raises(KeyboardInterrupt):
        run(TINY, folder, progress=False)
    monkeypatch.setattr(episode_loop, "train_episode", real_train)
    # the first episode as if computed on a GPU in bf16 (device 'auto' on another machine)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "device": "cuda", "precision": "bf16"}))
    with pytest.raises(DeviceError, match=r"device: the run has 'cuda', this process 'cpu'.*precision: the run has "
                                          r"'bf16', this process 'fp32'.*--allow-mixed-precision"):
        run(TINY, folder, progress=False)
    summary = run(TINY, folder, progress=False, allow_mixed_precision=True)
    assert summary["episodes"] == 4
    assert json.loads((folder / "manifest.json").read_text())["mixed_precision"] is True


def test_devices_and_precisions_that_cannot_be_had_are_clear_errors(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device is available.*--device cpu"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="precision='half'"):
        resolve_precision(torch.device("cpu"), "half")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "an old GPU")
    with pytest.raises(DeviceError, match="bf16 was requested on an old GPU|precision='bf16' was requested on an old GPU"):
        resolve_precision(torch.device("cuda"), "bf16")
    assert resolve_precision(torch.device("cpu"), "auto") == "fp32"
    assert resolve_precision(torch.device("cpu"), "bf16") == "bf16"
