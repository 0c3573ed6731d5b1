"""What prefix and prompt tuning share: reading a model's call, tagging caches, finding modules.

Both methods change a transformers model's inputs from a forward pre-hook instead of replacing
leaf modules: prefix tuning puts learned keys and values into the model's cache (the ``cache``
argument; ``past_key_values`` before transformers 5.24),
prompt tuning prepends learned embeddings to ``inputs_embeds``. Both must know, on a later call
that continues a cache (``generate``, step-by-step decoding), that the cache already holds their
virtual positions; they mark the cache object with a small tag for that.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from peftcore.errors import AdapterStateError, ConfigError, UnsupportedModuleError

#: Attribute set on a transformers ``Cache`` object: ``{method: (adapter name, virtual positions)}``.
CACHE_TAG = "_peftcore_virtual_tokens"

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

#: The names transformers gives the cache argument of a model or attention forward, newest first:
#: 5.24 renamed ``past_key_values`` to ``cache`` (the old keyword still works there, with a warning).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def forward_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    """The parameters of ``module.forward`` (decorators that use ``functools.wraps`` are seen through)."""
    return dict(inspect.signature(module.forward).parameters)


def as_keywords(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments as keywords, so that a hook can read and replace them by name.

    Raises:
        ConfigError: more positional arguments than ``forward`` has named parameters.
    """
    if not args:
        return dict(kwargs)
    names = [p.name for p in forward_parameters(module).values() if p.kind in _POSITIONAL]
    if len(args) > len(names):
        raise ConfigError(
            f"{type(module).__name__}.forward got {len(args)} positional arguments, more than its named "
            f"parameters ({', '.join(names)}); pass the inputs by keyword"
        )
    call = dict(zip(names, args))
    twice = sorted(set(call) & set(kwargs))
    if twice:
        raise TypeError(f"{type(module).__name__}.forward got multiple values for argument {twice[0]!r}")
    call.update(kwargs)
    return call


def cache_argument(module: nn.Module) -> str | None:
    """The name of ``module.forward``'s cache parameter (see ``CACHE_ARGUMENTS``), or None if it has none.

    Read once per class (the hooks ask on every call), unless the instance has a ``forward`` of its own.
    """
    if "forward" in vars(module):
        return _cache_name(forward_parameters(module))
    return _class_cache_argument(type(module))


@functools.lru_cache(maxsize=None)
def _class_cache_argument(cls: type) -> str | None:
    return _cache_name(inspect.signature(cls.forward).parameters)


def _cache_name(params: Any) -> str | None:
    return next((name for name in CACHE_ARGUMENTS if name in params), None)


def cache_keyword(module: nn.Module) -> str:
    """The keyword to pass ``module`` a cache under: its own (``cache_argument``), else the current name."""
    return cache_argument(module) or CACHE_ARGUMENTS[0]


def get_cache(call: dict[str, Any]) -> Any:
    """The cache a call passes, under either name (None if none).

    Raises:
        ConfigError: the call passes a cache under both names.
    """
    given = [name for name in CACHE_ARGUMENTS if call.get(name) is not None]
    if len(given) > 1:
        raise ConfigError(f"the model was called with both {given[0]}= and {given[1]}=; pass the cache once, as {given[0]}=")
    return call[given[0]] if given else None


def set_cache(call: dict[str, Any], name: str, cache: Any) -> None:
    """Puts ``cache`` into a call under ``name`` (the forward's own parameter), dropping the other name."""
    for other in CACHE_ARGUMENTS:
        call.pop(other, None)
    call[name] = cache


def output_cache(output: Any) -> Any:
    """The cache a model returned (``output.cache``, or ``output.past_key_values`` before 5.24), or None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def call_shape(call: dict[str, Any]) -> tuple[int, int]:
    """``(batch, new tokens)`` of a call, from ``input_ids`` or ``inputs_embeds``."""
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    if embeds is not None:
        return embeds.shape[0], embeds.shape[1]
    if ids is not None:
        return ids.shape[0], ids.shape[-1]
    raise ConfigError("the model was called without input_ids or inputs_embeds")


def cache_tag(cache: Any, method: str) -> tuple[str, int] | None:
    """The ``(adapter, positions)`` that ``method`` put into ``cache``, or None."""
    return getattr(cache, CACHE_TAG, {}).get(method) if cache is not None else None


def set_cache_tag(cache: Any, method: str, adapter: str, positions: int) -> None:
    tags = dict(getattr(cache, CACHE_TAG, {}))
    tags[method] = (adapter, positions)
    setattr(cache, CACHE_TAG, tags)


def cache_length(cache: Any) -> int:
    """Tokens already in a transformers cache (0 for an empty one)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def check_cache(cache: Any, method: str, running: str | None, keyword: str = "cache") -> tuple[str, int] | None:
    """The tag of ``method`` in ``cache``, after checking that it fits the adapter running now.

    ``keyword`` is the model's name for the cache argument, for the messages.

    Raises:
        AdapterStateError: the cache was filled with another adapter of the method, or with none
            while one runs now (its virtual positions would be missing), or with one while the
            method is switched off.
    """
    tag = cache_tag(cache, method)
    if running is None:
        if tag is not None:
            raise AdapterStateError(
                f"the cache holds the virtual tokens of {method} adapter {tag[0]!r}, which is not running now "
                f"(inactive, or inside peftcore.disabled); start a new cache ({keyword}=None)"
            )
        return None
    if tag is not None and tag[0] != running:
        raise AdapterStateError(
            f"the cache was filled with {method} adapter {tag[0]!r}, but {running!r} runs now; "
            f"start a new cache ({keyword}=None)"
        )
    if tag is None and cache_length(cache) > 0:
        raise AdapterStateError(
            f"the cache already holds {cache_length(cache)} positions computed without {method} adapter "
            f"{running!r}, so its virtual tokens cannot go in front of them; start from {keyword}=None "
            f"(or from a cache this model returned while {running!r} was running)"
        )
    return tag


def extend_mask(mask: torch.Tensor | None, batch: int, front: int, length: int, device: torch.device) -> torch.Tensor:
    """A 2D attention mask with ``front`` attended positions put before it.

    Args:
        mask: the caller's ``(batch, length)`` mask, or None (every position attended).
        batch: batch size.
        front: virtual positions to put in front.
        length: positions the caller's mask covers (used when ``mask`` is None).
        device: where a new mask goes.

    Returns:
        ``(batch, front + length)`` mask with the caller's dtype (long for a new one).

    Raises:
        ConfigError: a mask that is not 2D.
    """
    if mask is None:
        return torch.ones(batch, front + length, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise ConfigError(
            f"prefix and prompt tuning extend the 2D attention mask (batch, sequence), got one of shape "
            f"{tuple(mask.shape)}; pass the 2D padding mask instead of a prepared 4D one"
        )
    ones = torch.ones(mask.shape[0], front, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def model_config(model: nn.Module, method: str) -> Any:
    """The transformers config of ``model`` (for an LLM with a vision tower: its text config).

    Raises:
        UnsupportedModuleError: the model has no ``config``.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModuleError(
            f"{method} tuning works on transformers models (with a .config); {type(model).__name__} has none. "
            "Use LoRA for other modules"
        )
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if callable(get_text) else config


def module_path(model: nn.Module, module: nn.Module) -> str:
    """The dotted path of ``module`` inside ``model`` ("" for the model itself)."""
    for path, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return path
    raise UnsupportedModuleError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body of a model with a head (``model.bert``, ``model.transformer``, ...)."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) else model


def remove_hooks(module: nn.Module, owner: nn.Module) -> None:
    """Removes every forward hook of ``module`` that is a bound method of ``owner``.

    Hooks are found by their owner rather than through the handles ``register_*`` returned:
    handles point at the hook dicts, which a rolled-back transaction or a deepcopy replaces.
    """
    for table in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = module.__dict__.get(table, {})
        for hook_id, hook in list(hooks.items()):
            if getattr(hook, "__self__", None) is owner:
                del hooks[hook_id]
                for extra in (f"{table}_with_kwargs", "_forward_hooks_always_called"):
                    module.__dict__.get(extra, {}).pop(hook_id, None)


def hooks_of(module: nn.Module, owner: nn.Module) -> list[Any]:
    """Forward hooks of ``module`` that are bound methods of ``owner`` (for checks and tests)."""
    tables = (module.__dict__.get("_forward_pre_hooks", {}), module.__dict__.get("_forward_hooks", {}))
    return [h for table in tables for h in table.values() if getattr(h, "__self__", None) is owner]


def single_active(method: str, names: list[str] | tuple[str, ...]) -> str | None:
    """The one adapter of ``method`` to run, from the lifecycle's active names.

    Raises:
        AdapterStateError: more than one (their virtual tokens would compete for the same place).
    """
    names = list(dict.fromkeys(names))
    if len(names) > 1:
        raise AdapterStateError(
            f"only one {method} adapter can be active at a time, got {', '.join(map(repr, names))}; "
            f"activate one of them (other methods, e.g. LoRA, can be active beside it)"
        )
    return names[0] if names else None
