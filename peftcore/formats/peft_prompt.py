"""HF PEFT's prompt- and prefix-tuning checkpoints <-> peftcore's ``prompt`` and ``prefix`` methods.

PEFT saves either method as one tensor, ``prompt_embeddings``:

* prompt tuning: the virtual token embeddings, ``(V, hidden)``; peftcore's
  ``peftcore_prompt.embeddings`` is the same tensor;
* prefix tuning: every layer's keys and values, flat, ``(P, L * 2 * kv_heads * head_dim)``, laid
  out per virtual token as ``(layer, key/value, head, dim)``; peftcore keeps
  ``peftcore_prefix.keys`` and ``peftcore_prefix.values``, each ``(L, kv_heads, P, head_dim)``.
  With ``prefix_projection`` PEFT saves the MLP's output, not the MLP, as peftcore does.

PEFT's prefix tuning gives the real tokens the positions behind the prefix (P..P+T-1); read
adapters set the prefix option ``shift_positions=True``, which does the same, and only such
adapters can be written in PEFT's format. ``modules_to_save`` weights (a classifier head) sit
under ``base_model.<path>`` and become ``trainable=`` modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftcore.errors import CheckpointError, PeftcoreError
from peftcore.formats.peft_ia3 import base_model_name, check_options, task_type, trainable_from_peft
from peftcore.tuners.prefix import calls

PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")
METHODS = ("prompt", "prefix")

_KEY = "prompt_embeddings"
_PREFIX = "base_model."  # where PEFT puts a prompt-learning model's modules_to_save weights
_PROMPT_KEY = "peftcore_prompt.embeddings"
_PREFIX_KEYS = ("peftcore_prefix.keys", "peftcore_prefix.values")
#: PEFT task types whose models put the virtual tokens in front as peftcore does (not seq2seq).
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

_COMMON = (
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
    "num_layers", "modules_to_save",
)
#: Options that act only before the saved tensors are loaded (initialisation) are read as well.
_PROMPT_OPTIONS = _COMMON + ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs")
_PREFIX_OPTIONS = _COMMON + ("init_weights", "encoder_hidden_size", "prefix_projection")
_PROMPT_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "vocab"}


def _fail(source: str, what: str, message: str) -> CheckpointError:
    return CheckpointError(f"the {what} adapter in {source!r}: {message}")


def _check_common(model: nn.Module, peft_config: dict[str, Any], what: str, source: str) -> int:
    """Checks task type and transformer submodules; returns ``num_virtual_tokens``."""
    task = peft_config.get("task_type")
    if task not in TASK_TYPES:
        raise _fail(source, what, f"task_type {task!r} is not supported; peftcore reads {what} adapters of the task types "
                    f"{', '.join(TASK_TYPES)} (decoder-only and encoder-only models; not SEQ_2_SEQ_LM)")
    submodules = peft_config.get("num_transformer_submodules")
    if submodules not in (None, 1):
        raise _fail(source, what, f"num_transformer_submodules={submodules} is not supported (only 1: one transformer stack)")
    tokens = peft_config.get("num_virtual_tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise _fail(source, what, f"num_virtual_tokens must be a positive int, got {tokens!r}")
    return tokens


def _split(tensors: dict[str, torch.Tensor], source: str, what: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if _KEY not in tensors:
        raise _fail(source, what, f"the weights lack {_KEY!r} (keys: {', '.join(sorted(tensors)[:5])})")
    return tensors[_KEY], {k: v for k, v in tensors.items() if k != _KEY}


def to_native(model: nn.Module | None, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
              source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT prompt- or prefix-tuning adapter as peftcore's native config and tensors; the model is only read.

    Raises:
        CheckpointError: no model (it is needed), an unsupported task type or option, or a
            geometry (virtual tokens, hidden size, layers, key/value heads) that does not fit the model.
    """
    peft_type = peft_config.get("peft_type")
    if model is None and peft_type in PEFT_TYPES:
        raise CheckpointError(
            f"reading the {peft_type} adapter in {source!r} needs the base model: peftcore records the paths of its input "
            "embeddings (prompt) or attention modules (prefix), which PEFT's file does not name; load it with "
            "peftcore.load(model, path)"
        )
    if peft_type == "PROMPT_TUNING":
        return _prompt_to_native(model, peft_config, tensors, source)
    if peft_type == "PREFIX_TUNING":
        return _prefix_to_native(model, peft_config, tensors, source)
    raise CheckpointError(f"{source!r}: peft_type {peft_type!r} is neither PROMPT_TUNING nor PREFIX_TUNING")


def _native_config(method: str, options: dict[str, Any], targets: list[str], trainable: list[str],
                   extra: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"method": method, "name": "default", "options": options, "targets": targets, "trainable": trainable,
            "trainable_keys": sorted(extra)}


def _prompt_to_native(model: nn.Module, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                      source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from peftcore.tuners.prompt.method import input_embeddings

    what = "prompt-tuning"
    check_options(peft_config, _PROMPT_OPTIONS, "PROMPT_TUNING", source)
    tokens = _check_common(model, peft_config, what, source)
    embeddings, others = _split(tensors, source, what)
    try:
        module = input_embeddings(model)
    except PeftcoreError as exc:
        raise _fail(source, what, str(exc)) from exc
    hidden = module.weight.shape[1]
    if tuple(embeddings.shape) != (tokens, hidden):
        raise _fail(source, what, f"{_KEY} has shape {tuple(embeddings.shape)}; num_virtual_tokens={tokens} and this "
                    f"{type(model).__name__}'s embedding size {hidden} make ({tokens}, {hidden})")
    init = str(peft_config.get("prompt_tuning_init") or "RANDOM")
    if init not in _PROMPT_INITS:
        raise _fail(source, what, f"prompt_tuning_init={init!r} is not one of {', '.join(_PROMPT_INITS)}")
    trainable, extra = trainable_from_peft(model, peft_config, others, _PREFIX, source)
    # The initialisation is recorded, not needed: the saved embeddings replace it. PEFT's TEXT init
    # becomes "vocab" (rows of the word embeddings) so that loading needs no tokenizer.
    options = {"virtual_tokens": tokens, "init": _PROMPT_INITS[init]}
    targets = [calls.module_path(model, module)]
    return _native_config("prompt", options, targets, trainable, extra), {_PROMPT_KEY: embeddings, **extra}


def _prefix_to_native(model: nn.Module, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                      source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from peftcore.tuners.prefix.method import attention_modules, geometry

    what = "prefix-tuning"
    check_options(peft_config, _PREFIX_OPTIONS, "PREFIX_TUNING", source)
    tokens = _check_common(model, peft_config, what, source)
    try:
        layers, kv_heads, head_dim, _ = geometry(model)
    except PeftcoreError as exc:
        raise _fail(source, what, str(exc)) from exc
    saved = {"num_layers": peft_config.get("num_layers"), "num_attention_heads": peft_config.get("num_attention_heads"),
             "token_dim": peft_config.get("token_dim")}
    own = {"num_layers": layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    wrong = [f"{k}={v} (the model has {own[k]})" for k, v in saved.items() if v is not None and v != own[k]]
    if wrong:
        raise _fail(source, what, f"{', '.join(wrong)}; num_attention_heads and token_dim count key/value heads under "
                    "grouped-query attention")
    flat, others = _split(tensors, source, what)
    width = layers * 2 * kv_heads * head_dim
    if tuple(flat.shape) != (tokens, width):
        raise _fail(source, what, f"{_KEY} has shape {tuple(flat.shape)}; this {type(model).__name__} takes "
                    f"({tokens}, {width}) = (num_virtual_tokens, layers * 2 * kv_heads * head_dim)")
    kv = flat.reshape(tokens, layers, 2, kv_heads, head_dim).permute(2, 1, 3, 0, 4)  # (2, L, kvh, P, d)
    trainable, extra = trainable_from_peft(model, peft_config, others, _PREFIX, source)
    projection = peft_config.get("encoder_hidden_size") if peft_config.get("prefix_projection") else None
    if peft_config.get("prefix_projection") and projection is None:
        projection = kv_heads * head_dim  # PEFT's default encoder_hidden_size: token_dim
    # PEFT initialises with N(0, 1) (or zeros, init_weights="zero"); the saved keys and values replace either
    options = {"virtual_tokens": tokens, "projection": projection, "init": "random", "shift_positions": True}
    targets = [path for path, _ in attention_modules(model)]
    native = {_PREFIX_KEYS[0]: kv[0].contiguous(), _PREFIX_KEYS[1]: kv[1].contiguous(), **extra}
    return _native_config("prefix", options, targets, trainable, extra), native


def _peft_common(model: nn.Module | None, native_config: dict[str, Any], peft_type: str, tokens: int,
                 what: str) -> dict[str, Any]:
    task = task_type(model, native_config)
    if task not in TASK_TYPES:
        name = type(model).__name__ if model is not None else (native_config.get("base_model") or {}).get("class")
        raise CheckpointError(
            f"PEFT's format cannot hold this {what} adapter: PEFT puts virtual tokens in front only for the task types "
            f"{', '.join(TASK_TYPES)}, and {name} is {task or 'none of them'}; save it with format='peftcore'"
        )
    text = calls.model_config(model, what) if model is not None else None  # PEFT fills in what is None from the model
    return {
        "peft_type": peft_type,
        "task_type": task,
        "base_model_name_or_path": base_model_name(model, native_config),
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "num_virtual_tokens": tokens,
        "num_transformer_submodules": 1,
        "num_layers": getattr(text, "num_hidden_layers", None),
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "modules_to_save": list(native_config.get("trainable") or []) or None,
    }


def _trainable_to_peft(native_config: dict[str, Any], tensors: dict[str, torch.Tensor], own: tuple[str, ...],
                       what: str) -> dict[str, torch.Tensor]:
    keys = set(native_config.get("trainable_keys", []))
    unexpected = sorted(set(tensors) - keys - set(own))
    missing = [k for k in own if k not in tensors]
    if unexpected or missing:
        raise CheckpointError(
            f"the {what} adapter's tensors do not fit PEFT's format: "
            f"{'; '.join([f'missing {k}' for k in missing] + [f'unexpected {k}' for k in unexpected[:5]])}"
        )
    return {_PREFIX + k: tensors[k] for k in keys}


def from_native(model: nn.Module | None, native_config: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A peftcore ``prompt`` or ``prefix`` adapter as PEFT's ``adapter_config.json`` dict and PEFT-keyed tensors.

    The model (only read) may be None: the sizes come from the tensors and the task type from
    the model class the native config records.

    Raises:
        CheckpointError: what PEFT cannot hold: a prefix adapter without ``shift_positions``
            (PEFT always shifts the real tokens' positions), or a model whose task type PEFT does
            not prepend virtual tokens for.
    """
    method = native_config.get("method")
    if method == "prompt":
        return _prompt_from_native(model, native_config, tensors)
    if method == "prefix":
        return _prefix_from_native(model, native_config, tensors)
    raise CheckpointError(f"from_native of prompt/prefix tuning got a {method!r} adapter")


def _prompt_from_native(model: nn.Module | None, native_config: dict[str, Any],
                        tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from peftcore.tuners.prompt.config import PromptConfig

    options = PromptConfig(**native_config.get("options", {}))
    out = _trainable_to_peft(native_config, tensors, (_PROMPT_KEY,), "prompt")
    embeddings = tensors[_PROMPT_KEY]
    config = _peft_common(model, native_config, "PROMPT_TUNING", options.virtual_tokens, "prompt")
    init = {"random": "RANDOM"}.get(options.init, "SAMPLE_VOCAB")
    text = options.init if options.is_text and isinstance(options.tokenizer, str) else None
    config.update({
        "token_dim": int(embeddings.shape[1]),
        "prompt_tuning_init": "TEXT" if text else init,
        "prompt_tuning_init_text": text,
        "tokenizer_name_or_path": options.tokenizer if text else None,
        "tokenizer_kwargs": None,
    })
    out[_KEY] = embeddings
    return config, out


def _prefix_from_native(model: nn.Module | None, native_config: dict[str, Any],
                        tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from peftcore.tuners.prefix.config import PrefixConfig

    options = PrefixConfig(**native_config.get("options", {}))
    if not options.shift_positions:
        raise CheckpointError(
            "PEFT's format cannot hold this prefix adapter with the same outputs: it was made with "
            "shift_positions=False (the real tokens keep positions 0..T-1), while PEFT's prefix tuning always puts them "
            "behind the prefix (P..P+T-1). Save it with format='peftcore', or train with "
            "peftcore.wrap(model, 'prefix', shift_positions=True) to write PEFT's format"
        )
    out = _trainable_to_peft(native_config, tensors, _PREFIX_KEYS, "prefix")
    keys, values = tensors[_PREFIX_KEYS[0]], tensors[_PREFIX_KEYS[1]]  # (L, kvh, P, d) each
    layers, kv_heads, tokens, head_dim = keys.shape
    flat = torch.stack([keys, values]).permute(3, 1, 0, 2, 4).reshape(tokens, layers * 2 * kv_heads * head_dim)
    config = _peft_common(model, native_config, "PREFIX_TUNING", tokens, "prefix")
    token_dim = kv_heads * head_dim
    config.update({
        "num_layers": layers,
        "num_attention_heads": kv_heads,  # PEFT counts key/value heads under grouped-query attention
        "token_dim": token_dim,
        "encoder_hidden_size": options.projection or token_dim,
        "prefix_projection": options.projection is not None,
        "init_weights": None,
    })
    out[_KEY] = flat.contiguous()
    return config, out
