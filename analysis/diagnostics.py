"""Token diagnostics that stream: accumulate batch by batch, memory independent of the image count.

:class:`TokenDiagnostics` consumes the recorder's cache after each batch and keeps, per layer,
fixed-size statistics:

- **token norms** of patch tokens after the block, by Sum bucket (TIR's m_j in 0..N): count,
  mean and standard deviation, in the residual or the projected space (``ln_post(x) P``), with
  no transform or a natural log; both settings are written into every row;
- **sink-token counts** per image under named definitions, each with its threshold:
  ``sum-all`` (m_j = N, TIR's simple tokens), ``high-norm`` (norm above tau x the image's median
  patch norm, "Vision Transformers Need Registers"), ``attention-mass`` (a token receiving more
  than tau x the uniform share 1/T of attention, from CLS or averaged over queries, averaged
  over heads), ``massive-activation`` (some channel above tau x the median absolute activation
  of the image's patch tokens, the median estimated on every 8th channel);
- **head/tail similarity**: a histogram of m_j = max_c cos(x_j, u~_c) (ATHA's class vectors in
  the residual space, from :func:`~cdfsl_core.token_text.atha_class_vectors`, the function the
  intervention calls, with the same ``text_norm``) with the mean head and tail cut points (the
  similarity of the floor(rho_head L)-th largest and the floor(rho_tail L)-th smallest token).

``tables(**labels)`` returns tidy pandas tables (one row per layer and bucket, definition or
bin), labelled with model, dataset, episode and the definition used.

Without class text (``text=None``: a vision-only model such as DINOv2 with registers, or a tower
loaded without a tokenizer) the Sum score, the ``sum-all`` definition and the head/tail
histogram are skipped (``skipped`` says which and why); norms are then over all patch tokens
(``bucket`` empty) and the other sink definitions are counted as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from analysis.config import SPACES, TRANSFORMS, AnalysisConfig
from analysis.keys import act_name
from analysis.recorder import ActivationCache, record
from analysis.sinks import SinkDefinition, SinkInputs, row_median, sink_spec
from cdfsl_core.errors import ConfigError
from cdfsl_core.token_text import atha_class_vectors, project_tokens, sum_score
from cdfsl_core.towers import vision_tower

__all__ = ["ModelView", "SinkDefinition", "TokenDiagnostics", "measure_tokens", "model_view"]

_row_median = row_median  # the tests' name


def __getattr__(name: str) -> Any:
    if name == "SINK_DEFINITIONS":  # the registered definitions with their default thresholds, now
        return {sink.name: sink for sink in AnalysisConfig().sinks()}
    raise AttributeError(name)


@dataclass
class TokenDiagnostics:
    """Streaming token statistics over the recorded layers."""

    visual: Any  # the vision tower (a module or its adapter, cdfsl_core.towers)
    text: torch.Tensor | None  # [C, embed_dim] the text read-out the interventions use, as the tower gives it
    # (not normalised); None for a vision-only model: what needs class text is skipped (``skipped``)
    layers: Sequence[int]
    rho: float = AnalysisConfig.rho  # TIR's top-k fraction for the Sum score
    rho_head: float = AnalysisConfig.rho_head  # ATHA's head fraction
    rho_tail: float = AnalysisConfig.rho_tail  # ATHA's tail fraction
    space: str = AnalysisConfig.space  # token norms in 'residual' or 'projected' space
    transform: str = AnalysisConfig.transform  # 'none' or 'log' of the norm
    sinks: Sequence[SinkDefinition] = field(default_factory=lambda: AnalysisConfig().sinks())
    bins: int = AnalysisConfig.bins  # head/tail histogram bins over [-1, 1]
    head_tail: bool = True  # also the head/tail similarity histogram (False: norms and sinks only, cheaper)
    text_norm: str = "none"  # ATHA's class vectors from the read-out as it is ('none') or normalised ('unit'), as ATHAConfig

    @classmethod
    def from_config(cls, visual: Any, text: torch.Tensor | None, layers: Sequence[int], config: AnalysisConfig,
                    text_norm: str = "none") -> "TokenDiagnostics":
        """The diagnostics an :class:`~analysis.config.AnalysisConfig` describes (``text_norm`` when the
        config leaves it to the method)."""
        return cls(visual, text, layers, rho=config.rho, rho_head=config.rho_head, rho_tail=config.rho_tail,
                   space=config.space, transform=config.transform, sinks=config.sinks(), bins=config.bins,
                   head_tail=config.head_tail, text_norm=config.text_norm or text_norm)

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ConfigError(f"space={self.space!r}; expected one of {SPACES}.")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"transform={self.transform!r}; expected one of {TRANSFORMS}.")
        for sink in self.sinks:
            sink_spec(sink.name)  # a registered definition, or an error listing them
            if sink.name == "attention-mass" and sink.source not in ("cls", "mean"):
                raise ConfigError(f"attention-mass source={sink.source!r}; expected 'cls' or 'mean'.")
        self.tower = vision_tower(self.visual)
        self.skipped: dict[str, str] = {}  # what was not computed, and why (a vision-only model)
        if self.text is None:
            for sink in self.sinks:
                if sink_spec(sink.name).needs_text:
                    self.skipped[f"sink:{sink.name}"] = f"{sink.label()} needs class text (the Sum score)"
            self.sinks = [sink for sink in self.sinks if not sink_spec(sink.name).needs_text]
            if self.head_tail:
                self.skipped["head_tail"] = "the head/tail histogram needs class text (ATHA's class vectors)"
            self.head_tail = False
        self.n_classes = 0 if self.text is None else self.text.shape[0]
        n_layers = len(self.layers)
        buckets = self.n_classes + 1
        self._norm = np.zeros((n_layers, buckets, 3))  # count, sum, sum of squares
        self._sink = np.zeros((n_layers, len(self.sinks), 3))  # images, sum of counts, sum of squares
        self._hist = np.zeros((n_layers, self.bins))
        self._cuts = np.zeros((n_layers, 3))  # images, sum of head cut, sum of tail cut
        if self.text is None:
            self._unit_text = self._vectors = self._unit_vectors = None
            return
        with torch.no_grad():
            self._unit_text = F.normalize(self.text.float(), dim=-1)  # the Sum score ranks cosines
            self._vectors = atha_class_vectors(self.visual, self.text.float(), self.text_norm)
            self._unit_vectors = F.normalize(self._vectors, dim=-1)

    @torch.no_grad()
    def update(self, cache: ActivationCache) -> None:
        """Add one batch from the cache of the last forward.

        Everything is reduced on the device the cache is on, in fp32 whatever the autocast
        context (rankings and counts must not depend on the precision of the forward), and the
        small per-layer statistics move to the host in one transfer per batch."""
        device = cache[act_name("resid_post", self.layers[0])].device
        size = self.n_classes + 1
        parts: list[torch.Tensor] = []
        with torch.autocast(device.type, enabled=False):
            for layer in self.layers:
                # Per-token quantities are computed on the whole contiguous stream and the prefix rows
                # (CLS, registers) are dropped from the small results: slicing first would copy every
                # layer's tokens.
                x = cache[act_name("resid_post", layer)].float()  # [B, prefix + L, D]
                counts, residual_norms, projected_norms = self._scores(x)  # [B, L] each
                norms = projected_norms if self.space == "projected" else residual_norms
                values = (norms.log() if self.transform == "log" else norms).flatten().double()
                flat = counts.flatten()
                parts += [torch.bincount(flat, minlength=size).double(),  # [buckets] x 3: count, sum, sum of squares
                          torch.bincount(flat, weights=values, minlength=size),
                          torch.bincount(flat, weights=values * values, minlength=size)]
                for sink in self.sinks:
                    per_image = self._sink_mask(sink, layer, cache, x, counts, residual_norms).sum(dim=-1).double()
                    parts.append(torch.stack([per_image.new_tensor(per_image.numel()), per_image.sum(),
                                              per_image.pow(2).sum()]))
                if not self.head_tail:
                    continue
                best = (F.linear(x, self._unit_vectors.to(device))[:, self.tower.n_prefix:]
                        / residual_norms.clamp_min(1e-12).unsqueeze(-1)).amax(dim=-1)  # [B, L] max cosine
                length = best.shape[1]
                n_head, n_tail = max(1, int(self.rho_head * length)), max(1, int(self.rho_tail * length))
                head_cut = best.topk(n_head, dim=-1).values[:, -1]  # the n_head-th largest
                tail_cut = best.topk(n_tail, dim=-1, largest=False).values[:, -1]  # the n_tail-th smallest
                parts += [torch.histc(best, bins=self.bins, min=-1.0, max=1.0).double(),
                          torch.stack([best.new_tensor(len(best)), head_cut.sum(), tail_cut.sum()]).double()]
        host = torch.cat(parts).cpu().numpy()  # the one transfer of this batch
        offset = 0

        def take(n: int) -> np.ndarray:
            nonlocal offset
            offset += n
            return host[offset - n:offset]

        for li in range(len(self.layers)):
            self._norm[li] += take(3 * size).reshape(3, size).T
            for si in range(len(self.sinks)):
                self._sink[li, si] += take(3)
            if self.head_tail:
                self._hist[li] += take(self.bins)
                self._cuts[li] += take(3)

    def _sink_mask(self, sink: SinkDefinition, layer: int, cache: ActivationCache, x: torch.Tensor,
                   counts: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Which patch tokens are sinks, [B, L] bool: ``x`` the stream [B, prefix + L, D], ``counts``
        (Sum scores) and ``norms`` per patch [B, L]; the definition's registered mask decides."""
        inputs = SinkInputs(x=x, counts=counts, norms=norms, n_classes=self.n_classes, cache=cache, layer=layer,
                            n_prefix=self.tower.n_prefix, has_cls=self.tower.has_cls)
        return sink_spec(sink.name).mask(inputs, sink)

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum scores (all 0 without text), residual norms and projected norms of the patch tokens
        of ``x`` [B, prefix + L, D], each [B, L]."""
        p = self.tower.n_prefix
        projected = project_tokens(self.tower, x)
        projected_norms = projected.norm(dim=-1)[:, p:]
        if self._unit_text is None:
            return (torch.zeros(projected_norms.shape, dtype=torch.long, device=x.device), x.norm(dim=-1)[:, p:],
                    projected_norms)
        # cosines as products divided by norms: no normalised copy of the tokens
        similarity = F.linear(projected[:, p:], self._unit_text.to(x.device)) / projected_norms.clamp_min(1e-12).unsqueeze(-1)
        return sum_score(similarity, self.rho), x.norm(dim=-1)[:, p:], projected_norms

    @torch.no_grad()
    def sink_masks(self, cache: ActivationCache) -> dict[int, dict[str, torch.Tensor]]:
        """Per recorded layer and definition, which patch tokens of the last forward are sinks:
        ``{layer: {definition: [B, L] bool}}`` (patch index j is token j + n_prefix of the stream). The
        counts of :meth:`update` are these masks summed; the positive controls use them to check
        that the planted token itself is found."""
        result = {}
        for layer in self.layers:
            x = cache[act_name("resid_post", layer)]
            with torch.autocast(x.device.type, enabled=False):
                x = x.float()
                counts, residual_norms, _ = self._scores(x)
                result[layer] = {sink.name: self._sink_mask(sink, layer, cache, x, counts, residual_norms)
                                 for sink in self.sinks}
        return result

    def tables(self, **labels: Any) -> dict[str, pd.DataFrame]:
        """Tidy tables ``norms``, ``sinks`` and (when computed) ``head_tail``; ``labels`` (model, dataset, episode, ...)
        are added as columns to every row."""
        norm_rows, sink_rows, hist_rows = [], [], []
        edges = np.linspace(-1, 1, self.bins + 1)
        for li, layer in enumerate(self.layers):
            for bucket in range(self.n_classes + 1):
                n, s, ss = self._norm[li, bucket]
                mean = s / n if n else np.nan
                std = np.sqrt(max(ss / n - mean**2, 0.0)) if n else np.nan
                norm_rows.append({**labels, "layer": layer, "bucket": bucket if self.text is not None else np.nan,
                                  "count": int(n), "mean": mean, "std": std,
                                  "space": self.space, "transform": self.transform, "rho": self.rho})
            for si, sink in enumerate(self.sinks):
                n, s, ss = self._sink[li, si]
                mean = s / n if n else np.nan
                sink_rows.append({**labels, "layer": layer, "definition": sink.name, "tau": sink.tau,
                                  "label": sink.label(), "images": int(n), "mean_count": mean,
                                  "std_count": np.sqrt(max(ss / n - mean**2, 0.0)) if n else np.nan})
            n_images = self._cuts[li, 0]
            for b in range(self.bins):
                hist_rows.append({**labels, "layer": layer, "bin_left": edges[b], "bin_right": edges[b + 1],
                                  "count": int(self._hist[li, b]),
                                  "head_cut": self._cuts[li, 1] / n_images if n_images else np.nan,
                                  "tail_cut": self._cuts[li, 2] / n_images if n_images else np.nan,
                                  "rho_head": self.rho_head, "rho_tail": self.rho_tail})
        tables = {"norms": pd.DataFrame(norm_rows), "sinks": pd.DataFrame(sink_rows)}
        if self.head_tail:
            tables["head_tail"] = pd.DataFrame(hist_rows)
        return tables


class ModelView(NamedTuple):
    """What the analysis needs of a model: the text read-out the interventions use (None without
    class text), ATHA's ``text_norm``, and the image forward (with the intervention active)."""

    readout: torch.Tensor | None
    text_norm: str
    forward: Callable[[torch.Tensor], Any]


def model_view(method: Any) -> ModelView:
    """A :class:`~cdfsl_core.methods.FewShotCLIP` gives its text read-out and ``encode_image`` with
    it; anything else (a CLIP, a vision tower, a vision-only model such as DINOv2 with registers)
    is measured on its vision side alone: no text, so what needs class text is skipped."""
    if hasattr(method, "text_features"):
        _, readout = method.text_features(readout=True)
        text_norm = getattr(method.config.settings(), "text_norm", "none")
        return ModelView(readout, text_norm, lambda images: method.encode_image(images, readout))
    forward = method.encode_image if hasattr(method, "encode_image") else method
    return ModelView(None, "none", forward)


@torch.no_grad()
def measure_tokens(method: Any, images: torch.Tensor, analysis: AnalysisConfig = AnalysisConfig(),
                   layers: Sequence[int] | None = None, batch_size: int = 64) -> TokenDiagnostics:
    """The token diagnostics of ``method`` (a FewShotCLIP, in eval mode) on ``images``, as
    :func:`analysis.run_diagnostics.diagnose_model` measures them: every model's tokens compared
    with the text read-out the interventions use, in fp32, in batches of ``batch_size``. Any
    other model is measured without text (:func:`model_view`; ``skipped`` says what was left out)."""
    visual = vision_tower(method)
    layers = list(range(visual.n_blocks)) if layers is None else list(layers)
    view = model_view(method)
    diagnostics = TokenDiagnostics.from_config(visual, view.readout, layers, analysis, view.text_norm)
    for start in range(0, len(images), batch_size):
        with record(method, layers=layers) as cache:
            view.forward(images[start:start + batch_size])
        diagnostics.update(cache)
    return diagnostics
