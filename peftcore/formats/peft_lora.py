"""HF PEFT's LoRA checkpoints <-> peftcore's ``lora`` method (and ``use_dora`` <-> the ``dora`` plugin).

peftcore's LoRA factors have PEFT's shapes, so conversion renames keys:

==============================================================  ======================================
PEFT (``adapter_model.safetensors``)                            peftcore
==============================================================  ======================================
``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``   ``<path>.lora_A`` / ``lora_B``
``base_model.model.<path>.lora_embedding_A`` / ``_B``           ``<path>.lora_A`` / ``lora_B``
``base_model.model.<path>.lora_magnitude_vector`` (DoRA)        ``<path>.lora_magnitude_vector``
``base_model.model.<key>`` of a ``modules_to_save`` module      ``<key>`` of a ``trainable=`` module
==============================================================  ======================================

Reading needs no model: the targets are the paths in the keys, each target's rank is its
factors' shape (checked against ``r`` and ``rank_pattern``), and ``target_modules``,
``layers_to_transform``, ``layers_pattern`` and ``exclude_modules`` only chose, at training time,
which modules carry those keys. ``rank_pattern``/``alpha_pattern`` become the same options of
peftcore's LoRA (same matching rule). Writing needs to know which 2-D targets are embeddings
(their keys differ): from the model, or from the ``target_kinds`` a native config records.

peftcore-only facts (the backend, the init, the adapter's name, provider and versions) travel in
the extra config key ``"peftcore"``, which PEFT drops with a warning when it loads the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from peftcore import targeting
from peftcore.errors import CheckpointError, ConfigError, PluginError
from peftcore.formats.peft_ia3 import check_options

PEFT_TYPES = ("LORA",)
METHODS = ("lora", "dora")

EXTRA_KEY = "peftcore"  # the config key with what PEFT has no field for
_MODEL_PREFIX = "base_model.model."
#: PEFT key suffix -> (peftcore tensor name, kind of layer it implies: None = any).
_SUFFIXES = {
    ".lora_A.weight": ("lora_A", None),
    ".lora_B.weight": ("lora_B", None),
    ".lora_embedding_A": ("lora_A", "embedding"),
    ".lora_embedding_B": ("lora_B", "embedding"),
    ".lora_magnitude_vector": ("lora_magnitude_vector", None),
    ".lora_magnitude_vector.weight": ("lora_magnitude_vector", None),  # PEFT 0.11's layout
}
#: LoRA options read. The ones that only chose targets, or that act before the saved tensors
#: are loaded (initialisation, fan_in_fan_out which PEFT corrects per module type) change no output.
_OPTIONS = (
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "init_lora_weights",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "modules_to_save", "fan_in_fan_out", "loftq_config", "megatron_core", "qalora_group_size", EXTRA_KEY,
)
#: ``init_lora_weights`` values whose effect ends when the saved factors are loaded. PiSSA, OLoRA,
#: CorDA and LoftQ also change the base weights, which the saved adapter does not hold.
_INITS = {True: "default", False: "default", "gaussian": "gaussian", "eva": "default", "orthogonal": "default"}
#: What PEFT's format has a field for; other native options go to the extra key.
_PEFT_HELD = ("rank", "alpha", "dropout", "rslora", "rank_pattern", "alpha_pattern")
_DORA_PLUGIN = "peftcore-dora"


def _fail(source: str, message: str) -> CheckpointError:
    return CheckpointError(f"the HF PEFT LoRA adapter in {source!r}: {message}")


_Tensors = dict[str, torch.Tensor]


def _split_keys(tensors: _Tensors, source: str) -> tuple[dict[str, _Tensors], dict[str, str], _Tensors, _Tensors]:
    """``{path: {tensor name: tensor}}``, the kinds the keys imply, the base-layer copies
    (``<path>.base_layer.<name>``, by native key) and the other tensors (modules_to_save)."""
    per_path: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    others: dict[str, torch.Tensor] = {}
    base_copies: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(_MODEL_PREFIX) and ".base_layer." in key:
            base_copies[key[len(_MODEL_PREFIX):].replace(".base_layer.", ".", 1)] = tensor
            continue
        suffix = next((s for s in _SUFFIXES if key.startswith(_MODEL_PREFIX) and key.endswith(s)), None)
        if suffix is None:
            if key.startswith(_MODEL_PREFIX) and (".lora_" in key):
                raise _fail(source, f"holds {key!r}, a LoRA tensor peftcore has no place for (lora_bias and "
                                    "trainable tokens are not supported)")
            others[key] = tensor
            continue
        path = key[len(_MODEL_PREFIX):-len(suffix)]
        name, kind = _SUFFIXES[suffix]
        if name in per_path.setdefault(path, {}):
            raise _fail(source, f"holds {name} of {path!r} twice")
        per_path[path][name] = tensor
        if kind is not None:
            kinds[path] = kind
        elif name == "lora_A":
            kinds.setdefault(path, "conv" if tensor.dim() > 2 else "linear")
    return per_path, kinds, base_copies, others


def _check_base_copies(model: nn.Module | None, copies: dict[str, torch.Tensor], source: str) -> None:
    """PEFT saves an adapted embedding's whole weight beside its factors (``save_embedding_layers``,
    in case the vocabulary was resized). peftcore adapts an unchanged base: the copies must equal
    the model's weights, and are then dropped (without a model they are dropped unchecked)."""
    if model is None:
        return
    own = model.state_dict()
    for key, tensor in copies.items():
        mine = own.get(key)
        if mine is None or mine.shape != tensor.shape or not torch.equal(mine.detach().cpu().to(tensor.dtype), tensor):
            if mine is None:
                what = "lacks it"
            else:
                what = f"has {tuple(mine.shape)}" if mine.shape != tensor.shape else "holds other values"
            raise _fail(source, f"holds a full copy of the base weight {key!r} (PEFT's save_embedding_layers), and this "
                                f"{type(model).__name__} {what}; peftcore adapts an unchanged base model, so load the "
                                "adapter onto the base it was trained on (with its resized vocabulary, if any)")


def _trainable(peft_config: dict[str, Any], others: _Tensors, source: str) -> tuple[list[str], _Tensors]:
    """``modules_to_save`` weights as ``trainable=`` module paths and their ordinary state-dict keys.

    The module of a key is the shortest leading part of it that PEFT's rule
    (``path.endswith(name)``) matches to a name in ``modules_to_save``; no model needed.
    """
    names = list(peft_config.get("modules_to_save") or [])
    trainable: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for key, tensor in others.items():
        native = key[len(_MODEL_PREFIX):] if key.startswith(_MODEL_PREFIX) else None
        parts = native.split(".") if native else []
        owner = None
        for i in range(1, len(parts)):
            candidate = ".".join(parts[:i])
            if any(candidate.endswith(n) for n in names):  # PEFT's rule: "pre_classifier" matches "classifier"
                owner = candidate
                break
        if owner is None:
            raise _fail(source, f"holds {key!r}, which is neither a LoRA tensor nor a weight of a module in "
                                f"modules_to_save ({', '.join(names) or 'none'})")
        if owner not in trainable:
            trainable.append(owner)
        out[native] = tensor
    return trainable, out


def _check_dora_plugin(source: str) -> None:
    from peftcore import registry

    try:
        registry.get_method("dora")
    except PluginError as exc:
        raise _fail(source, f"use_dora=True needs peftcore's dora method from the plugin {_DORA_PLUGIN}, which is "
                            f"not installed (pip install {_DORA_PLUGIN}) or is disabled (PEFTCORE_DISABLE_PLUGINS)") from exc


def to_native(model: nn.Module | None, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
              source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT LoRA (or DoRA) adapter as peftcore's native config and tensors; needs no model.

    Args:
        model: the base model, used only to list the targets in the model's order; may be None.
        peft_config: the parsed ``adapter_config.json``.
        tensors: its PEFT-keyed tensors.
        source: where it came from, for messages.

    Raises:
        CheckpointError: ``bias`` other than ``"none"``, an ``init_lora_weights`` that changes
            the base weights, an option peftcore does not implement, DoRA without the plugin or
            with options it lacks, or factors whose ranks contradict ``r``/``rank_pattern``.
    """
    if peft_config.get("peft_type") != "LORA":
        raise _fail(source, f"peft_type {peft_config.get('peft_type')!r} is not LORA")
    config = dict(peft_config)
    if not config.get("use_qalora"):
        config.pop("qalora_group_size", None)
    if not config.get("megatron_config"):
        config.pop("megatron_core", None)
    check_options(config, _OPTIONS, "LORA", source)
    bias = config.get("bias", "none")
    if bias != "none":
        raise _fail(source, f"bias={bias!r} is not supported: peftcore's LoRA trains no biases; it reads bias='none'")
    init = config.get("init_lora_weights", True)
    if init not in _INITS:
        raise _fail(source, f"init_lora_weights={init!r} is not supported: it changes the base weights, which the "
                            f"adapter does not hold (convert it to plain LoRA with PEFT first); peftcore reads "
                            f"{', '.join(repr(i) for i in _INITS)}")
    if config.get("loftq_config"):
        raise _fail(source, "loftq_config is not supported (LoftQ changes the base weights)")
    dora = bool(config.get("use_dora"))
    extra_config = peft_config.get(EXTRA_KEY) if isinstance(peft_config.get(EXTRA_KEY), dict) else {}

    per_path, kinds, base_copies, others = _split_keys(tensors, source)
    _check_base_copies(model, base_copies, source)
    if not per_path:
        raise _fail(source, "holds no lora_A/lora_B tensors")
    # The model's module order where there is a model, else layer numbers in numeric order.
    paths = sorted(per_path, key=lambda p: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in p.split(".")])
    if model is not None:
        order = {p: i for i, (p, _) in enumerate(targeting.iter_modules(model))}
        paths.sort(key=lambda p: order.get(p, len(order)))
    expected = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if dora else set())
    for path in paths:
        have = set(per_path[path])
        if have != expected:
            wrong = sorted(expected - have) or sorted(have - expected)
            raise _fail(source, f"{path!r} has {', '.join(sorted(have))}; a {'DoRA' if dora else 'LoRA'} target has "
                                f"{', '.join(sorted(expected))} ({', '.join(wrong)} {'missing' if expected - have else 'unexpected'})")

    options = _lora_options(config, per_path, paths, source)
    if dora:
        _check_dora_plugin(source)
        if options.pop("rslora"):
            raise _fail(source, "use_rslora with use_dora is not supported: the dora plugin scales by alpha / r")
        for field in ("rank_pattern", "alpha_pattern"):
            if options.pop(field):
                raise _fail(source, f"{field} with use_dora is not supported: the dora plugin has one rank and alpha per adapter")
        options.pop("init")
    else:
        recorded = extra_config.get("options") if isinstance(extra_config.get("options"), dict) else {}
        options.update({k: v for k, v in recorded.items() if k not in _PEFT_HELD})

    native = {
        path + "." + name: tensor for path in paths for name, tensor in per_path[path].items()
    }
    trainable, extra = _trainable(config, others, source)
    native.update(extra)
    result: dict[str, Any] = {
        "method": "dora" if dora else "lora",
        "name": extra_config.get("name") or "default",
        "options": options,
        "targets": paths,
        "trainable": trainable,
        "trainable_keys": sorted(extra),
        "target_kinds": {p: kinds[p] for p in paths},
    }
    for key in ("provider", "peftcore_version", "torch_version", "dtype"):
        if key in extra_config:
            result[key] = extra_config[key]
    result["base_model"] = extra_config.get("base_model") or {
        "class": _auto_mapping_class(config.get("auto_mapping")), "name_or_path": config.get("base_model_name_or_path") or "",
    }
    return result, native


def _auto_mapping_class(auto_mapping: Any) -> str:
    """The base model's class as PEFT records it (``auto_mapping``), for messages."""
    if isinstance(auto_mapping, dict) and auto_mapping.get("base_model_class"):
        library = auto_mapping.get("parent_library")
        return f"{library}.{auto_mapping['base_model_class']}" if library else str(auto_mapping["base_model_class"])
    return "an unrecorded class (HF PEFT adapter)"


def _lora_options(config: dict[str, Any], per_path: dict[str, dict[str, torch.Tensor]], paths: list[str],
                  source: str) -> dict[str, Any]:
    """peftcore LoRA options from PEFT's, checked against the factors' ranks."""
    from peftcore.tuners.lora.config import LoraConfig

    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    options = {
        "rank": rank,
        "alpha": alpha,
        "dropout": config.get("lora_dropout") or 0.0,
        "rslora": bool(config.get("use_rslora")),
        "init": _INITS[config.get("init_lora_weights", True)],
        "rank_pattern": dict(config.get("rank_pattern") or {}),
        "alpha_pattern": dict(config.get("alpha_pattern") or {}),
    }
    try:
        checked = LoraConfig(**options)
    except (ConfigError, TypeError) as exc:
        raise _fail(source, f"its options are not valid for peftcore's LoRA: {exc}") from exc
    for path in paths:
        want = checked.for_module(path).rank
        A, B = per_path[path]["lora_A"], per_path[path]["lora_B"]
        if A.shape[0] != want or B.shape[1] != want:
            raise _fail(source, f"{path!r} has factors of rank {A.shape[0]} (lora_A) and {B.shape[1]} (lora_B), but "
                                f"r={rank} and rank_pattern={options['rank_pattern']} give it rank {want}")
    return options


# -- writing -----------------------------------------------------------------------------------------
def target_kinds(model: nn.Module, paths: list[str]) -> dict[str, str]:
    """``{path: kind}`` of the modules at ``paths``: ``linear``, ``conv1d`` (transformers Conv1D),
    ``embedding``, ``conv`` or ``other`` (what HF PEFT's LoRA keys and options depend on)."""
    from peftcore.tuners.base import AdapterLayer
    from peftcore.tuners.modules import is_hf_conv1d

    kinds = {}
    for path in paths:
        module = targeting.get_module(model, path)
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        if is_hf_conv1d(base):
            kinds[path] = "conv1d"
        elif isinstance(base, nn.Embedding):
            kinds[path] = "embedding"
        elif isinstance(base, nn.Linear):
            kinds[path] = "linear"
        elif isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kinds[path] = "conv"
        else:
            kinds[path] = "other"
    return kinds


def task_type_of(class_name: str | None, model: nn.Module | None) -> str | None:
    """PEFT's ``task_type`` from the model, or from the recorded class name when there is no model."""
    from peftcore.formats.peft_ia3 import task_type

    if model is not None:
        return task_type(model)
    name = (class_name or "").rsplit(".", 1)[-1]
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _defaults(config_class: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def cannot_hold(native_config: dict[str, Any]) -> str | None:
    """Why PEFT's format cannot hold this LoRA/DoRA adapter without loss, or None."""
    method = native_config.get("method")
    options = dict(native_config.get("options") or {})
    if method == "lora":
        from peftcore.tuners.lora.config import LoraConfig

        if options.get("init") == "pissa":
            return ("init='pissa' keeps the initial factors to rebuild the residual base weight, which PEFT's format "
                    "has no place for")
        known = set(_PEFT_HELD) | {"init", "backend"}
        defaults = _defaults(LoraConfig)
    elif method == "dora":
        known = {"rank", "alpha", "dropout"}
        try:
            from peftcore_dora.config import DoraConfig
        except ImportError:  # converting a file without the plugin: only the options known here pass
            defaults = {}
        else:
            defaults = _defaults(DoraConfig)
    else:
        return f"method {method!r} is not LoRA or DoRA"
    # An option this module does not know may change what the adapter computes: only its default is safe.
    changed = sorted(k for k, v in options.items() if k not in known and (k not in defaults or defaults[k] != v))
    if changed:
        return f"the {method} option {changed[0]}={options[changed[0]]!r} has no equivalent in PEFT's LoRA"
    return None


def from_native(model: nn.Module | None, native_config: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A peftcore ``lora``/``dora`` adapter as PEFT's ``adapter_config.json`` dict and PEFT-keyed tensors.

    Args:
        model: the model the adapter belongs to (plain or wrapped), only read; may be None when
            ``native_config`` records ``target_kinds`` (peftcore writes them).
        native_config: the native config dict.
        tensors: native-keyed tensors, adapter and ``trainable=`` ones.

    Raises:
        CheckpointError: what PEFT's format cannot hold (init='pissa', an option PEFT lacks, a
            ``trainable=`` module that contains a target), or a target whose kind is unknown.
    """
    method = native_config.get("method")
    reason = cannot_hold(native_config)
    if reason:
        raise CheckpointError(f"HF PEFT's format cannot hold this adapter: {reason}; save it with format='peftcore'")
    options = dict(native_config.get("options") or {})
    targets = list(native_config.get("targets") or [])
    trainable = list(native_config.get("trainable") or [])
    trainable_keys = set(native_config.get("trainable_keys") or [])
    kinds = target_kinds(model, targets) if model is not None else dict(native_config.get("target_kinds") or {})
    for path in targets:
        for other in trainable:
            if path == other or path.startswith(other + ".") or other.startswith(path + "."):
                raise CheckpointError(
                    f"HF PEFT's format cannot hold this adapter: the trainable module {other!r} and the target {path!r} "
                    "overlap (PEFT's modules_to_save would replace the LoRA layer); save it with format='peftcore'"
                )
    names = ("lora_A", "lora_B") + (("lora_magnitude_vector",) if method == "dora" else ())
    out: dict[str, torch.Tensor] = {}
    for path in targets:
        kind = kinds.get(path)
        if kind is None and tensors.get(path + ".lora_A", torch.empty(0, 0)).dim() == 2:
            raise CheckpointError(
                f"cannot tell whether the target {path!r} is an embedding (PEFT names its factors differently); the "
                "adapter's config records no target_kinds: convert it with the base model (peftcore.load, then "
                "peftcore.save(..., format='peft'))"
            )
        if kind == "other":
            raise CheckpointError(f"HF PEFT's LoRA has no layer for the target {path!r}; save it with format='peftcore'")
        for name in names:
            key = f"{path}.{name}"
            if key not in tensors:
                raise CheckpointError(f"the {method} adapter lacks the tensor {key!r} of its target {path!r}")
            if kind == "embedding" and name != "lora_magnitude_vector":
                peft_key = f"{_MODEL_PREFIX}{path}.lora_embedding_{name[-1]}"
            elif name == "lora_magnitude_vector":
                peft_key = f"{_MODEL_PREFIX}{key}"
            else:
                peft_key = f"{_MODEL_PREFIX}{key}.weight"
            out[peft_key] = tensors[key]
    unexpected = sorted(set(tensors) - trainable_keys - {f"{p}.{n}" for p in targets for n in names})
    if unexpected:
        raise CheckpointError(f"HF PEFT's LoRA has no place for the tensors {', '.join(unexpected[:5])}; save with format='peftcore'")
    for key in trainable_keys:
        out[_MODEL_PREFIX + key] = tensors[key]

    base = native_config.get("base_model") or {}
    rank = options.get("rank", 8)
    alpha = options.get("alpha")
    alpha = float(2 * rank) if alpha is None else alpha
    recorded = ("method", "name", "provider", "peftcore_version", "torch_version", "base_model", "dtype")
    extra = {k: native_config[k] for k in recorded if k in native_config}
    extra["options"] = {k: v for k, v in options.items() if k not in _PEFT_HELD}
    extra["target_kinds"] = {p: kinds[p] for p in targets if p in kinds}
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type_of(base.get("class"), model),
        "base_model_name_or_path": base.get("name_or_path") or None,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "r": rank,
        "lora_alpha": _number(alpha),
        "lora_dropout": options.get("dropout", 0.0),
        "use_rslora": bool(options.get("rslora", False)),
        "use_dora": method == "dora",
        "bias": "none",
        "init_lora_weights": "gaussian" if options.get("init") == "gaussian" else True,
        "target_modules": targets,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(options.get("rank_pattern") or {}),
        "alpha_pattern": {k: _number(v) for k, v in (options.get("alpha_pattern") or {}).items()},
        "fan_in_fan_out": any(kinds.get(p) == "conv1d" for p in targets),
        "modules_to_save": trainable or None,
        EXTRA_KEY: extra,
    }
    return peft_config, out
