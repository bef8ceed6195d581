"""One episode record: the declared line (``EpisodeLine``) that every run writes through one
function, and ``load_episode``, the one way to rebuild an episode's method from a run folder.

Expected values come from the run itself: an episode rebuilt from its saved state, or trained
again, must reproduce the accuracy its line recorded (to the bit, on the CPU); the positive
control rebuilds it without training and must not.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import TINY

from cdfsl_core.episode_loop import evaluate
from cdfsl_core.errors import ConfigError, RunFolderError
from cdfsl_core.models import load_clip
from cdfsl_core.run_folder import EPISODE_LINE_REQUIRED, EpisodeLine, RunFolder, check_episode_line
from cdfsl_core.runner import load_episode, load_run, run

CONFIG = replace(TINY, method=replace(TINY.method, intervention="atha"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run that kept its states and one that did not, of the same config."""
    torch.manual_seed(0)
    bundle = load_clip("cdfsl-test-vit")
    base = tmp_path_factory.mktemp("record")
    run(CONFIG, base / "kept", bundle=bundle, progress=False, save_states=True)
    run(CONFIG, base / "plain", bundle=bundle, progress=False)
    return bundle, base / "kept", base / "plain"


def _accuracy(episode) -> float:
    return evaluate(episode.method, episode.query, episode.query_labels, CONFIG.train.eval_batch_size, "fp32")


@pytest.mark.parametrize("which", ["kept", "plain"])
def test_a_rebuilt_episode_reproduces_its_recorded_accuracy(runs, which):
    bundle, kept, plain = runs
    folder = kept if which == "kept" else plain
    finished = RunFolder(folder).finished()
    loaded = load_run(folder, bundle)
    for index in range(CONFIG.episodes.n_episodes):
        episode = load_episode(folder, index, loaded=loaded)
        assert _accuracy(episode) == finished[index]["accuracy_init"]
        source = episode.fine_tune()
        assert source == ("saved state" if which == "kept" else "re-trained")
        assert _accuracy(episode) == finished[index]["accuracy"]


def test_positive_control_an_untrained_method_does_not_reproduce_the_trained_accuracy(runs):
    """The comparison above can fail: the initial method's logits are not the trained ones."""
    bundle, kept, _ = runs
    untrained, trained = load_episode(kept, 0, bundle), load_episode(kept, 0, bundle)
    trained.fine_tune()
    with torch.no_grad():
        assert not torch.allclose(untrained.method(untrained.query), trained.method(trained.query), atol=1e-4)


def test_missing_states_and_episodes_are_named(runs):
    bundle, _, plain = runs
    with pytest.raises(RunFolderError, match="--save-states"):
        load_episode(plain, 0, bundle).fine_tune(retrain=False)
    for bad in (-1, CONFIG.episodes.n_episodes, True, "0"):
        with pytest.raises(ConfigError, match="out of range"):
            load_episode(plain, bad, bundle)


def test_every_written_line_is_declared(runs):
    """The lines of a run (ATHA: intervention statistics and log) pass the declaration, and the
    declaration lists every field they carry."""
    _, kept, _ = runs
    lines, torn = RunFolder(kept).lines()
    assert not torn and len(lines) == CONFIG.episodes.n_episodes
    for line in lines:
        check_episode_line(line)
        assert set(EPISODE_LINE_REQUIRED) <= set(line) <= set(EpisodeLine.__annotations__)
        assert {"intervention_stats", "intervention_log"} <= set(line)


def test_the_writer_refuses_an_undeclared_or_incomplete_line(tmp_path, runs):
    _, kept, _ = runs
    line = RunFolder(kept).lines()[0][0]
    folder = RunFolder(tmp_path)
    with pytest.raises(ValueError, match="undeclared \\['accuracy_top5'\\]"):
        folder.append(line["episode"], {**line, "accuracy_top5": 0.9})
    incomplete = {key: value for key, value in line.items() if key != "weights"}
    with pytest.raises(ValueError, match="missing \\['weights'\\]"):
        folder.append(line["episode"], incomplete)
    with pytest.raises(ValueError, match="status 'done'"):
        folder.append(line["episode"], {**line, "status": "done"})
    with pytest.raises(ValueError, match="appended as episode 7"):
        folder.append(7, line)
    assert not folder.results.exists()  # nothing was written
    assert folder.append(line["episode"], line) and json.loads(folder.results.read_text()) == line
