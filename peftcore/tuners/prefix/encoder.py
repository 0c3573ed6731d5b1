"""The modules of prefix tuning: one :class:`PrefixEncoder` per adapter, held by :class:`PrefixTuning`.

``PrefixTuning`` is added to the model as the child ``peftcore_prefix`` (so ``.to()``, deepcopy,
pickling and ``state_dict`` carry the prefixes) and registers one forward pre-hook, a bound
method of itself, on the transformer body (``model.bert``, ``model.transformer``, ...). The hook
puts the running adapter's keys and values into a ``transformers.DynamicCache`` as the first P
positions of every layer, extends the attention mask over them, and gives the real tokens the
positions they have without a prefix (with ``shift_positions``: the positions behind it, as HF
PEFT does). The model's own attention code then attends to the prefix: no transformers
``forward`` is copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peftcore.errors import AdapterStateError, ConfigError
from peftcore.tuners.prefix import calls

METHOD = "prefix"


class PrefixEncoder(nn.Module):
    """The prefix of one adapter: P keys and values for each attention layer.

    Without a projection the keys and values are the parameters ``keys`` and ``values``, each
    ``(layers, kv_heads, P, head_dim)``. With one, they are computed from ``embedding``
    ``(P, hidden)`` by a two-layer tanh MLP whose weights are plain parameters (no ``nn.Linear``
    children, so that LoRA's default targets never pick them up).

    Args:
        layers: attention layers L.
        kv_heads: key/value heads per layer (fewer than query heads under grouped-query attention).
        head_dim: size of one head.
        virtual_tokens: prefix length P.
        projection: hidden size of the reparameterising MLP, or None.
        hidden_size: the MLP's input size (the model's hidden size).
        dtype: parameter dtype.
        device: parameter device.
        shift_positions: whether the real tokens take positions behind the prefix (P..P+T-1).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, virtual_tokens: int, projection: int | None,
                 hidden_size: int, *, dtype: torch.dtype, device: torch.device, shift_positions: bool = False):
        super().__init__()
        self.shape = (layers, kv_heads, virtual_tokens, head_dim)
        self.virtual_tokens = virtual_tokens
        self.shift_positions = shift_positions
        self.projection = projection
        factory = {"dtype": dtype, "device": device}
        if projection is None:
            self.keys = nn.Parameter(torch.zeros(self.shape, **factory))
            self.values = nn.Parameter(torch.zeros(self.shape, **factory))
        else:
            out = 2 * layers * kv_heads * head_dim
            self.embedding = nn.Parameter(torch.zeros(virtual_tokens, hidden_size, **factory))
            self.mlp_in_weight = nn.Parameter(torch.empty(projection, hidden_size, **factory))
            self.mlp_in_bias = nn.Parameter(torch.empty(projection, **factory))
            self.mlp_out_weight = nn.Parameter(torch.empty(out, projection, **factory))
            self.mlp_out_bias = nn.Parameter(torch.empty(out, **factory))
            for weight, bias in ((self.mlp_in_weight, self.mlp_in_bias), (self.mlp_out_weight, self.mlp_out_bias)):
                # nn.Linear's default initialisation
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                bound = 1 / math.sqrt(weight.shape[1])
                nn.init.uniform_(bias, -bound, bound)

    @property
    def projected(self) -> bool:
        """Whether the keys and values come out of the MLP (False after loading a materialised prefix)."""
        return "embedding" in self._parameters

    def materialise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values, each ``(layers, kv_heads, P, head_dim)``, differentiable."""
        if not self.projected:
            return self.keys, self.values
        layers, kv_heads, tokens, head_dim = self.shape
        hidden = torch.tanh(nn.functional.linear(self.embedding, self.mlp_in_weight, self.mlp_in_bias))  # (P, proj)
        flat = nn.functional.linear(hidden, self.mlp_out_weight, self.mlp_out_bias)  # (P, L * 2 * kvh * d)
        kv = flat.view(tokens, layers, 2, kv_heads, head_dim).permute(2, 1, 3, 0, 4)  # (2, L, kvh, P, d)
        return kv[0], kv[1]

    def load_materialised(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Sets the keys and values directly; a projected prefix drops its MLP (saved adapters hold no MLP)."""
        like = next(iter(self.parameters()))
        keys = keys.to(dtype=like.dtype, device=like.device)
        values = values.to(dtype=like.dtype, device=like.device)
        if self.projected:
            for name in ("embedding", "mlp_in_weight", "mlp_in_bias", "mlp_out_weight", "mlp_out_bias"):
                delattr(self, name)
            self.keys = nn.Parameter(keys.clone())
            self.values = nn.Parameter(values.clone())
            return
        with torch.no_grad():
            self.keys.copy_(keys)
            self.values.copy_(values)

    def extra_repr(self) -> str:
        layers, kv_heads, tokens, head_dim = self.shape
        mlp = f", projection={self.projection}" if self.projected else ""
        return f"layers={layers}, kv_heads={kv_heads}, virtual_tokens={tokens}, head_dim={head_dim}{mlp}"


class PrefixTuning(nn.Module):
    """The prefix adapters of one model, and the hook that feeds the running one to the attention layers.

    Args:
        hooked_path: path of the transformer body whose forward gets the cache ("" = the model).
        takes_positions: whether the body's forward has a ``position_ids`` parameter.
    """

    def __init__(self, hooked_path: str, takes_positions: bool):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.hooked_path = hooked_path
        self.takes_positions = takes_positions
        self.active: str | None = None
        self.enabled = True

    def running(self) -> str | None:
        """The adapter whose prefix goes into the cache now, or None."""
        return self.active if self.enabled and self.active in self.adapters else None

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Forward pre-hook of the body: prefix in the cache, mask over it, unshifted positions."""
        from transformers import DynamicCache

        running = self.running()
        call = calls.as_keywords(module, args, kwargs)
        keyword = calls.cache_keyword(module)  # past_key_values before transformers 5.24
        cache = calls.get_cache(call)
        tag = calls.check_cache(cache, METHOD, running, keyword)
        if running is None:
            return None
        if module.training and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules()):
            raise AdapterStateError(
                f"prefix adapter {running!r} feeds the attention layers through the cache, which transformers' "
                "checkpointed layers drop in training; call model.activation_checkpointing_disable()"
            )
        batch, length = calls.call_shape(call)
        encoder = self.adapters[running]
        tokens = encoder.virtual_tokens
        if tag is None:
            if cache is None:
                cache = DynamicCache(config=getattr(module, "config", None))
            elif not isinstance(cache, DynamicCache):
                raise ConfigError(
                    f"prefix tuning puts its keys and values into a transformers DynamicCache, got a "
                    f"{type(cache).__name__}; generate with the default cache (no cache_implementation=...)"
                )
            keys, values = encoder.materialise()
            device = keys.device.type
            if torch.is_autocast_enabled(device):
                # under autocast the layers' keys are in the autocast dtype; the cache concatenates them
                keys, values = keys.to(torch.get_autocast_dtype(device)), values.to(torch.get_autocast_dtype(device))
            for layer in range(keys.shape[0]):
                cache.update(keys[layer].expand(batch, -1, -1, -1), values[layer].expand(batch, -1, -1, -1), layer)
            calls.set_cache_tag(cache, METHOD, running, tokens)
            calls.set_cache(call, keyword, cache)
        past = calls.cache_length(cache) - tokens  # real positions the cache held before this call
        reference = call.get("input_ids") if call.get("inputs_embeds") is None else call["inputs_embeds"]
        call["attention_mask"] = calls.extend_mask(call.get("attention_mask"), batch, tokens, past + length, reference.device)
        shift = tokens if encoder.shift_positions else 0  # HF PEFT's positions: behind the prefix
        if self.takes_positions and call.get("position_ids") is None:
            # without shift, what the body computes without a prefix: the real tokens keep positions past..past+T-1
            call["position_ids"] = torch.arange(shift + past, shift + past + length, device=reference.device).unsqueeze(0)
        elif self.takes_positions and shift:
            call["position_ids"] = call["position_ids"] + shift
        return (), call

    def extra_repr(self) -> str:
        return f"hooked={self.hooked_path or '<model>'!r}, active={self.active!r}, enabled={self.enabled}"
