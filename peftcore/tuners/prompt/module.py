"""The module of prompt tuning: :class:`PromptTuning`, the learned virtual token embeddings of a model.

It is added to the model as the child ``peftcore_prompt`` and registers two hooks on the model
(bound methods of itself, so deepcopy and pickling keep working):

* a forward pre-hook, run before any other, that turns ``input_ids`` into ``inputs_embeds``
  through the model's own input embeddings and puts the V virtual embeddings in front; the
  attention mask, ``token_type_ids`` (segment 0), ``position_ids`` and token-level ``labels``
  (-100) get V positions in front as well. The virtual tokens take positions 0..V-1 and the real
  tokens follow them, as if the virtual tokens had been typed;
* a forward hook that marks a returned cache as holding the virtual tokens, so that a call that
  continues it (``generate``, step-by-step decoding) only extends the mask and the positions.

Outputs are the model's own: token-level outputs (LM logits, hidden states) have V extra
positions at the front.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftcore.errors import ConfigError
from peftcore.tuners.prefix import calls

METHOD = "prompt"


class PromptTuning(nn.Module):
    """The virtual token embeddings of one model's prompt adapters, ``embeddings[name]: (V, hidden)``."""

    def __init__(self, is_encoder_decoder: bool = False):
        super().__init__()
        self.embeddings = nn.ParameterDict()
        self.is_encoder_decoder = is_encoder_decoder
        self.active: str | None = None
        self.enabled = True

    def running(self) -> str | None:
        """The adapter whose virtual tokens go in front now, or None."""
        return self.active if self.enabled and self.active in self.embeddings else None

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Forward pre-hook of the model: virtual embeddings in front of the input."""
        running = self.running()
        call = calls.as_keywords(module, args, kwargs)
        cache = calls.get_cache(call)
        tag = calls.check_cache(cache, METHOD, running, calls.cache_keyword(module))
        if running is None:
            return None
        if getattr(cache, "is_compileable", False):
            raise ConfigError(
                f"prompt tuning makes every input {self.embeddings[running].shape[0]} tokens longer, which a fixed-size "
                f"{type(cache).__name__} has no room for; generate with the default cache (no cache_implementation=...)"
            )
        prompt = self.embeddings[running]  # (V, H)
        tokens = prompt.shape[0]
        batch, length = calls.call_shape(call)
        mask, positions = call.get("attention_mask"), call.get("position_ids")
        if tag is not None:
            # the cache holds the virtual tokens already: only the caller's mask and positions lack them
            if mask is not None:
                call["attention_mask"] = calls.extend_mask(mask, batch, tokens, mask.shape[-1], mask.device)
            if positions is not None:
                call["position_ids"] = positions + tokens
            return (), call
        embeds = call.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(call["input_ids"])  # (B, T, H)
        virtual = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, V, H)
        call["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)  # (B, V + T, H)
        call["input_ids"] = None
        if mask is not None:
            call["attention_mask"] = calls.extend_mask(mask, batch, tokens, mask.shape[-1], mask.device)
        token_types = call.get("token_type_ids")
        if token_types is not None:
            call["token_type_ids"] = torch.cat([token_types.new_zeros(token_types.shape[0], tokens), token_types], dim=1)
        if positions is not None:
            positions = positions.unsqueeze(0) if positions.dim() == 1 else positions  # (T,) -> (1, T)
            front = torch.arange(tokens, dtype=positions.dtype, device=positions.device).expand(positions.shape[0], -1)
            call["position_ids"] = torch.cat([front, positions + tokens], dim=1)
        labels = call.get("labels")
        if self._token_level(labels, batch, length):
            ignore = labels.new_full((labels.shape[0], tokens), -100)
            call["labels"] = torch.cat([ignore, labels], dim=1)
        return (), call

    def _token_level(self, labels: Any, batch: int, length: int) -> bool:
        # (B, T) integer labels are per token (LM, token classification); (B,) or float ones are per sequence
        return (
            isinstance(labels, torch.Tensor)
            and not self.is_encoder_decoder
            and labels.dim() == 2
            and tuple(labels.shape) == (batch, length)
            and not labels.is_floating_point()
        )

    def post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook: marks the returned cache as holding the running adapter's virtual tokens."""
        running = self.running()
        cache = calls.output_cache(output)
        if running is not None and hasattr(cache, "get_seq_length") and calls.cache_tag(cache, METHOD) is None:
            calls.set_cache_tag(cache, METHOD, running, self.embeddings[running].shape[0])

    def extra_repr(self) -> str:
        return f"active={self.active!r}, enabled={self.enabled}"
