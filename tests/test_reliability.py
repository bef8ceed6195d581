"""Nothing silently wrong at the edges: each case runs the real command (``main(argv)``) on
generated data and checks the one-line message, or the correct result, and that nothing was
written before the check."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import EUROSAT_FOLDERS, write_image
from PIL import Image

from analysis.cka import main as cka_main
from analysis.run_diagnostics import main as diagnostics_main
from cdfsl_core import pretrain
from cdfsl_core.compare import main as compare_main
from cdfsl_core.data import load_dataset
from cdfsl_core.data.base import read_image
from cdfsl_core.errors import ConfigError, DatasetError
from cdfsl_core.finetune import main as finetune_main
from cdfsl_core.models import EMBEDDED_MODEL, load_clip, save_checkpoint
from cdfsl_core.models import main as models_main
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.sweep import SweepGrid, load_grid, plan_sweep

TINY = ["--dataset", "eurosat", "--ways", "3", "--shots", "1", "--queries", "1", "--steps", "1", "--lora-rank", "2",
        "--device", "cpu"]
RANDOM_TINY = [*TINY, "--model", "cdfsl-test-vit", "--pretrained", "none"]


@pytest.fixture
def eurosat(tmp_path: Path) -> Path:
    for c, name in enumerate(EUROSAT_FOLDERS[:4]):
        for i in range(1, 4):
            write_image(tmp_path / "data" / "EuroSAT" / "2750" / name / f"{name}_{i}.jpg", seed=c * 10 + i)
    return tmp_path / "data"


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _lines(folder: Path) -> list[dict]:
    return RunFolder(folder).lines()[0]


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    """A local weights file of the 2-block test architecture."""
    import torch

    torch.manual_seed(1)
    return save_checkpoint(load_clip("cdfsl-test-vit").model, tmp_path / "weights" / "tiny.safetensors")


# ------------------------------------------------------------------ 1. the model is part of a run's identity
def test_a_resume_with_replaced_weights_is_refused_naming_both_hashes(tmp_path, eurosat, tiny_weights, capsys):
    import torch

    out = tmp_path / "run"
    command = [*TINY, "--model", "cdfsl-test-vit", "--pretrained", str(tiny_weights), "--episodes", "2",
               "--data-root", str(eurosat), "--episode-file", str(tmp_path / "ep.json"), "--out", str(out)]
    assert finetune_main(command) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"].startswith("sha256:")
    assert {line["weights"] for line in _lines(out)} == {manifest["weights"]}
    # killed after episode 0 (its last line lost), then the weights file replaced at the same path
    text = (out / "episodes.jsonl").read_text().splitlines(keepends=True)
    (out / "episodes.jsonl").write_text(text[0])
    torch.manual_seed(2)
    save_checkpoint(load_clip("cdfsl-test-vit").model, tiny_weights)
    assert finetune_main(command) == 1
    message = _error(capsys)
    assert "computed with weights " + manifest["weights"][:23] in message and "Resuming would average" in message
    assert len(_lines(out)) == 1  # nothing was added


def test_compare_refuses_runs_of_two_models(tmp_path, eurosat, tiny_weights, capsys):
    common = [*TINY, "--model", "cdfsl-test-vit", "--episodes", "2", "--data-root", str(eurosat),
              "--episode-file", str(tmp_path / "ep.json")]
    assert finetune_main([*common, "--pretrained", str(tiny_weights), "--out", str(tmp_path / "a")]) == 0
    assert finetune_main([*common, "--pretrained", "none", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    message = _error(capsys)
    assert "different models" in message and "random:cdfsl-test-vit:seed0" in message


# ------------------------------------------------------------------ 2. checked before anything is written
def test_a_bad_image_fails_before_the_folder_exists_and_the_fix_is_accepted(tmp_path, eurosat, capsys):
    bad = eurosat / "EuroSAT" / "2750" / "Forest" / "Forest_2.jpg"
    bad.write_bytes(b"")  # zero bytes
    out = tmp_path / "run"
    command = [*RANDOM_TINY, "--episodes", "3", "--data-root", str(eurosat), "--episode-file",
               str(tmp_path / "ep.json"), "--out", str(out)]
    assert finetune_main(command) == 1
    assert "Forest_2.jpg cannot be decoded" in _error(capsys)
    assert not out.exists() and not (tmp_path / "ep.json").exists()
    write_image(bad, seed=99)  # fixed as the message says
    assert finetune_main(command) == 0
    assert len(_lines(out)) == 3


def test_a_folder_where_nothing_finished_accepts_a_corrected_command(tmp_path, eurosat, capsys):
    """A failed start wrote the folder (config, manifest, episode file), nothing finished; the
    corrected command (other episodes, so another episode file) is accepted."""
    from cdfsl_core import runner

    out = tmp_path / "run"
    base = [*RANDOM_TINY, "--data-root", str(eurosat), "--out", str(out)]
    from cdfsl_core.finetune import build_parser, config_from_args

    runner.prepare_run(config_from_args(build_parser().parse_args([*base, "--episodes", "2", "--seed", "3"])), out)
    assert (out / "manifest.json").exists() and not (out / "episodes.jsonl").exists()
    assert finetune_main([*base, "--episodes", "2", "--seed", "4"]) == 0
    assert len(_lines(out)) == 2


def test_output_paths_are_checked_before_any_computation(tmp_path, eurosat, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    started = time.perf_counter()
    assert finetune_main([*RANDOM_TINY, "--data-root", str(eurosat), "--out", str(a_file)]) == 1
    assert "is a file; expected a folder" in _error(capsys)
    assert finetune_main([*RANDOM_TINY, "--data-root", str(eurosat), "--out", str(a_file / "run")]) == 1
    assert "no folder can be created below it" in _error(capsys)
    assert cka_main(["--target", "synthetic-crops", "--images", "4", "--out", str(tmp_path)]) == 1
    assert "is a folder; expected a file path" in _error(capsys)
    assert cka_main(["--target", "synthetic-crops", "--images", "4", "--figure", str(a_file / "fig")]) == 1
    assert "--figure" in _error(capsys)
    assert time.perf_counter() - started < 60  # refused before the minutes of work


def test_an_unwritable_folder_is_named(tmp_path, monkeypatch):
    """As root, permission bits do not stop a write, so a read-only folder is simulated."""
    import cdfsl_core.paths as paths

    monkeypatch.setattr(paths, "_writable", lambda folder: False)
    with pytest.raises(ConfigError, match=r"--out .*run.* is not writable"):
        paths.check_writable_folder(tmp_path / "run", "--out")


def test_a_checkpoint_of_another_architecture_fails_before_the_folder_is_written(tmp_path, eurosat, capsys):
    out = tmp_path / "run"
    weights = EMBEDDED_MODEL
    from cdfsl_core.models import checkpoint_file

    shipped = checkpoint_file(*weights)
    assert finetune_main([*TINY, "--model", "cdfsl-test-vit", "--pretrained", shipped, "--data-root", str(eurosat),
                          "--out", str(out)]) == 1
    message = _error(capsys)
    assert "do not fit architecture 'cdfsl-test-vit'" in message
    assert not out.exists()


def test_an_unknown_architecture_is_not_blamed_on_the_tag(tmp_path, eurosat, capsys):
    assert finetune_main([*TINY, "--model", "no-such-arch", "--data-root", str(eurosat), "--out", str(tmp_path / "r")]) == 1
    assert "Unknown architecture 'no-such-arch'" in _error(capsys)


def test_run_diagnostics_refuses_tables_of_other_settings(tmp_path, eurosat, capsys):
    out = tmp_path / "run"
    assert finetune_main([*RANDOM_TINY, "--episodes", "1", "--data-root", str(eurosat), "--out", str(out)]) == 0
    assert diagnostics_main([str(out), "--attribution-steps", "2", "--no-head-tail"]) == 0
    first = (out / "diagnostics" / "sinks.csv").read_text()
    capsys.readouterr()
    assert diagnostics_main([str(out), "--attribution-steps", "2", "--no-head-tail", "--high-norm-tau", "3"]) == 1
    message = _error(capsys)
    assert "high_norm_tau: 2.0 (the tables there) vs 3.0 (now)" in message and "--out" in message
    assert (out / "diagnostics" / "sinks.csv").read_text() == first  # untouched
    assert diagnostics_main([str(out), "--attribution-steps", "2", "--no-head-tail", "--high-norm-tau", "3",
                             "--out", str(tmp_path / "other")]) == 0


# ------------------------------------------------------------------ 3. nothing overwritten the user did not name
def test_pretrain_never_writes_the_package_weights_by_default(tmp_path, capsys):
    assert pretrain.DEFAULT_OUT.resolve() != pretrain.PACKAGE_WEIGHTS.resolve()
    assert pretrain.main(["--steps", "1", "--out", str(pretrain.PACKAGE_WEIGHTS)]) == 1
    assert "the package's own weights folder" in _error(capsys)
    existing = tmp_path / "cdfsl-synth-vit_synthetic.safetensors"
    existing.write_bytes(b"old")
    assert pretrain.main(["--steps", "1", "--out", str(tmp_path)]) == 1
    assert "exists; pretraining would replace it" in _error(capsys)
    assert existing.read_bytes() == b"old"


# ------------------------------------------------------------------ 4. data the loaders cannot read correctly
def test_isic_rows_that_are_not_one_hot_are_refused(isic_root: Path) -> None:
    csv_path = next(isic_root.rglob("*GroundTruth.csv"))
    lines = csv_path.read_text().splitlines()
    name = lines[1].split(",")[0]
    lines[1] = ",".join([name] + ["0.0"] * 7)  # no class at all: was read as class 0
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"row 2 of .*\({name}\) is not one-hot"):
        load_dataset("isic", isic_root)
    lines[1] = ",".join([name, "nan"] + ["0.0"] * 6)
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="is not one-hot"):
        load_dataset("isic", isic_root)


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(values).save(tmp_path / "xray.png")
    assert Image.open(tmp_path / "xray.png").mode.startswith("I")
    pixels = np.asarray(read_image(tmp_path / "xray.png"))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)  # by hand, not by the loader
    assert pixels.shape == (64, 64, 3) and (pixels == expected[..., None]).all()
    assert (pixels < 255).mean() > 0.99  # the clipping conversion made 99.6% of them 255
    eight = np.asarray(Image.open(tmp_path / "xray.png").convert("RGB"))
    assert (eight == 255).mean() > 0.99  # the negative control: PIL's own conversion clips


def test_class_folders_that_differ_only_by_case_are_refused(crop_root: Path) -> None:
    folder = next(p for p in crop_root.rglob("*___*") if p.is_dir())
    twin = folder.with_name(folder.name.upper())
    shutil.copytree(folder, twin)
    with pytest.raises(DatasetError, match="both read as the class name"):
        load_dataset("cropdiseases", crop_root)


# ------------------------------------------------------------------ 5. one line, before the work
@pytest.mark.parametrize("argv, flag", [
    (["--seed", "-1"], "--seed"),
    (["--shots", "0"], "--shots"),
    (["--lora-rank", "x"], "--lora-rank"),
    (["--pretrained", ""], "--pretrained"),
    (["--steps", "-2"], "--steps"),
    (["--logit-scale", "-1"], "--logit-scale"),
    (["--ways", "1"], "--ways"),
])
def test_bad_numbers_fail_in_argparse_with_the_flag(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        finetune_main([*argv, "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_a_lora_rank_above_the_width_is_refused(tmp_path, eurosat, capsys):
    argv = [*RANDOM_TINY, "--data-root", str(eurosat), "--out", str(tmp_path / "r")]
    argv[argv.index("--lora-rank") + 1] = "100000"
    assert finetune_main(argv) == 1
    message = _error(capsys)
    assert "lora rank 100000 is above the width" in message and "in cdfsl-test-vit" in message
    assert not (tmp_path / "r").exists()


def test_more_ways_than_classes_is_refused(tmp_path, eurosat, capsys):
    argv = [*RANDOM_TINY, "--data-root", str(eurosat), "--out", str(tmp_path / "r")]
    argv[argv.index("--ways") + 1] = "9"
    assert finetune_main(argv) == 1
    assert "9" in _error(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("toml, key", [
    ('shots = ["five"]', "shots"),
    ("episodes = 2.5", "episodes"),
    ('steps = "100"', "steps"),
    ("seeds = [-1]", "seeds"),
    ("ways = 1", "ways"),
    ("lora_rank = 0", "lora_rank"),
    ('logit_scale = "big"', "logit_scale"),
    ('augment = "yes"', "augment"),
    ('precision = "fp8"', "precision"),
    ("cpus_per_task = -1", "cpus_per_task"),
])
def test_grid_values_are_named_as_the_file_spells_them_before_ray(tmp_path, toml, key):
    path = tmp_path / "grid.toml"
    path.write_text(toml + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"grid {key} = "):
        load_grid(path)
    assert time.perf_counter() - started < 5


def test_the_grid_accepts_every_episode_option_of_finetune(tmp_path, eurosat):
    grid = SweepGrid(datasets=("eurosat",), shots=(1,), methods=("coop+lora/none",), episodes=2, ways=3, queries=2,
                     short_class_policy="cycle", steps=1, lora_rank=3, logit_scale=7.0, augment=True,
                     model="cdfsl-test-vit", pretrained=None, data_root=str(eurosat), out=str(tmp_path / "sweep"))
    grid.validate()
    (cell,) = plan_sweep(grid)
    config = json.loads((cell.folder / "config.json").read_text())
    assert config["episodes"]["n_way"] == 3 and config["episodes"]["n_query"] == 2
    assert config["episodes"]["short_class_policy"] == "cycle"
    assert config["method"]["lora"]["rank"] == 3 and config["method"]["logit_scale"] == 7.0
    assert config["train"]["augment"] is True


def test_models_download_offline_fails_at_once(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    assert models_main(["download", "ViT-B-16", "openai"]) == 1
    message = _error(capsys)
    assert "HF_HUB_OFFLINE" in message and "--pretrained" in message
    assert time.perf_counter() - started < 20


def test_a_one_episode_summary_says_it_has_no_interval(tmp_path, eurosat, capsys):
    assert finetune_main([*RANDOM_TINY, "--episodes", "1", "--data-root", str(eurosat), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "(no CI: 1 value) % over 1 episodes" in out and "+- 0.00" not in out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["ci95"] is None


def test_commands_that_choose_the_default_model_say_so(tmp_path, eurosat, capsys):
    assert finetune_main([*TINY, "--episodes", "1", "--data-root", str(eurosat), "--out", str(tmp_path / "r")]) == 0
    assert "model: cdfsl-synth-vit / synthetic, the embedded toy CLIP" in capsys.readouterr().err


# ------------------------------------------------------------------ 6. one spelling; states and a merged checkpoint
def test_random_weights_are_spelled_none_everywhere(tmp_path):
    from analysis.cka import build_parser as cka_parser
    from analysis.study import Study
    from cdfsl_core.cli import pretrained_value

    assert [pretrained_value(v) for v in ("none", "None", None, "openai")] == [None, None, None, "openai"]
    assert cka_parser().parse_args(["--pretrained", "none"]).pretrained == "none"
    assert Study.create(tmp_path / "s", pretrained="none").model.pretrained is None
    grid = tmp_path / "grid.toml"
    grid.write_text('pretrained = "none"\n')
    assert load_grid(grid).pretrained is None


def test_export_merged_writes_a_checkpoint_of_the_fine_tuned_model(tmp_path, eurosat, capsys):
    import torch

    merged = tmp_path / "merged.safetensors"
    assert finetune_main([*TINY[:-2], "--model", "cdfsl-test-vit", "--pretrained", "none", "--steps", "3",
                          "--episodes", "1", "--data-root", str(eurosat), "--out", str(tmp_path / "r"),
                          "--export-merged", str(merged)]) == 0
    assert (tmp_path / "r" / "states" / "episode_0000.safetensors").exists()
    torch.manual_seed(0)  # the run's random weights (seed 0)
    pretrained = load_clip("cdfsl-test-vit").model.state_dict()
    tuned = load_clip("cdfsl-test-vit", merged).model.state_dict()
    changed = [k for k in pretrained if not torch.equal(pretrained[k], tuned[k])]
    assert changed and all("attn.in_proj_weight" in k for k in changed)  # LoRA on q, k, v only


def test_a_study_folder_where_nothing_finished_accepts_other_settings(tmp_path):
    from analysis.study import Study

    first = Study.create(tmp_path / "s", episodes=1, steps=1)
    first.check_folder()
    second = Study.create(tmp_path / "s", episodes=2, steps=1)
    second.check_folder()  # nothing finished: accepted
    assert json.loads((tmp_path / "s" / "study.json").read_text())["grid"]["episodes"] == 2
    (tmp_path / "s" / "accuracy_table.csv").write_text("a\n1\n")  # now something finished
    with pytest.raises(ConfigError, match="holds a study with other settings"):
        Study.create(tmp_path / "s", episodes=3, steps=1).check_folder()
