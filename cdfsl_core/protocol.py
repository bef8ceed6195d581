"""The papers' protocol, in one place: constants, and nothing that imports.

ATHA and TIR (and BSCD-FSL before them) evaluate on 5-way episodes with 15 queries per class,
1 and 5 shots, 800 one-shot and 400 five-shot episodes per target; each episode fine-tunes
CoOp (4 context vectors from "a photo of a") and LoRA (rank 16, alpha 8, dropout 0.25) for 100
full-batch steps (AdamW 2e-4 for LoRA; SGD 2e-3, momentum 0.9, weight decay 5e-4 for the context;
SGD 1e-3 for intervention parameters), with logits s * cos, s = 2 for 1-shot and 4 otherwise, on
images resized to 1.15 x the input size and centre-cropped (docs/concepts/methods.md, The protocol).

The config dataclasses (:mod:`cdfsl_core.config`) take their defaults from these constants, and
its factories (:func:`cdfsl_core.config.run_config`, :func:`cdfsl_core.config.episode_config`)
build every command's, study's, notebook's and benchmark's runs from them, so no protocol number
is written twice (a test checks the source for it). This module imports nothing.
"""

from __future__ import annotations

__all__ = [
    "ATHA_ALPHA_INIT", "ATHA_RHO_HEAD", "ATHA_RHO_TAIL", "CONTEXT_VECTORS", "CPU_BATCH_IMAGES", "CUDA_MEMORY_SHARE", "DEMO_EPISODES", "EPISODE_BATCH", "DEMO_STEPS", "EPISODES", "LOGIT_SCALE", "LOGIT_SCALE_ONE_SHOT", "LORA_ALPHA",
    "LORA_DROPOUT", "LORA_RANK", "LR_CONTEXT", "LR_INTERVENTION", "LR_LORA", "MOMENTUM", "PROMPT", "QUERIES",
    "RESIZE_RATIO", "SHOTS", "STEPS", "TIR_LAMBDA", "TIR_RHO", "WAYS", "WEIGHT_DECAY_CONTEXT", "logit_scale",
]

# episodes
WAYS = 5  # classes per episode
QUERIES = 15  # query images per class
SHOTS = (1, 5)  # support images per class, the two settings reported
EPISODES = {1: 800, 5: 400}  # episodes per target and shot setting (BSCD-FSL uses 600)
# adaptation
PROMPT = "a photo of a {}."  # class prompt; CoOp's context starts from its leading words
CONTEXT_VECTORS = 4  # CoOp context vectors ("a photo of a")
LORA_RANK = 16  # r, on q, k and v of every block of both towers
LORA_ALPHA = 8.0  # scaling alpha / sqrt(r) = 2 (the authors')
LORA_DROPOUT = 0.25  # on the adapter input
# training
STEPS = 100  # full-batch steps on the support set
LR_LORA = 2e-4  # AdamW
LR_CONTEXT = 2e-3  # SGD with MOMENTUM and WEIGHT_DECAY_CONTEXT
MOMENTUM = 0.9
WEIGHT_DECAY_CONTEXT = 5e-4
LR_INTERVENTION = 1e-3  # SGD (ATHA's alpha and beta)
# the methods' own settings (their config dataclasses and the diagnostics read them here)
TIR_RHO = 0.3  # TIR: top-k fraction of the Sum score, k = floor(rho L)
TIR_LAMBDA = 0.5  # TIR: lambda of the weight rule
ATHA_RHO_HEAD = 0.3  # ATHA: head fraction
ATHA_RHO_TAIL = 0.2  # ATHA: tail fraction
ATHA_ALPHA_INIT = 0.8  # ATHA: initial alpha at block n // 2
# evaluation
LOGIT_SCALE_ONE_SHOT = 2.0  # s in s * cos for 1-shot (the authors' code)
LOGIT_SCALE = 4.0  # s for more shots
RESIZE_RATIO = 1.15  # resize the short side to ratio x the input size, then centre-crop

# how many episodes train together in one forward by default (`--episode-batch auto`); results do
# not depend on it. On the CPU (benchmarks/bench_episode_batch.py) batching pays while a step's batch
# is small: at most EPISODE_BATCH["cpu"] episodes and CPU_BATCH_IMAGES support images together
# (1-shot: 8 episodes, 1.66x; 5-shot: 1, as 4 gave only 1.07x). CUDA: as many episodes as fit in
# CUDA_MEMORY_SHARE of the device's free memory at the measured footprint of one more episode
# (cdfsl_core.episode_batch.episode_footprint), at most EPISODE_BATCH["cuda"]; make gpu-check
# measures which E is fastest
EPISODE_BATCH = {"cpu": 8, "cuda": 256}
CPU_BATCH_IMAGES = 40
CUDA_MEMORY_SHARE = 0.6

# `make demo`: the protocol with fewer episodes and steps, to fit 15 minutes on 2 CPU cores
DEMO_EPISODES = 2  # per target, shot setting and method
DEMO_STEPS = 60  # the protocol's STEPS take the demo over its budget


def logit_scale(shots: int) -> float:
    """The authors' fixed logit scale: 2 for 1-shot, 4 otherwise."""
    return LOGIT_SCALE_ONE_SHOT if shots == 1 else LOGIT_SCALE
