"""HF PEFT's IA3 checkpoints <-> peftcore's ``ia3`` method (the ``peftcore-ia3`` plugin).

PEFT keeps one vector per adapted module, ``base_model.model.<path>.ia3_l``: ``(out, 1)`` for a
module whose output is scaled (keys, values), ``(1, in)`` for a feed-forward module whose input
is scaled. peftcore keeps the same vector flat, ``<path>.ia3_l`` of shape ``(out,)`` or
``(in,)``, and records which targets are feed-forward in ``options["feedforward"]``.

One difference in meaning: on GPT-2's packed ``c_attn`` PEFT scales all ``3 * n_embd`` outputs,
query included, where peftcore by default scales the key and value thirds only. Reading sets the
plugin's ``scale_packed_query=True``; writing an adapter without it pads the query third with
ones (the same outputs).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from peftcore import targeting
from peftcore.errors import CheckpointError
from peftcore.tuners.base import AdapterLayer
from peftcore.tuners.modules import is_hf_conv1d, is_linear

PEFT_TYPES = ("IA3",)
METHODS = ("ia3",)

#: What PEFT writes on every IA3 config; none of them changes what a loaded adapter computes
#: (``fan_in_fan_out`` PEFT itself corrects per module type; ``init_ia3_weights`` and
#: ``exclude_modules`` act before the saved vectors are loaded).
_OPTIONS = (
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
    "modules_to_save", "init_ia3_weights",
)
_MODEL_PREFIX = "base_model.model."
_SUFFIX = ".ia3_l"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM")


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of an ``nn.Linear`` or transformers ``Conv1D`` (weight ``(in, out)``)."""
    if is_hf_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    n_out, n_in = module.weight.shape
    return int(n_in), int(n_out)


def check_options(peft_config: dict[str, Any], supported: tuple[str, ...], what: str, source: str) -> None:
    """Refuses options peftcore does not know that are set to something other than None/False/empty.

    Raises:
        CheckpointError: names the first such option and lists the supported ones.
    """
    unknown = sorted(k for k, v in peft_config.items() if k not in supported and v not in (None, False, [], {}, ""))
    if unknown:
        raise CheckpointError(
            f"the {what} adapter in {source!r} sets {unknown[0]!r} = {peft_config[unknown[0]]!r}, which peftcore does not "
            f"implement; it reads the options {', '.join(supported)}"
        )


def trainable_from_peft(model: nn.Module | None, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                        prefix: str, source: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """PEFT's ``modules_to_save`` weights as peftcore ``trainable=`` module paths and state-dict keys.

    Args:
        tensors: the checkpoint's tensors that are not the method's own, PEFT-keyed.
        prefix: what PEFT puts before the model's own keys (``base_model.model.`` for layer
            methods, ``base_model.`` for prompt learning).

    Raises:
        CheckpointError: a tensor that belongs to no module named in ``modules_to_save``.
    """
    names = list(peft_config.get("modules_to_save") or [])
    modules = None if model is None else {p for p, _ in targeting.iter_modules(model)}
    trainable: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        native = key[len(prefix):] if key.startswith(prefix) else ""
        parts = native.split(".")
        # PEFT wraps the modules whose path ends with a modules_to_save name (the outermost, where nested)
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]
        owners = [p for p in owners if any(p == n or p.endswith(n) for n in names) and (modules is None or p in modules)]
        if not owners:
            raise CheckpointError(
                f"the adapter in {source!r} holds {key!r}, which is neither an adapter tensor nor a weight of a module "
                f"in modules_to_save ({', '.join(names) or 'none'}) of the model"
            )
        owner = owners[0]
        if owner not in trainable:
            trainable.append(owner)
        out[native] = tensor
    return trainable, out


def task_type(model: nn.Module | None, native_config: dict[str, Any] | None = None) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its class name (None for other modules).

    Without a model, the class recorded in a native config (``base_model.class``) is used.
    """
    if model is not None:
        name = type(model).__name__
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return "SEQ_2_SEQ_LM"
        is_transformers = hasattr(model, "config")
    else:
        recorded = str(((native_config or {}).get("base_model") or {}).get("class") or "")
        name = recorded.rsplit(".", 1)[-1]
        is_transformers = recorded.startswith("transformers.")
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if is_transformers and name.endswith("Model") else None


def base_model_name(model: nn.Module | None, native_config: dict[str, Any]) -> str | None:
    recorded = (native_config.get("base_model") or {}).get("name_or_path")
    own = getattr(getattr(model, "config", None), "_name_or_path", None)
    return recorded or own or None


def to_native(model: nn.Module | None, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
              source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT IA3 adapter as peftcore's native config and tensors; the model is only read.

    Without a model (``peftcore convert``) the targets and their kinds come from the keys and
    the vectors' shapes alone; ``peftcore.load`` checks them against the model.

    Raises:
        CheckpointError: an option peftcore does not implement, a target that is not ``nn.Linear``
            or ``Conv1D``, or vectors whose shapes do not fit the model's modules.
    """
    if peft_config.get("peft_type") != "IA3":
        raise CheckpointError(f"{source!r}: peft_type {peft_config.get('peft_type')!r} is not IA3")
    check_options(peft_config, _OPTIONS, "IA3", source)
    modules = None if model is None else dict(targeting.iter_modules(model))
    native: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    feedforward: list[str] = []
    packed = False
    others = {}
    for key, tensor in tensors.items():
        if not (key.startswith(_MODEL_PREFIX) and key.endswith(_SUFFIX)):
            others[key] = tensor
            continue
        path = key[len(_MODEL_PREFIX):-len(_SUFFIX)]
        shape = tuple(tensor.shape)
        if modules is None:
            if len(shape) != 2 or 1 not in shape:
                raise CheckpointError(f"the IA3 vector {key!r} in {source!r} has shape {shape}; (out, 1) or (1, in) expected")
            if shape[0] == 1 and shape[1] != 1:
                feedforward.append(path)
            else:
                # PEFT scales every output; only a packed c_attn is scaled in part by peftcore's default
                packed = packed or path.rsplit(".", 1)[-1] == "c_attn"
            targets.append(path)
            native[path + _SUFFIX] = tensor.reshape(-1)
            continue
        if path not in modules:
            raise CheckpointError(f"the IA3 adapter in {source!r} scales {path!r}, which this {type(model).__name__} lacks")
        module = _base(modules[path])
        if not (is_linear(module) or is_hf_conv1d(module)):
            cls = type(module)
            raise CheckpointError(
                f"the IA3 adapter in {source!r} scales {path!r} ({cls.__module__}.{cls.__qualname__}); peftcore's ia3 "
                "supports torch.nn.Linear and transformers Conv1D targets (not Conv2d/Conv3d or quantized layers)"
            )
        n_in, n_out = _features(module)
        if shape == (1, n_in) and (n_in, n_out) != (1, 1):
            feedforward.append(path)
        elif shape == (n_out, 1):
            packed = packed or path.rsplit(".", 1)[-1] == "c_attn"  # the same rule as without a model
        else:
            raise CheckpointError(
                f"the IA3 vector {key!r} in {source!r} has shape {shape}; {path!r} takes ({n_out}, 1) (outputs scaled) "
                f"or (1, {n_in}) (a feed-forward module's input scaled)"
            )
        targets.append(path)
        native[path + _SUFFIX] = tensor.reshape(-1)
    if not targets:
        raise CheckpointError(f"the IA3 adapter in {source!r} holds no ia3_l vectors")
    _check_feedforward(peft_config, targets, feedforward, source)
    trainable, extra = trainable_from_peft(model, peft_config, others, _MODEL_PREFIX, source)
    native.update(extra)
    config = {
        "method": "ia3",
        "name": "default",
        "options": {"feedforward": feedforward, "scale_packed_query": packed},
        "targets": targets,
        "trainable": trainable,
        "trainable_keys": sorted(extra),
    }
    return config, native


def _check_feedforward(peft_config: dict[str, Any], targets: list[str], feedforward: list[str], source: str) -> None:
    """The vectors' shapes must say what ``feedforward_modules`` says (PEFT builds its layers from the config)."""
    selection = peft_config.get("feedforward_modules")
    if selection is None:
        return  # PEFT's default for the model type; the shapes are all there is to go by
    for path in targets:
        if isinstance(selection, str):
            declared = re.fullmatch(selection, path) is not None
        else:
            declared = any(path.endswith(name) for name in selection)
        if declared != (path in feedforward):
            raise CheckpointError(
                f"the IA3 adapter in {source!r}: feedforward_modules={selection!r} "
                f"{'includes' if declared else 'excludes'} {path!r}, but its vector has the other shape"
            )


def from_native(model: nn.Module | None, native_config: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A peftcore ``ia3`` adapter as PEFT's ``adapter_config.json`` dict and PEFT-keyed tensors.

    Args:
        model: the model the adapter belongs to (plain or wrapped; only read), or None, which
            is enough unless a packed ``c_attn`` needs its query third filled in.
        native_config: the native config dict (``method``, ``options``, ``targets``, ``trainable``, ...).
        tensors: native-keyed tensors, adapter and ``trainable=`` ones.

    Raises:
        CheckpointError: not an ia3 adapter, or tensors that do not fit its targets.
    """
    from peftcore_ia3.config import IA3Config
    from peftcore_ia3.method import IA3Method, _selected

    if native_config.get("method") != "ia3":
        raise CheckpointError(f"from_native of IA3 got a {native_config.get('method')!r} adapter")
    config = IA3Config(**native_config.get("options", {}))
    method = IA3Method()
    targets = list(native_config["targets"])
    trainable_keys = set(native_config.get("trainable_keys", []))
    out: dict[str, torch.Tensor] = {}
    feedforward: list[str] = []
    conv1d = []
    for path in targets:
        key = path + _SUFFIX
        if key not in tensors:
            raise CheckpointError(f"the ia3 adapter lacks the tensor {key!r} of its target {path!r}")
        vector = tensors[key].reshape(-1)
        if model is None:
            if _selected(config.feedforward, path):
                feedforward.append(path)
                out[_MODEL_PREFIX + key] = vector.reshape(1, -1)
                continue
            if path.rsplit(".", 1)[-1] == "c_attn" and not config.scale_packed_query:
                raise CheckpointError(
                    f"writing the ia3 target {path!r} in PEFT's format needs the model: a packed c_attn's query third, "
                    "which this adapter leaves unscaled, must be filled in, and only the module tells whether it is packed"
                )
            out[_MODEL_PREFIX + key] = vector.reshape(-1, 1)
            continue
        module = _base(targeting.get_module(model, path))
        conv1d.append(is_hf_conv1d(module))
        n_in, n_out = _features(module)
        spec = method.layer_spec(model, config, path)
        if spec.feedforward:
            feedforward.append(path)
            out[_MODEL_PREFIX + key] = vector.reshape(1, n_in)
            continue
        start, end = spec.out_slice if spec.out_slice is not None else (0, n_out)
        if vector.numel() != end - start:
            raise CheckpointError(f"the ia3 vector {key!r} has {vector.numel()} entries; {path!r} scales {end - start} outputs")
        # PEFT scales every output: the unscaled ones (the query third of a packed c_attn) get 1
        full = torch.cat([vector.new_ones(start), vector, vector.new_ones(n_out - end)])
        out[_MODEL_PREFIX + key] = full.reshape(n_out, 1)
    for key in trainable_keys:
        out[_MODEL_PREFIX + key] = tensors[key]
    unexpected = sorted(set(tensors) - trainable_keys - {p + _SUFFIX for p in targets})
    if unexpected:
        raise CheckpointError(f"the ia3 adapter holds tensors PEFT's IA3 has no place for: {', '.join(unexpected[:5])}")
    peft_config = {
        "peft_type": "IA3",
        "task_type": task_type(model, native_config),
        "base_model_name_or_path": base_model_name(model, native_config),
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "target_modules": targets,
        "exclude_modules": None,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": bool(conv1d) and all(conv1d),
        "modules_to_save": list(native_config.get("trainable") or []) or None,
        "init_ia3_weights": True,
    }
    return peft_config, out
