"""E episodes trained as one: their parameters stacked along an episode axis, one forward, one backward.

A few-shot episode is tiny work (a 1-shot step is 5 images and 5 prompts), so a device running one
episode at a time mostly launches small kernels. :class:`EpisodeBatch` takes E methods of one
config on one model, each already reset for its episode (:func:`~cdfsl_core.episode_loop.prepare_episode`),
and trains them together:

- the support images of the E episodes are one batch ``[E * n, 3, H, W]`` and the class prompts one
  text batch ``[E * C, ctx]``; the frozen weights are shared, as ever;
- every trainable parameter is stacked along a leading episode axis: LoRA's A and B (applied
  through batched matrix products, :class:`~cdfsl_core.lora.LoRAAdapters` with ``episodes=E``),
  the CoOp context ``[E, n_ctx, width]``, the intervention's parameters (ATHA's ``[E, blocks]``
  strengths) and a learned logit scale ``[E]``; each episode's tokens are compared with its own
  class texts (``Intervention.active(..., episodes=E)``);
- the loss is the sum of the per-episode losses, so the gradient of episode e's slice is the
  gradient of episode e's own loss; the optimisers (AdamW, SGD with momentum and weight decay)
  act elementwise, so stacked they equal E separate optimisers;
- LoRA's dropout draws each episode's masks from a generator holding the state the global
  generator would hold when that episode trains alone.

So each episode ends with the parameters, logits and accuracy the sequential runner gives it (to
float rounding: batched products sum in another order), and its line is the same: a run may be
resumed with another E. A non-finite loss stops that episode only (its parameters as they were at
that step, as alone), and the others go on.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cdfsl_core.config import TrainConfig
from cdfsl_core.errors import ConfigError
from cdfsl_core.lora import LoRAAdapters
from cdfsl_core.methods import FewShotCLIP
from cdfsl_core.text import encode_text_embeddings
from cdfsl_core.towers import vision_tower
from cdfsl_core.zeroshot import autocast_for

__all__ = ["EpisodeBatch", "NonFiniteLoss", "batchable", "check_labels", "episode_footprint", "episodes_that_fit",
           "generator_like_global", "protocol_optimisers", "train_batch"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite during an episode."""


def check_labels(method: FewShotCLIP, labels: torch.Tensor) -> None:
    """The episode's labels must index the method's classes."""
    n_way = int(labels.max().item()) + 1 if len(labels) else 0
    if n_way != len(method.class_names):
        raise ValueError(
            f"The method has {len(method.class_names)} class names {method.class_names}, but the "
            f"episode's labels are 0..{n_way - 1} ({n_way}-way). Pass one name per episode class."
        )


def protocol_optimisers(groups: dict[str, list[nn.Parameter]], train: TrainConfig) -> list[torch.optim.Optimizer]:
    """The protocol's optimisers for parameters grouped as :meth:`FewShotCLIP.parameter_groups`
    groups them: AdamW for LoRA (and a learned logit scale), SGD with momentum and weight decay for
    the CoOp context, plain SGD for the intervention's parameters. Every rule acts elementwise, so
    on parameters stacked along an episode axis they equal one optimiser per episode. On CUDA they
    are fused (one kernel per step, step counters on the device: nothing read back per step); on
    the CPU they are torch's defaults, with which every committed result was measured."""
    params = [p for group in groups.values() for p in group]
    fused = {"fused": True} if params and params[0].device.type == "cuda" else {}
    optimisers: list[torch.optim.Optimizer] = []
    if groups["lora"] or groups["scale"]:
        optimisers.append(torch.optim.AdamW(groups["lora"] + groups["scale"], lr=train.lr_lora, **fused))
    if groups["context"]:
        optimisers.append(torch.optim.SGD(groups["context"], lr=train.lr_context, momentum=train.momentum,
                                          weight_decay=train.weight_decay_context, **fused))
    if groups["intervention"]:
        optimisers.append(torch.optim.SGD(groups["intervention"], lr=train.lr_intervention, **fused))
    return optimisers


def batchable(method: FewShotCLIP) -> str | None:
    """Why ``method`` cannot be trained in an episode batch, or None when it can."""
    if not method.intervention.supports_episode_batch:
        return f"intervention {method.config.intervention!r} does not edit several episodes at once"
    tower = vision_tower(method.model)
    for block in tower.blocks:
        if tower.attention_dropout(block):
            return "the model's attention has dropout (its masks would not be each episode's own)"
    return None


def generator_like_global(device: torch.device) -> torch.Generator:
    """A generator in the state of the global generator of ``device`` (what dropout on that device
    draws from), for an episode whose global state is about to be overwritten by the next one's seed."""
    generator = torch.Generator(device=device)
    if device.type == "cuda":
        generator.set_state(torch.cuda.get_rng_state(device))
    else:
        generator.set_state(torch.get_rng_state())
    return generator


class EpisodeBatch(nn.Module):
    """E methods of one config on one model, trained as one: ``forward(images [E * n, 3, H, W]) ->
    logits [E, n, C]``. The methods keep their own parameters; :meth:`load` copies them into the
    stacked ones and :meth:`store` copies slices back."""

    def __init__(self, methods: Sequence[FewShotCLIP], generators: Sequence[torch.Generator] | None = None) -> None:
        super().__init__()
        if not methods:
            raise ConfigError("an episode batch needs at least one method.")
        first = methods[0]
        for method in methods[1:]:
            if method.model is not first.model or method.config != first.config:
                raise ConfigError("the methods of an episode batch must share one model and one config.")
            if len(method.class_names) != len(first.class_names):
                raise ConfigError("the episodes of a batch must have the same number of classes "
                                  f"({len(first.class_names)} and {len(method.class_names)}).")
        reason = batchable(first)
        if reason is not None:
            raise ConfigError(f"cannot train episodes together: {reason}; use an episode batch of 1.")
        object.__setattr__(self, "methods", list(methods))  # not submodules: their parameters are not ours
        object.__setattr__(self, "model", first.model)
        self.episodes = len(methods)
        episodes = self.episodes
        self.n_classes = len(first.class_names)
        self.readout_block = first.readout_block
        # the stacked parameters, by the methods' own parameter names
        self.lora = LoRAAdapters(first.model, first.config.lora, episodes) if first.lora is not None else None
        if self.lora is not None:
            self.lora.set_generators(list(generators) if generators is not None else None)
        stacked: dict[str, nn.Parameter] = {}
        if self.lora is not None:
            stacked.update({f"lora.{name}": p for name, p in self.lora.named_parameters()})
        own = dict(first.named_parameters())
        if first.uses_coop:
            self.context = nn.Parameter(torch.zeros(episodes, *first.prompts.context.shape,
                                                    device=first.prompts.context.device))
            stacked["prompts.context"] = self.context
        self.intervention_params = nn.ParameterDict()
        for name, p in first.intervention.named_parameters():
            self.intervention_params[name] = nn.Parameter(torch.zeros(episodes, *p.shape, device=p.device))
            stacked[f"intervention.{name}"] = self.intervention_params[name]
        if isinstance(first.log_scale, nn.Parameter):
            self.log_scale = nn.Parameter(torch.zeros(episodes, device=first.log_scale.device))
            stacked["log_scale"] = self.log_scale
        else:
            self.register_buffer("log_scale", first.log_scale.detach().to(first.model.logit_scale.device).expand(episodes).clone())
        trainable = {name for name, p in own.items() if p.requires_grad}
        if set(stacked) != trainable:
            raise ConfigError(f"episode batch: cannot stack the method's parameters {sorted(trainable ^ set(stacked))}.")
        self._stacked = stacked
        # the text side of every episode, concatenated: prompts [E * C, ...]
        self.register_buffer("tokens", torch.cat([m.prompts.tokens for m in methods]), persistent=False)
        self.register_buffer("prefix", torch.cat([m.prompts.prefix for m in methods]), persistent=False)
        self.register_buffer("suffix", torch.cat([m.prompts.suffix for m in methods]), persistent=False)
        self.load()

    def train(self, mode: bool = True) -> "EpisodeBatch":
        """Train mode for the stacked adapters and the shared model, as ``method.train()`` sets them."""
        super().train(mode)
        self.model.train(mode)
        return self

    # -------------------------------------------------------------- the methods' parameters
    @torch.no_grad()
    def load(self) -> None:
        """Copy every method's trainable parameters into its slice."""
        for e, method in enumerate(self.methods):
            own = dict(method.named_parameters())
            for name, p in self._stacked.items():
                p[e].copy_(own[name])

    @torch.no_grad()
    def store(self, episode: int) -> None:
        """Copy slice ``episode`` back into its method."""
        own = dict(self.methods[episode].named_parameters())
        for name, p in self._stacked.items():
            own[name].copy_(p[episode])

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The stacked parameters by kind, as :meth:`FewShotCLIP.parameter_groups` groups one method's."""
        names = {id(p): name for name, p in self.methods[0].named_parameters()}
        return {kind: [self._stacked[names[id(p)]] for p in params]
                for kind, params in self.methods[0].parameter_groups().items()}

    # -------------------------------------------------------------- forward
    def text_features(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every episode's classifier text features [E, C, embed_dim] (L2-normalised) and, when the
        intervention needs it, its read-out [E, C, embed_dim]: :meth:`FewShotCLIP.text_features`
        for E episodes in one text forward."""
        first = self.methods[0]
        if first.uses_coop:
            context = self.context.unsqueeze(1).expand(-1, self.n_classes, -1, -1).flatten(0, 1)
            embeddings = torch.cat([self.prefix, context, self.suffix], dim=1)
        else:
            embeddings = torch.cat([self.prefix, self.suffix], dim=1)
        needs_readout = first.config.intervention != "none"
        with self.adapted():
            final, readouts = encode_text_embeddings(self.model, embeddings, self.tokens,
                                                     readout_blocks=(self.readout_block,) if needs_readout else ())
        text = F.normalize(final.float(), dim=-1).reshape(self.episodes, self.n_classes, -1)
        readout = readouts[self.readout_block].float().reshape(text.shape) if needs_readout else None
        return text, readout

    def adapted(self):
        """The stacked adapters in the shared model (as :meth:`FewShotCLIP.adapted`)."""
        return self.lora.installed() if self.lora is not None else nullcontext()

    def encode_image(self, images: torch.Tensor, readout: torch.Tensor | None) -> torch.Tensor:
        """L2-normalised image features [E, n, embed_dim] of ``images`` [E * n, 3, H, W], part e by episode e."""
        with self.image_side(readout):
            return self._features(images)

    def image_side(self, readout: torch.Tensor | None):
        """The stacked adapters and the intervention (with each episode's text read-out ``readout``
        [E, C, dim]) in the shared vision tower, for any number of forwards inside the block: the
        intervention prepares its per-episode state (ATHA's class vectors) once."""
        intervention = self.methods[0].intervention
        text = readout.unsqueeze(1) if readout is not None else None  # [E, 1, C, dim]: one text per episode
        stack = ExitStack()
        stack.enter_context(self.adapted())
        stack.enter_context(intervention.active(self.model.visual, text, self.episodes, dict(self.intervention_params)))
        return stack

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.model.encode_image(images).float(), dim=-1)
        return features.reshape(self.episodes, -1, features.shape[-1])

    @torch.no_grad()
    def evaluate(self, queries: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], batch_size: int,
                 precision: str = "auto", measure: bool = False) -> tuple[list[float], list[dict]]:
        """Every episode's accuracy on its own queries, ``queries[e]`` [n, 3, H, W] with ``labels[e]``
        [n] (the same n for every episode), and, with ``measure``, what the intervention measures of
        its action per episode (:meth:`~cdfsl_core.interventions.base.Intervention.measuring_episodes`,
        ATHA: its edit size per block): what :func:`~cdfsl_core.episode_loop.evaluate` gives each
        method alone inside ``intervention.measuring()``, to float rounding, with the text forward
        of all E episodes done once and their queries forwarded together, ``max(1, images // E)`` of
        each episode's per forward, where ``images`` is ``batch_size`` on a GPU and, on the CPU, no
        more than one episode's queries (``min(batch_size, n)``: there a forward's time per image
        grows with its size, so a larger one is slower, benchmarks/bench_episode_batch.py
        ``--evaluation``). The counts stay on the device until the end. Leaves the batch in eval mode."""
        sizes = {len(x) for x in queries}
        if len(queries) != self.episodes or len(labels) != self.episodes or len(sizes) != 1:
            raise ConfigError(f"batched evaluation needs one query set of the same size per episode; got sizes "
                              f"{[len(x) for x in queries]} for {self.episodes} episodes.")
        intervention = self.methods[0].intervention
        if measure and not intervention.measures_episodes():
            raise ConfigError(f"intervention {intervention.name!r} measures one episode at a time "
                              "(it overrides measuring() but not measuring_episodes()).")
        self.eval()
        images = torch.stack(list(queries))  # [E, n, 3, H, W]
        targets = torch.stack(list(labels))  # [E, n]
        n = images.shape[1]
        images_per_forward = batch_size if images.device.type == "cuda" else min(batch_size, n)
        chunk = max(1, images_per_forward // self.episodes)
        correct = torch.zeros(self.episodes, dtype=torch.long, device=targets.device)
        measuring = intervention.measuring_episodes(self.episodes, dict(self.intervention_params)) if measure \
            else nullcontext([{} for _ in range(self.episodes)])
        with measuring as stats, autocast_for(images.device, precision):
            text, readout = self.text_features()
            with self.image_side(readout):  # ATHA's class vectors solved once for every chunk
                for start in range(0, n, chunk):
                    features = self._features(images[:, start : start + chunk].flatten(0, 1))  # [E, chunk, dim]
                    logits = features @ text.mT
                    correct += (logits.argmax(-1) == targets[:, start : start + chunk]).sum(dim=1)
        return [c / n for c in correct.tolist()], stats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text, readout = self.text_features()
        image = self.encode_image(images, readout)
        return self.log_scale.exp().reshape(-1, 1, 1) * image @ text.mT


def train_batch(
    methods: Sequence[FewShotCLIP], images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], train: TrainConfig,
    precision: str = "auto", generators: Sequence[torch.Generator] | None = None,
    at_step: Sequence[Callable[[int], None] | None] | None = None, batch: EpisodeBatch | None = None,
) -> list[dict[str, Any] | NonFiniteLoss]:
    """:func:`~cdfsl_core.episode_loop.train_episode` for E episodes at once: method e on
    ``images[e]`` [n, 3, H, W] and ``labels[e]`` [n] (the same n for every episode), its dropout from
    ``generators[e]``. Returns, per episode, what ``train_episode`` returns, or the
    :class:`NonFiniteLoss` it would raise; each method ends with its own
    trained parameters. ``at_step[e](s)`` is called as ``train_episode`` calls it, with method e
    holding its parameters after s steps, in eval mode. ``batch``: the methods' episode batch when
    the caller built it (to evaluate with it, :meth:`EpisodeBatch.evaluate`).

    The step loop reads nothing back from the device between trajectory steps: the losses, the
    non-finite checks and the parameters of an episode stopped by a non-finite loss (kept as they
    were at that step) are tensors on the device, read once at the end."""
    episodes = len(methods)
    sizes = {len(x) for x in images}
    if len(sizes) != 1 or len(images) != episodes or len(labels) != episodes:
        raise ConfigError(f"an episode batch needs one support set of the same size per method; got sizes "
                          f"{[len(x) for x in images]} for {episodes} methods.")
    for method, y in zip(methods, labels):
        check_labels(method, y)
    at_step = list(at_step) if at_step is not None else [None] * episodes
    wanted = set(train.trajectory_steps)
    if batch is None:
        batch = EpisodeBatch(methods, generators)
    elif list(batch.methods) != list(methods):
        raise ConfigError("train_batch: the episode batch holds other methods than the ones given.")
    groups = batch.parameter_groups()
    optimisers = protocol_optimisers(groups, train)
    if not optimisers or train.steps == 0:
        for method, probe in zip(methods, at_step):
            if probe is not None and 0 in wanted:
                method.eval()
                probe(0)
        return [{"steps": 0, "loss_first": None, "loss_last": None} for _ in methods]

    all_images = torch.cat(list(images))
    all_labels = torch.stack(list(labels))  # [E, n]
    loop = _StepState(episodes, [p for group in groups.values() for p in group], all_images.device)

    def measure(step: int) -> None:
        if step not in wanted or not any(probe is not None for probe in at_step):
            return
        stopped = loop.stopped_slices()  # a host read, at a trajectory step only
        for e in range(episodes):
            if at_step[e] is not None and e not in stopped:
                batch.store(e)
                methods[e].eval()
                at_step[e](step)
        batch.train()  # the probes left the shared model in eval mode

    batch.train()
    try:
        for step in range(train.steps):
            measure(step)
            with autocast_for(all_images.device, precision):
                logits = batch(all_images)  # [E, n, C]
            losses = F.cross_entropy(logits.float().flatten(0, 1), all_labels.flatten(), reduction="none")
            losses = loop.record(step, losses.reshape(episodes, -1).mean(dim=1))
            for optimiser in optimisers:
                optimiser.zero_grad(set_to_none=True)
            losses.sum().backward()
            loop.mask_gradients()
            for optimiser in optimisers:
                optimiser.step()
        measure(train.steps)
    finally:
        batch.eval()
    return loop.finish(batch, methods, train.steps)


class _StepState:
    """The per-episode bookkeeping of :func:`train_batch`, on the device: which episodes still
    train, their first and last loss, and, for an episode stopped by a non-finite loss, the step,
    the loss and its parameters as they were then."""

    def __init__(self, episodes: int, parameters: list[nn.Parameter], device: torch.device) -> None:
        self.parameters = parameters
        self.running = torch.ones(episodes, dtype=torch.bool, device=device)
        self.first = torch.full((episodes,), math.nan, device=device)
        self.last = torch.full((episodes,), math.nan, device=device)
        self.stop_step = torch.full((episodes,), -1, dtype=torch.long, device=device)
        self.stop_value = torch.zeros(episodes, device=device)
        self.kept = [p.detach().clone() for p in parameters]  # a stopped episode's slice as it stopped

    def _mask(self, mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return mask.reshape(-1, *(1,) * (p.dim() - 1))

    def record(self, step: int, losses: torch.Tensor) -> torch.Tensor:
        """Take step ``step``'s per-episode losses [E]; the losses to back-propagate (zero for every
        stopped episode, so no gradient reaches its slice)."""
        with torch.no_grad():
            stops = self.running & ~torch.isfinite(losses)
            self.stop_step.masked_fill_(stops, step)
            self.stop_value = torch.where(stops, losses.detach(), self.stop_value)
            for p, kept in zip(self.parameters, self.kept):  # the parameters after `step` steps, as alone
                kept.copy_(torch.where(self._mask(stops, p), p, kept))
            self.running &= ~stops
            if step == 0:
                self.first = torch.where(self.running, losses.detach(), self.first)
            self.last = torch.where(self.running, losses.detach(), self.last)
        return torch.where(self.running, losses, 0)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """A stopped episode's slice stays finite: its gradients are zeroed (not multiplied: NaN x 0)."""
        for p in self.parameters:
            if p.grad is not None:
                p.grad.copy_(torch.where(self._mask(self.running, p.grad), p.grad, 0))

    def stopped_slices(self) -> set[int]:
        return {e for e, on in enumerate(self.running.tolist()) if not on}

    @torch.no_grad()
    def finish(self, batch: EpisodeBatch, methods: Sequence[FewShotCLIP], steps: int,
               ) -> list[dict[str, Any] | NonFiniteLoss]:
        """Every method's parameters back from the batch (a stopped one's as it stopped), and what
        each episode's training returns."""
        running = self.running.tolist()
        stop_step, stop_value = self.stop_step.tolist(), self.stop_value.tolist()
        first, last = self.first.tolist(), self.last.tolist()
        stopped = [e for e, on in enumerate(running) if not on]
        if stopped:
            for p, kept in zip(self.parameters, self.kept):
                p[stopped] = kept[stopped]
        for e in range(len(methods)):
            batch.store(e)
            methods[e].eval()
        return [{"steps": steps, "loss_first": first[e], "loss_last": last[e]} if running[e] else
                NonFiniteLoss(f"loss is {stop_value[e]} at step {stop_step[e]} of {steps}") for e in range(len(methods))]


def episodes_that_fit(free_bytes: int, per_episode_bytes: int, share: float | None = None,
                      limit: int | None = None) -> int:
    """How many episodes to train together on a device with ``free_bytes`` free: as many as
    ``share`` of it holds at ``per_episode_bytes`` each (:func:`episode_footprint`), from 1 to
    ``limit`` (defaults: ``protocol.CUDA_MEMORY_SHARE`` and ``protocol.EPISODE_BATCH["cuda"]``)."""
    from cdfsl_core import protocol

    share = protocol.CUDA_MEMORY_SHARE if share is None else share
    limit = protocol.EPISODE_BATCH["cuda"] if limit is None else limit
    if per_episode_bytes <= 0:
        return limit
    return max(1, min(limit, int(share * free_bytes // per_episode_bytes)))


def episode_footprint(methods: Sequence[FewShotCLIP], images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                      precision: str = "auto") -> int:
    """Bytes one more episode adds to a training step of an episode batch: one step (forward and
    backward) of the first method alone and of the first two together (``methods``: two prepared
    episodes of one config, ``images``/``labels`` their support sets), the difference of the two.
    On CUDA, of the peak allocated memory; elsewhere, of the bytes autograd saves for the backward
    (each storage counted once), which is what grows with E. Leaves the methods' parameters as
    they were (no optimiser step)."""
    if len(methods) < 2:
        raise ConfigError("episode_footprint needs two prepared episodes.")
    device = images[0].device

    def step_bytes(count: int) -> int:
        batch = EpisodeBatch(methods[:count]).train()
        support = torch.cat(list(images[:count]))
        targets = torch.stack(list(labels[:count])).flatten()
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast_for(device, precision):
                logits = batch(support)
            F.cross_entropy(logits.float().flatten(0, 1), targets).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                return torch.cuda.max_memory_allocated(device) - base
            return sum(seen.values())
        finally:
            batch.eval()
            for method in methods[:count]:
                method.eval()
                method.zero_grad(set_to_none=True)

    return max(0, step_bytes(2) - step_bytes(1))
