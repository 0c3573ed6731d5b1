"""The prompt-tuning method (Lester et al. 2021): learned virtual token embeddings before the input.

The method attaches to the model: its one target is the model's input embedding module (recorded
so that ``load`` can check it), its parameters live in the child module ``peftcore_prompt``
(:class:`~peftcore.tuners.prompt.module.PromptTuning`).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from peftcore import targeting
from peftcore.errors import AdapterStateError, CheckpointError, ConfigError, TargetError, UnsupportedModuleError
from peftcore.tuners.prefix import calls
from peftcore.tuners.prompt.config import PromptConfig, encode
from peftcore.tuners.prompt.module import PromptTuning

HOLDER = "peftcore_prompt"
_KEY = f"{HOLDER}.embeddings"


def _holder(model: nn.Module) -> PromptTuning | None:
    holder = model._modules.get(HOLDER)
    return holder if isinstance(holder, PromptTuning) else None


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's input embedding module (``model.get_input_embeddings()``), with a 2D ``weight``.

    Raises:
        UnsupportedModuleError: the model has none.
    """
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError) as exc:
        raise UnsupportedModuleError(f"prompt tuning needs {type(model).__name__}.get_input_embeddings(): {exc}") from exc
    weight = getattr(embeddings, "weight", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UnsupportedModuleError(
            f"prompt tuning prepends embeddings to the input, but {type(model).__name__} has no input embedding module "
            "with a (vocab, hidden) weight (model.get_input_embeddings()); use 'lora' for this model"
        )
    return embeddings


class PromptMethod:
    """Prompt tuning for any transformers model whose forward takes ``inputs_embeds``.

    Several prompt adapters can be attached; one runs at a time. It combines with methods that
    replace leaf modules (LoRA) and with prefix tuning.
    """

    name = "prompt"
    config_class = PromptConfig
    merges = False
    identity_at_init = False
    peftcore_api = 1

    # -- targets ----------------------------------------------------------------------------------
    def resolve_targets(self, model: nn.Module, config: PromptConfig, spec: targeting.TargetSpec) -> list[str]:
        if spec.targets is not None or spec.exclude is not None or spec.layers is not None:
            raise TargetError(
                "prompt tuning puts virtual tokens before the model's input; it has no targets, exclude or layers to choose"
            )
        calls.model_config(model, "prompt")
        return [calls.module_path(model, input_embeddings(model))]

    def check_targets(self, model: nn.Module, config: PromptConfig, targets: list[str]) -> None:
        calls.model_config(model, "prompt")
        params = calls.forward_parameters(model)
        missing = [p for p in ("inputs_embeds", "attention_mask") if p not in params]
        if missing:
            raise UnsupportedModuleError(
                f"prompt tuning passes the input as inputs_embeds with a longer attention_mask, but "
                f"{type(model).__name__}.forward has no {' or '.join(missing)} parameter; use 'lora' for this model"
            )
        path = calls.module_path(model, input_embeddings(model))
        if list(targets) != [path]:
            raise UnsupportedModuleError(
                f"prompt tuning attaches to the input embeddings {path!r} of {type(model).__name__}, got targets {targets}"
            )
        existing = model._modules.get(HOLDER)
        if existing is not None and not isinstance(existing, PromptTuning):
            raise UnsupportedModuleError(f"{type(model).__name__} already has a child {HOLDER!r} that peftcore did not add")

    # -- attach / detach ----------------------------------------------------------------------------
    def attach(self, model: nn.Module, name: str, config: PromptConfig, targets: list[str]) -> None:
        weight = input_embeddings(model).weight.detach()
        start = _initial_embeddings(model, config, weight)
        holder = _holder(model)
        if holder is None:
            is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
            holder = PromptTuning(is_encoder_decoder)
            model.add_module(HOLDER, holder)
            # first: the prefix hook (on the same module for a bare body) must see the virtual tokens
            model.register_forward_pre_hook(holder.pre_forward, with_kwargs=True, prepend=True)
            model.register_forward_hook(holder.post_forward)
        holder.embeddings[name] = nn.Parameter(start)

    def detach(self, model: nn.Module, name: str) -> None:
        holder = _holder(model)
        if holder is None or name not in holder.embeddings:
            return
        del holder.embeddings[name]
        if holder.active == name:
            holder.active = None
        if not len(holder.embeddings):
            calls.remove_hooks(model, holder)
            delattr(model, HOLDER)

    # -- tensors -----------------------------------------------------------------------------------
    def _embeddings(self, model: nn.Module, name: str) -> nn.Parameter:
        holder = _holder(model)
        if holder is None or name not in holder.embeddings:
            raise AdapterStateError(f"the model holds no prompt adapter named {name!r}")
        return holder.embeddings[name]

    def adapter_parameters(self, model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
        holder = _holder(model)
        if holder is None or name not in holder.embeddings:
            return []
        return [(f"{_KEY}.{name}", holder.embeddings[name])]

    def adapter_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        return {_KEY: self._embeddings(model, name).detach()}

    def load_adapter_state(self, model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
        own = self._embeddings(model, name)
        problems = [f"unexpected {k}" for k in state if k != _KEY]
        if _KEY not in state:
            problems.insert(0, f"missing {_KEY}")
        elif state[_KEY].shape != own.shape:
            problems.append(f"{_KEY}: saved shape {tuple(state[_KEY].shape)}, model expects {tuple(own.shape)} (virtual_tokens, hidden)")
        if problems:
            raise CheckpointError(f"the saved 'prompt' adapter does not fit the model: {'; '.join(problems)}")
        with torch.no_grad():
            own.copy_(state[_KEY].to(dtype=own.dtype, device=own.device))

    # -- activity ------------------------------------------------------------------------------------
    def set_active(self, model: nn.Module, names: Sequence[str]) -> None:
        running = calls.single_active(self.name, list(names))
        holder = _holder(model)
        if holder is not None:
            holder.active = running

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        holder = _holder(model)
        if holder is not None:
            holder.enabled = enabled

    def merge(self, model: nn.Module, name: str) -> None:
        raise AdapterStateError("prompt adapters add input positions; they cannot be merged into base weights")

    def unmerge(self, model: nn.Module, name: str) -> None:
        raise AdapterStateError("prompt adapters are never merged")


def _initial_embeddings(model: nn.Module, config: PromptConfig, weight: torch.Tensor) -> torch.Tensor:
    """``(V, hidden)`` starting embeddings as ``config.init`` asks."""
    tokens, vocab = config.virtual_tokens, weight.shape[0]
    if config.init == "random":
        std, mean = torch.std_mean(weight.float())
        return (torch.randn(tokens, weight.shape[1], device=weight.device) * std + mean).to(weight.dtype)
    if config.init == "vocab":
        ids = torch.randint(vocab, (tokens,), device=weight.device)
    else:
        if config.init_ids is None:
            config.init_ids = encode(_find_tokenizer(model, config), config.init)
        too_big = [i for i in config.init_ids if i >= vocab]
        if too_big:
            raise ConfigError(
                f"prompt init={config.init!r}: token ids {too_big[:5]} are outside the model's vocabulary of {vocab}; "
                "pass the tokenizer of this model"
            )
        repeats = -(-tokens // len(config.init_ids))
        ids = torch.tensor((config.init_ids * repeats)[:tokens], device=weight.device)
    return weight[ids].clone()


def _find_tokenizer(model: nn.Module, config: PromptConfig) -> Any:
    """The tokenizer for a text ``init``: ``config.tokenizer`` (a path) or the model's own directory."""
    path = config.tokenizer
    source = "tokenizer="
    if path is None:
        path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        source = "the model's directory (model.name_or_path)"
    if not path or not os.path.isdir(str(path)):
        raise ConfigError(
            f"prompt init={config.init!r} is a text, which needs a tokenizer: pass tokenizer=<a tokenizer object or a "
            f"local tokenizer directory> (looked in {source}: {path!r})"
        )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        config.tokenizer = str(path)  # recorded in the saved config
        return tokenizer
    except (OSError, ValueError) as exc:
        raise ConfigError(f"prompt init={config.init!r}: cannot load a tokenizer from {str(path)!r} ({source}): {exc}") from exc
