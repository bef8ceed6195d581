"""A fine-tuned episode of a run as an ordinary CLIP checkpoint (``finetune --export-merged``).

The episode's LoRA adapters, kept by ``--save-states``, are folded into the attention weights
(:meth:`cdfsl_core.lora.LoRAAdapters.merged_state_dict`), so the file loads with ``load_clip`` like
any open_clip checkpoint and can be compared with the pretrained model (``analysis.cka
--compare-with FILE``). What is not a weight of CLIP stays out: a CoOp context (a prompt, not a
weight) and an intervention's parameters (ATHA's strengths) are kept only in the run's states.
"""

from __future__ import annotations

import os
from pathlib import Path

from cdfsl_core.errors import ConfigError

__all__ = ["export_merged"]


def export_merged(run: str | os.PathLike[str], episode: int, path: str | os.PathLike[str]) -> Path:
    """Write the fine-tuned model of ``episode`` of the run folder ``run`` to ``path``
    (``.safetensors``, fp32); returns the path."""
    from cdfsl_core.models import save_checkpoint
    from cdfsl_core.runner import load_episode, load_run

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"--export-merged {path}: expected a .safetensors file name.")
    loaded = load_run(run)
    config, bundle, _, episodes = loaded
    if not 0 <= episode < len(episodes):
        raise ConfigError(f"--export-merged-episode {episode}: the run has episodes 0..{len(episodes) - 1}.")
    rebuilt = load_episode(run, episode, loaded=loaded)
    rebuilt.fine_tune(retrain=False)  # the kept state, or an error saying how to keep it
    method = rebuilt.method
    if method.lora is None:
        raise ConfigError(f"{run} trains no LoRA ({config.method.adaptation}); its CLIP weights are the pretrained "
                          "ones, so there is nothing to merge.")
    merged = method.lora.merged_state_dict(bundle.model)

    class _State:  # save_checkpoint takes a module; the merged weights are a plain state dict
        def state_dict(self):
            return merged

    return save_checkpoint(_State(), path)  # type: ignore[arg-type]
