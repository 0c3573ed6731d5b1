"""The prefix-tuning method (Li & Liang 2021): learned keys and values in front of every attention layer.

The method attaches to the model, not to leaf modules: its targets are the model's self-attention
modules (recorded so that ``load`` can check the model still has them), its parameters live in
the child module ``peftcore_prefix`` (:class:`~peftcore.tuners.prefix.encoder.PrefixTuning`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from peftcore import targeting
from peftcore.errors import AdapterStateError, CheckpointError, TargetError, UnsupportedModuleError
from peftcore.tuners.prefix import calls
from peftcore.tuners.prefix.config import PrefixConfig
from peftcore.tuners.prefix.encoder import PrefixEncoder, PrefixTuning

HOLDER = "peftcore_prefix"


def _describe(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules: the innermost modules whose class name ends in ``Attention``.

    "Innermost" picks ``BertSelfAttention`` rather than the ``BertAttention`` around it; cross
    attention (``is_cross_attention`` or ``Cross`` in the class name) is left out.
    """
    found = []
    for path, module in targeting.iter_modules(model):
        name = type(module).__name__
        if path.split(".")[0] == HOLDER or not name.endswith("Attention"):
            continue
        if "Cross" in name or getattr(module, "is_cross_attention", False):
            continue
        found.append((path, module))
    paths = [p for p, _ in found]
    return [(p, m) for p, m in found if not any(q.startswith(p + ".") for q in paths)]


def geometry(model: nn.Module) -> tuple[int, int, int, int]:
    """``(layers, kv_heads, head_dim, hidden_size)`` from the model's config."""
    config = calls.model_config(model, "prefix")
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
    except (AttributeError, TypeError) as exc:
        raise UnsupportedModuleError(
            f"prefix tuning sizes its keys and values from the config's num_hidden_layers, num_attention_heads and "
            f"hidden_size; {type(config).__name__} lacks one: {exc}"
        ) from exc
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)  # grouped-query attention
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return layers, kv_heads, head_dim, hidden


def _holder(model: nn.Module) -> PrefixTuning | None:
    holder = model._modules.get(HOLDER)
    return holder if isinstance(holder, PrefixTuning) else None


class PrefixMethod:
    """Prefix tuning through the transformers cache, for decoder (GPT-2, Llama) and encoder (BERT) models.

    Several prefix adapters can be attached; one runs at a time. It combines with methods that
    replace leaf modules (LoRA) and with prompt tuning.
    """

    name = "prefix"
    config_class = PrefixConfig
    merges = False
    identity_at_init = False
    peftcore_api = 1

    # -- targets ----------------------------------------------------------------------------------
    def resolve_targets(self, model: nn.Module, config: PrefixConfig, spec: targeting.TargetSpec) -> list[str]:
        if spec.targets is not None or spec.exclude is not None or spec.layers is not None:
            raise TargetError(
                "prefix tuning puts keys and values in front of every attention layer through the cache, whose layers "
                "cannot be skipped; drop targets=, exclude= and layers= (use LoRA to adapt chosen layers)"
            )
        return [path for path, _ in attention_modules(model)]

    def check_targets(self, model: nn.Module, config: PrefixConfig, targets: list[str]) -> None:
        layers, _, _, _ = geometry(model)
        found = dict(attention_modules(model))
        if not found:
            raise UnsupportedModuleError(
                f"prefix tuning found no attention module in {type(model).__name__} (a module whose class name "
                "ends in 'Attention'); use 'prompt' or 'lora' for this model"
            )
        unknown = [p for p in targets if p not in found]
        if unknown or len(targets) != len(found):
            raise UnsupportedModuleError(
                f"prefix tuning attaches to every attention module of the model ({', '.join(list(found)[:3])}, ...); "
                f"got {', '.join(unknown[:3]) or len(targets)} instead"
            )
        for path in targets:
            module = found[path]
            if calls.cache_argument(module) is None:
                raise UnsupportedModuleError(
                    f"the attention module {path!r} ({_describe(module)}) cannot take a cache (its forward has no "
                    "cache or past_key_values parameter), so prefix tuning cannot reach it; use 'prompt' or 'lora' "
                    "for this model"
                )
        body = calls.base_model(model)
        params = calls.forward_parameters(body)
        missing = [name for name, found in (("cache", calls.cache_argument(body) is not None),
                                            ("attention_mask", "attention_mask" in params)) if not found]
        if missing:
            raise UnsupportedModuleError(
                f"prefix tuning passes its keys and values as the model's cache, but {_describe(body)}.forward has no "
                f"{' or '.join(missing)} parameter; use 'prompt' or 'lora' for this model"
            )
        indices = sorted(getattr(found[p], "layer_idx", None) for p in targets if isinstance(getattr(found[p], "layer_idx", None), int))
        if indices != list(range(layers)):
            raise UnsupportedModuleError(
                f"prefix tuning fills one cache layer per attention module, but the {len(targets)} attention modules of "
                f"{type(model).__name__} carry layer indices {indices} where the config has {layers} layers "
                f"(first: {targets[0]!r}, {_describe(found[targets[0]])})"
            )
        existing = model._modules.get(HOLDER)
        if existing is not None and not isinstance(existing, PrefixTuning):
            raise UnsupportedModuleError(f"{type(model).__name__} already has a child {HOLDER!r} that peftcore did not add")

    # -- attach / detach ----------------------------------------------------------------------------
    def attach(self, model: nn.Module, name: str, config: PrefixConfig, targets: list[str]) -> None:
        layers, kv_heads, head_dim, hidden = geometry(model)
        body = calls.base_model(model)
        like = next(body.parameters())
        holder = _holder(model)
        if holder is None:
            holder = PrefixTuning(calls.module_path(model, body), "position_ids" in calls.forward_parameters(body))
            model.add_module(HOLDER, holder)
            body.register_forward_pre_hook(holder.pre_forward, with_kwargs=True)
        encoder = PrefixEncoder(layers, kv_heads, head_dim, config.virtual_tokens, config.projection, hidden,
                                dtype=like.dtype, device=like.device, shift_positions=config.shift_positions)
        _initialise(encoder, model, body, config)
        holder.adapters[name] = encoder

    def detach(self, model: nn.Module, name: str) -> None:
        holder = _holder(model)
        if holder is None or name not in holder.adapters:
            return
        del holder.adapters[name]
        if holder.active == name:
            holder.active = None
        if not len(holder.adapters):
            calls.remove_hooks(model.get_submodule(holder.hooked_path), holder)
            delattr(model, HOLDER)

    # -- tensors -----------------------------------------------------------------------------------
    def _encoder(self, model: nn.Module, name: str) -> PrefixEncoder:
        holder = _holder(model)
        if holder is None or name not in holder.adapters:
            raise AdapterStateError(f"the model holds no prefix adapter named {name!r}")
        return holder.adapters[name]

    def adapter_parameters(self, model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
        holder = _holder(model)
        if holder is None or name not in holder.adapters:
            return []
        return [(f"{HOLDER}.adapters.{name}.{key}", p) for key, p in holder.adapters[name].named_parameters()]

    def adapter_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        keys, values = self._encoder(model, name).materialise()
        return {f"{HOLDER}.keys": keys.detach(), f"{HOLDER}.values": values.detach()}

    def load_adapter_state(self, model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
        encoder = self._encoder(model, name)
        expected = {f"{HOLDER}.keys": encoder.shape, f"{HOLDER}.values": encoder.shape}
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [
            f"{k}: saved shape {tuple(state[k].shape)}, model expects {shape} (layers, kv_heads, virtual_tokens, head_dim)"
            for k, shape in expected.items()
            if k in state and tuple(state[k].shape) != shape
        ]
        if problems:
            raise CheckpointError(f"the saved 'prefix' adapter does not fit the model: {'; '.join(problems)}")
        encoder.load_materialised(state[f"{HOLDER}.keys"], state[f"{HOLDER}.values"])

    # -- activity ------------------------------------------------------------------------------------
    def set_active(self, model: nn.Module, names: Sequence[str]) -> None:
        holder = _holder(model)
        running = calls.single_active(self.name, list(names))
        if holder is not None:
            holder.active = running

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        holder = _holder(model)
        if holder is not None:
            holder.enabled = enabled

    def merge(self, model: nn.Module, name: str) -> None:
        raise AdapterStateError("prefix adapters add attention positions; they cannot be merged into base weights")

    def unmerge(self, model: nn.Module, name: str) -> None:
        raise AdapterStateError("prefix adapters are never merged")


def _initialise(encoder: PrefixEncoder, model: nn.Module, body: nn.Module, config: PrefixConfig) -> None:
    """Fills a new prefix as ``config.init`` asks (the base model is only read)."""
    tokens = config.virtual_tokens
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    with torch.no_grad():
        if encoder.projected:
            if config.init == "vocab" and weight is not None and weight.shape[1] == encoder.embedding.shape[1]:
                ids = torch.randint(weight.shape[0], (tokens,), device=weight.device)
                encoder.embedding.copy_(weight[ids])
            else:
                encoder.embedding.normal_()
            return
        if config.init == "random" or weight is None:
            encoder.keys.normal_()
            encoder.values.normal_()
            return
        keys, values = _vocab_keys_values(body, weight.shape[0], tokens, weight.device)
        encoder.load_materialised(keys, values)


def _vocab_keys_values(body: nn.Module, vocab: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values the body computes for ``tokens`` random vocabulary tokens, ``(L, kvh, P, d)`` each."""
    from transformers import DynamicCache

    ids = torch.randint(vocab, (1, tokens), device=device)
    cache = DynamicCache(config=getattr(body, "config", None))
    try:
        body(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{calls.cache_keyword(body): cache})
    except Exception as exc:
        raise UnsupportedModuleError(
            f"prefix init='vocab' runs {type(body).__name__} on {tokens} vocabulary tokens to read its keys and values, "
            f"and that failed: {exc}; use init='random'"
        ) from exc
    # the last P positions: another prefix adapter that is running may sit in front of them
    keys = torch.stack([layer.keys[0, :, -tokens:] for layer in cache.layers])
    values = torch.stack([layer.values[0, :, -tokens:] for layer in cache.layers])
    return keys, values
