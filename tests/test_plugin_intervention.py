"""A third intervention plugs in from this file alone: registered here, it runs through the
runner (trained, logged, measured, resumed from config.json), the diagnostics, the study's tables
and a figure, with no special case anywhere in the library."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
from helpers import TINY
from torch import nn

from analysis import figures
from analysis.config import AnalysisConfig
from analysis.run_diagnostics import diagnose_run
from analysis.study import Study
from cdfsl_core.config import RunConfig
from cdfsl_core.interventions import Intervention, list_interventions, register_intervention, unregister_intervention
from cdfsl_core.methods import MethodConfig, list_methods
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.runner import run


@dataclass(frozen=True)
class NudgeConfig:
    block: int = 1  # before this vision block
    scale_init: float = 0.1  # initial strength


class Nudge(Intervention):
    """Moves every patch token by a learnable multiple of the mean patch token."""

    name = "nudge"
    reported_statistics = ("scale", "shift_norm")

    def __init__(self, n_blocks: int, config: NudgeConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = nn.Parameter(torch.tensor(config.scale_init))
        self._measured: dict | None = None

    def blocks(self, n_blocks: int) -> list[int]:
        return [self.config.block]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.scale.fill_(self.config.scale_init)

    def edit(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        shift = self.scale * x[:, 1:].mean(dim=1, keepdim=True)
        if self._measured is not None:
            self._measured[block] = {"scale": float(self.scale.detach()), "shift_norm": float(shift.norm(dim=-1).mean())}
        return torch.cat([x[:, :1], x[:, 1:] + shift], dim=1)

    def episode_log(self) -> dict:
        return {"scale": round(float(self.scale.detach()), 6)}

    @contextmanager
    def measuring(self):
        self._measured = {}
        try:
            yield self._measured
        finally:
            self._measured = None


@pytest.fixture
def nudge():
    register_intervention("nudge", Nudge, NudgeConfig, "a toy intervention of a test")
    yield
    unregister_intervention("nudge")


def test_a_registered_intervention_runs_through_the_runner_the_diagnostics_and_the_tables(tmp_path, nudge):
    assert "nudge" in list_interventions() and "coop/nudge" in list_methods()
    config = replace(TINY, method=MethodConfig("coop", "nudge", intervention_config=NudgeConfig(scale_init=0.2)))
    run(config, tmp_path / "run", progress=False)
    rows = RunFolder(tmp_path / "run").lines()[0]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0]["intervention_stats"]["init"]["1"]["scale"] == pytest.approx(0.2)
    assert rows[0]["intervention_log"]["scale"] != 0.2  # trained by the protocol's intervention optimiser
    saved = RunConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert saved.method.intervention_config == NudgeConfig(scale_init=0.2)  # the config round-trips
    tables = diagnose_run(tmp_path / "run", [0], analysis=AnalysisConfig(attribution_steps=2))
    assert tables["sinks"]["reproduced"].all() and set(tables["norms"]["model"]) == {"pretrained", "fine-tuned coop/nudge"}


def test_a_registered_intervention_gets_its_study_table_and_figure(tmp_path, nudge):
    study = Study.create(tmp_path, targets=("synthetic-crops",), shots=(1,), diagnose_shots=1, episodes=1, steps=2,
                         methods=(("coop", "coop", "none"), ("coop+nudge", "coop", "nudge")), baseline="coop",
                         progress=False)
    table = study.intervention_stats()
    assert set(table["intervention"]) == {"nudge"} and set(table["stage"]) == {"init", "trained"}
    assert table["setting_scale_init"].eq(0.1).all()
    figure = figures.intervention_strengths(table, Nudge.reported_statistics, "nudge")
    assert [ax.get_title() for ax in figure.axes] == ["scale", "shift_norm"]


def test_an_intervention_that_edits_one_episode_at_a_time_runs_them_in_turn(nudge, tmp_path):
    """Nudge does not say it supports episode batches: asked to train 3 episodes together, the runner
    trains them one after another (each with the dropout state it has alone), with the same lines."""
    config = replace(TINY, method=MethodConfig("coop+lora", "nudge"))
    run(config, tmp_path / "one", progress=False)
    run(config, tmp_path / "three", progress=False, episode_batch=3)
    one, three = (RunFolder(tmp_path / name).lines()[0]
                  for name in ("one", "three"))
    assert len(one) == len(three) == TINY.episodes.n_episodes
    for a, b in zip(one, three):
        assert a["accuracy"] == b["accuracy"] and a["intervention_log"] == b["intervention_log"]
        assert a["loss_last"] == b["loss_last"]
