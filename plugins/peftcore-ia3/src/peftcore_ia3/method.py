"""The IA3 method: which modules it scales, and how (output or input), decided per module path."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from peftcore.errors import AdapterStateError, ConfigError, TargetError
from peftcore.tuners.base import AdapterLayer, LayerMethod, iter_layers

from peftcore_ia3.config import IA3Config, Selection
from peftcore_ia3.layers import IA3Layer, IA3Spec, is_hf_conv1d

# Default targets, fully matched against module paths. Keys and values have their output
# scaled; feed-forward down projections have their input scaled.
KEY_VALUE_PATTERNS = (
    r"(.*\.)?attention\.self\.(key|value)",  # BERT, RoBERTa, MiniLM
    r"(.*\.)?attn\.c_attn",  # GPT-2 (packed q, k, v: only k and v are scaled)
    r"(.*\.)?self_attn\.(k_proj|v_proj)",  # Llama, Mistral, Qwen
)
FEEDFORWARD_PATTERNS = (
    r"(.*\.)?layer\.\d+\.output\.dense",  # BERT: the second FFN linear (not attention.output.dense)
    r"(.*\.)?mlp\.c_proj",  # GPT-2
    r"(.*\.)?mlp\.down_proj",  # Llama, Mistral, Qwen
    r"(.*\.)?fc2",  # OPT, BART, ViT-style MLPs
)
_DEFAULT_KV = re.compile("|".join(f"(?:{p})" for p in KEY_VALUE_PATTERNS))
_DEFAULT_FF = re.compile("|".join(f"(?:{p})" for p in FEEDFORWARD_PATTERNS))


def _selected(selection: Selection, path: str) -> bool:
    if selection is None:
        return bool(_DEFAULT_FF.fullmatch(path))
    if isinstance(selection, str):
        return bool(re.fullmatch(selection, path))
    return any(path == name or path.endswith("." + name) for name in selection)


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def packed_kv_slice(path: str, module: nn.Module) -> tuple[int, int] | None:
    """The key/value outputs of GPT-2's packed ``c_attn`` (``Conv1D`` with ``3 * n_embd`` outputs).

    Returns ``(n_embd, 3 * n_embd)`` there, and ``None`` (scale every output) elsewhere, including
    a cross-attention ``c_attn`` whose ``2 * n_embd`` outputs are all keys and values.
    """
    if path.rsplit(".", 1)[-1] != "c_attn" or not is_hf_conv1d(module):
        return None
    n_in, n_out = module.weight.shape  # Conv1D stores (in, out)
    return (n_in, n_out) if n_out == 3 * n_in else None


class IA3Method(LayerMethod):
    """IA3 (Liu et al. 2022): vectors that rescale keys, values and feed-forward inputs, starting at one.

    Default targets: the key and value projections and the feed-forward down projection of BERT,
    GPT-2 and Llama style models (see :data:`KEY_VALUE_PATTERNS`, :data:`FEEDFORWARD_PATTERNS`).
    """

    peftcore_api = 1

    def __init__(self) -> None:
        super().__init__(name="ia3", config_class=IA3Config, merges=True, identity_at_init=True)

    # -- targets ---------------------------------------------------------------------------------
    def default_targets(self, path: str, module: nn.Module) -> bool:
        return self.is_linear_like(module) and bool(_DEFAULT_KV.fullmatch(path) or _DEFAULT_FF.fullmatch(path))

    def resolve_targets(self, model: nn.Module, config: Any, spec: Any) -> list[str]:
        if spec.targets is not None:
            return super().resolve_targets(model, config, spec)
        message = (
            f"ia3 found no default targets in {type(model).__name__}: it knows the key, value and "
            "feed-forward module names of BERT, GPT-2 and Llama style models. Pass targets=[...] "
            "(key/value/feed-forward linear layers) and feedforward=[...] (which of them scale their input)"
        )
        try:
            paths = super().resolve_targets(model, config, spec)
        except TargetError as exc:
            raise TargetError(message) from exc
        if not paths:
            raise TargetError(message)
        return paths

    def check_targets(self, model: nn.Module, config: Any, targets: list[str]) -> None:
        super().check_targets(model, config, targets)
        explicit = config.feedforward
        if explicit is not None and explicit != [] and not any(_selected(explicit, p) for p in targets):
            raise ConfigError(
                f"ia3 feedforward={explicit!r} matches none of the targets ({', '.join(targets[:4])}"
                f"{' ...' if len(targets) > 4 else ''}); name feed-forward modules that are also targets, "
                "or pass feedforward=[] to scale every target's output"
            )

    def layer_spec(self, model: nn.Module, config: IA3Config, path: str) -> IA3Spec:
        """How adapter ``config`` scales the module at ``path``."""
        if _selected(config.feedforward, path):
            return IA3Spec(feedforward=True)
        if config.scale_packed_query:
            return IA3Spec(feedforward=False)
        return IA3Spec(feedforward=False, out_slice=packed_kv_slice(path, _base(model.get_submodule(path))))

    # -- Method protocol ---------------------------------------------------------------------------
    def attach(self, model: nn.Module, name: str, config: Any, targets: list[str]) -> None:
        for path in targets:
            super().attach(model, name, self.layer_spec(model, config, path), [path])

    def unmerge(self, model: nn.Module, name: str) -> None:
        # Check every layer before changing any, so a refusal leaves the model fully merged.
        layers = [layer for _, layer in iter_layers(model, self.name) if name in layer.merged_adapters]
        for layer in layers:
            assert isinstance(layer, IA3Layer)
            problem = layer.unmerge_problem(name)
            if problem:
                raise AdapterStateError(
                    f"cannot unmerge IA3 adapter {name!r}: {problem}. Unwrap with peftcore.unwrap(model, merge=True) "
                    "to keep the merged weights instead"
                )
        super().unmerge(model, name)
