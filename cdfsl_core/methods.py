"""Methods as two orthogonal choices: an adaptation and a token intervention.

=============  ==============================================================================
adaptation     ``zeroshot`` (nothing trains), ``lora`` (LoRA on q, k, v of both towers),
               ``coop`` (learnable prompt context), ``coop+lora``
intervention   ``none``, ``atha`` (adaptive tail-head alignment), ``tir`` (token re-weighting);
               registered beside them: ``test-time-register``, ``tir+test-time-register``
=============  ==============================================================================

The papers' methods are ``coop+lora`` with ``atha`` or ``tir``; the usual baseline is ``lora`` or
``coop+lora`` with ``none``. ``create_method(bundle, class_names, adaptation=..., intervention=...)``
returns a :class:`FewShotCLIP`, an ``nn.Module`` mapping preprocessed images to logits
``[batch, n_classes]``. Before any training step it computes what the zero-shot model computes
(LoRA's B is zero; the CoOp context is the embedding of "a photo of a"), scaled by the logit
scale.

Methods built on one loaded model are independent: each owns its LoRA adapters
(:class:`~cdfsl_core.lora.LoRAAdapters`, installed only during its own forwards), its CoOp context,
its intervention and its parameters; the frozen weights are shared, never copied. Any sequence of
``create_method`` calls on one bundle works, and building, training or deleting one method never
changes another's logits. :meth:`FewShotCLIP.set_classes` and :meth:`FewShotCLIP.reset_parameters`
prepare the next episode without reloading anything.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cdfsl_core.config import MethodConfig
from cdfsl_core.errors import ConfigError
from cdfsl_core.interventions import Intervention, build_intervention, list_interventions
from cdfsl_core.lora import LoRAAdapters
from cdfsl_core.models import ClipBundle
from cdfsl_core.names import ADAPTATIONS, INTERVENTIONS, adaptation
from cdfsl_core.text import PromptLearner, encode_text_embeddings
from cdfsl_core.towers import text_tower, vision_tower

__all__ = ["ADAPTATIONS", "INTERVENTIONS", "FewShotCLIP", "MethodConfig", "create_method", "list_methods"]



def list_methods() -> list[str]:
    """Every ``adaptation/intervention`` pair, e.g. ``coop+lora/tir`` (registered interventions included)."""
    return [f"{a}/{i}" for a in ADAPTATIONS for i in list_interventions()]


class FewShotCLIP(nn.Module):
    """CLIP with an adaptation and an intervention: ``forward(images) -> logits``."""

    def __init__(self, bundle: ClipBundle, class_names: Sequence[str], config: MethodConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.uses_lora = adaptation(config.adaptation).lora
        self.uses_coop = adaptation(config.adaptation).coop
        # this method's own adapters over the shared frozen weights, installed only in its forwards
        self.lora = LoRAAdapters(self.model, config.lora) if self.uses_lora else None
        n_text = text_tower(self.model).n_blocks
        self.readout_block = config.text_readout_block if config.text_readout_block is not None else n_text - 2
        self.intervention: Intervention = build_intervention(
            config.intervention, vision_tower(self.model).n_blocks, config.intervention_config)
        self.intervention.to(self.model.logit_scale.device)
        self.intervention.bind(bundle)  # statistics of the model itself (a test-time register's neurons)
        if config.logit_scale == "learned":
            self.log_scale = nn.Parameter(self.model.logit_scale.detach().clone())
        else:
            self.register_buffer("log_scale", torch.tensor(float(config.logit_scale), device=self.model.logit_scale.device).log())
        self.prompts: PromptLearner
        self.set_classes(class_names)

    # -------------------------------------------------------------- episode life cycle
    def set_classes(self, class_names: Sequence[str]) -> None:
        """New class prompts (a new episode); the CoOp context starts again from its init."""
        if len(class_names) < 2:
            raise ConfigError(f"Need at least 2 class names; got {list(class_names)}.")
        self.class_names = list(class_names)
        self.prompts = PromptLearner(
            self.model, self.tokenizer, self.class_names, self.config.template, self.config.n_ctx, self.uses_coop
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Back to the initial state: LoRA A re-drawn (from ``generator``) and B zero, context
        and intervention strengths at their initial values, logit scale as loaded."""
        if self.lora is not None:
            self.lora.reset_parameters(generator)
        self.prompts.reset_parameters()
        self.intervention.reset_parameters()
        if isinstance(self.log_scale, nn.Parameter):
            with torch.no_grad():
                self.log_scale.copy_(self.model.logit_scale)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by kind, for the optimisers of the protocol."""
        groups: dict[str, list[nn.Parameter]] = {"lora": [], "context": [], "intervention": [], "scale": []}
        groups["lora"] = list(self.lora.parameters()) if self.lora is not None else []
        if self.uses_coop:
            groups["context"] = [self.prompts.context]
        groups["intervention"] = list(self.intervention.parameters())
        if isinstance(self.log_scale, nn.Parameter):
            groups["scale"] = [self.log_scale]
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What an episode trained (LoRA, CoOp context, intervention strengths, a learned logit
        scale), by parameter name, detached on the CPU: a few kB to MB, enough to rebuild the
        fine-tuned model of an episode without training it again."""
        return {name: p.detach().cpu().contiguous() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state` returned (for the same method and episode classes)."""
        own = {name: p for name, p in self.named_parameters() if p.requires_grad}
        if set(own) != set(state):
            raise ConfigError(f"trainable state does not fit this method: missing {sorted(set(own) - set(state))}, "
                             f"unexpected {sorted(set(state) - set(own))}. Was it saved by another method config?")
        with torch.no_grad():
            for name, p in own.items():
                if p.shape != state[name].shape:
                    raise ConfigError(f"trainable state {name!r} has shape {tuple(state[name].shape)}; "
                                     f"this method expects {tuple(p.shape)}.")
                p.copy_(state[name])

    # -------------------------------------------------------------- forward
    def text_features(self, readout: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(classifier text features, L2-normalised; intervention read-out, as the tower gives it),
        both [C, embed_dim] fp32.

        The read-out is ``ln_final`` of the EOT residual after ``readout_block`` times the text
        projection, **not** normalised: ATHA's class vectors take their scale from it, as in the
        authors' code (:func:`~cdfsl_core.token_text.atha_class_vectors`; TIR only uses cosines).
        It is computed when the intervention needs it, or always with ``readout=True`` (the
        diagnostics compare every model's tokens with the same text features), and is None
        otherwise."""
        needs_readout = self.config.intervention != "none" if readout is None else readout
        with self.adapted():
            final, readouts = encode_text_embeddings(
                self.model, self.prompts.embeddings(), self.prompts.tokens,
                readout_blocks=(self.readout_block,) if needs_readout else (),
            )
        readout = readouts[self.readout_block].float() if needs_readout else None
        return F.normalize(final.float(), dim=-1), readout

    @contextmanager
    def adapted(self) -> Iterator[None]:
        """This method's adapters in the shared model for the forwards inside the block (nothing
        to install without LoRA); a recorder or an attribution entered inside sees them."""
        if self.lora is None:
            yield
            return
        with self.lora.installed():
            yield

    def encode_image(self, images: torch.Tensor, readout: torch.Tensor | None) -> torch.Tensor:
        """L2-normalised image features [batch, embed_dim] with this method's adapters and intervention."""
        with self.adapted(), self.intervention.active(self.model.visual, readout):
            return F.normalize(self.model.encode_image(images).float(), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text, readout = self.text_features()
        image = self.encode_image(images, readout)
        return self.log_scale.exp() * image @ text.T


def create_method(
    bundle: ClipBundle,
    class_names: Sequence[str],
    adaptation: str = "coop+lora",
    intervention: str = "none",
    **settings: Any,
) -> FewShotCLIP:
    """Build a method; ``settings`` are :class:`MethodConfig` fields (``lora=LoRAConfig(...)``,
    ``intervention_config=TIRConfig(...)``, ``logit_scale=2.0``, ...). Any number of methods can
    be built on one bundle, in any order: each owns its adapters and parameters."""
    known = set(MethodConfig.__dataclass_fields__) - {"adaptation", "intervention"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"Unknown method settings {unknown}; expected some of {sorted(known)}.")
    return FewShotCLIP(bundle, class_names, MethodConfig(adaptation, intervention, **settings))
