"""Saving and loading adapters: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

Two formats share the file names. peftcore's native one: tensor keys are ``<module path>.<tensor
name>`` without the adapter name, e.g. ``bert.encoder.layer.0.attention.self.query.lora_A``; the
weights of ``trainable=`` modules keep their ordinary state-dict keys (``classifier.weight``).
HF PEFT's (``adapter_config.json`` with a ``peft_type``): converted to and from the native form
by :mod:`peftcore.formats.peft`, a renaming of keys. :func:`load` reads both (and Hub repository
ids); :func:`save` writes PEFT's format where it holds the adapter without loss (LoRA, DoRA) and
the native one otherwise, unless ``format=`` says which (docs/interop.md).

Writes are crash-safe and reads are verified (see :mod:`peftcore.files`): the directory is written
whole beside the target and swapped into place in one step, with a ``SHA256SUMS`` file that
:func:`load` checks before it changes the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcore import files, lifecycle, registry, targeting
from peftcore.errors import AdapterStateError, CheckpointError, PeftcoreError, PluginError
from peftcore.hub import resolve

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "peftcore-adapter"
FORMAT_VERSION = 1


def _pick_adapter(state: lifecycle.PeftState, name: str | None) -> str:
    if name is not None:
        lifecycle._record(state, name)
        return name
    if len(state.adapters) == 1:
        return next(iter(state.adapters))
    if len(state.active) == 1:
        return state.active[0]
    raise AdapterStateError(
        f"the model holds several adapters ({', '.join(state.adapters)}); pass name=... to say which to save"
    )


def _model_class(model: nn.Module) -> str:
    cls = _unsharded_class(type(model))
    return f"{cls.__module__}.{cls.__qualname__}"


def _trainable_tensors(model: nn.Module, state: lifecycle.PeftState, record: lifecycle.AdapterRecord) -> dict[str, torch.Tensor]:
    adapter_ids = {id(p) for ps in lifecycle._all_adapter_params(model, state).values() for p in ps}
    tensors: dict[str, torch.Tensor] = {}
    for path in record.trainable:
        module = targeting.get_module(model, path)
        for key, tensor in module.state_dict(prefix=f"{path}.", keep_vars=True).items():
            if id(tensor) not in adapter_ids:
                tensors[key] = tensor.detach()
    return tensors


def _config_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _config_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_config_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _config_json(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise CheckpointError(f"cannot write option value {value!r} ({type(value).__name__}) to JSON")


FORMATS = ("peft", "peftcore")


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None, format: str | None = None) -> Path:
    """Writes one adapter (and its ``trainable=`` modules) to a directory; never the frozen base.

    Under a ``torch.distributed`` process group of several ranks, only global rank 0 writes (the
    others return the path); tensors sharded by FSDP2 are gathered first, which is a collective,
    so a sharded model is saved by calling this on every rank (docs/distributed.md).

    Args:
        model: a wrapped model, or a ``DistributedDataParallel``/``DataParallel`` around one.
        path: the directory to write. An existing peftcore adapter directory is replaced
            atomically; any other existing non-empty directory or file is an error.
        name: which adapter; optional when the model holds one adapter or one active adapter.
        format: ``"peft"`` (HF PEFT's, which ``PeftModel.from_pretrained`` loads),
            ``"peftcore"`` (native), or ``None``: PEFT's for LoRA and DoRA adapters it holds
            without loss (peftcore-only options ride in the config key ``"peftcore"``), native
            for everything else (the bottleneck adapter, plugin methods, ``init="pissa"``, ...).

    Returns:
        The directory's path.

    Raises:
        AdapterStateError: not wrapped, or several adapters and no ``name``.
        CheckpointError: ``path`` holds something else, or ``format="peft"`` and PEFT's
            format cannot hold the adapter (the message says why).
    """
    from peftcore import __version__
    model = lifecycle.parallel_inner(model)  # DDP / DataParallel: the wrapped model inside
    if format not in (None, *FORMATS):
        raise CheckpointError(f"unknown adapter format {format!r}; pass one of {', '.join(FORMATS)} (or None: the default)")
    state = lifecycle.get_state(model)
    name = _pick_adapter(state, name)
    record = state.adapters[name]
    method = registry.get_method(record.method)
    target = Path(path)
    _check_destination(target)

    adapter_tensors = method.adapter_state(model, name)
    extra = _trainable_tensors(model, state, record)
    clash = sorted(set(adapter_tensors) & set(extra))
    if clash:
        raise CheckpointError(f"adapter and trainable= module tensors share the key {clash[0]!r}")
    tensors = {k: _full(t).detach().to("cpu").contiguous().clone() for k, t in {**adapter_tensors, **extra}.items()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in adapter_tensors.values()})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": record.method,
        "name": name,
        "options": _config_json(record.config),
        "targets": record.targets,
        "trainable": record.trainable,
        "trainable_keys": sorted(extra),
        "provider": record.provider,
        "peftcore_version": __version__,
        "torch_version": torch.__version__,
        "base_model": {
            "class": _model_class(model),
            "name_or_path": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        },
        "dtype": dtypes,
        "target_kinds": _target_kinds(model, record.targets),
    }
    from peftcore.formats import peft

    if not _writes_here():
        return target
    if format == "peft" or (format is None and record.method in peft.DEFAULT_PEFT_METHODS):
        try:
            _write(target, *peft.from_native(model, config, tensors), peft=True)
            return target
        except CheckpointError:
            if format == "peft":
                raise
    _write(target, config, tensors, peft=False)
    return target


def _target_kinds(model: nn.Module, targets: list[str]) -> dict[str, str]:
    from peftcore.formats.peft_lora import target_kinds

    return target_kinds(model, targets)


def _write(target: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], peft: bool) -> None:
    from safetensors.torch import save as save_tensors

    tensors = {k: t.contiguous() for k, t in tensors.items()}
    metadata = {"format": "pt"} if peft else {"format": FORMAT, "method": config["method"]}
    weights = save_tensors(tensors, metadata=metadata)
    files.write_dir(target, {WEIGHTS_FILE: weights, CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode("utf-8")})


def _is_adapter_dir(path: Path) -> bool:
    try:
        with open(path / CONFIG_FILE, encoding="utf-8") as fh:
            config = json.load(fh)
        return config.get("format") == FORMAT or "peft_type" in config
    except (OSError, ValueError, AttributeError):
        return False


def _check_destination(target: Path) -> None:
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise CheckpointError(f"cannot save an adapter to {str(target)!r}: it is a file; pass a directory path")
    if target.is_dir() and any(target.iterdir()) and not _is_adapter_dir(target):
        raise CheckpointError(
            f"{str(target)!r} exists and is not an adapter directory (peftcore's or HF PEFT's); peftcore will not overwrite "
            "it. Pass a new or empty directory"
        )


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter directory, checked for format and checksum.

    Raises:
        CheckpointError: the directory or file is missing, unreadable, damaged, or not a peftcore adapter.
    """
    directory = Path(path)
    return _read_config(directory, _checksums(directory))


def _checksums(directory: Path) -> dict[str, str] | None:
    if not directory.is_dir():
        raise CheckpointError(f"no adapter directory at {str(directory)!r}")
    return files.checksums(directory)


def _read_config(directory: Path, sums: dict[str, str] | None) -> dict[str, Any]:
    config = _read_json(directory, sums)
    _check_native(config, directory / CONFIG_FILE)
    return config


def _read_json(directory: Path, sums: dict[str, str] | None) -> Any:
    file = directory / CONFIG_FILE
    try:
        config = json.loads(files.read_verified(directory, CONFIG_FILE, sums))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{str(directory)!r} has no {CONFIG_FILE}; is it an adapter saved by peftcore.save?") from exc
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot read {str(file)!r}: {exc}") from exc
    return config


def _check_native(config: Any, file: Path) -> None:
    if isinstance(config, dict) and "peft_type" in config:
        raise CheckpointError(f"{str(file)!r} is HF PEFT's adapter config, not peftcore's; peftcore.load reads it, "
                              "and peftcore convert --to peftcore rewrites it")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(file)!r} is neither a peftcore adapter config (format {FORMAT!r}) nor HF PEFT's (a peft_type)"
        )
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(file)!r} has format version {config['format_version']}, newer than this peftcore reads "
            f"({FORMAT_VERSION}); upgrade peftcore"
        )
    for key in ("method", "name", "options", "targets"):
        if key not in config:
            raise CheckpointError(f"{str(file)!r} lacks the field {key!r}")
    for key in ("targets", "trainable"):
        paths = config.get(key, [])
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise CheckpointError(f"{str(file)!r} lists {repeated[0]!r} more than once in {key!r}; the file is malformed")


def _read_tensors(directory: Path, sums: dict[str, str] | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    file = directory / WEIGHTS_FILE
    try:
        return load_tensors(files.read_verified(directory, WEIGHTS_FILE, sums))
    except FileNotFoundError as exc:
        pickled = ""
        if (directory / "adapter_model.bin").exists():
            pickled = (" (only adapter_model.bin, a pickle, which peftcore does not read: re-save it with PEFT's "
                       "save_pretrained(..., safe_serialization=True))")
        raise CheckpointError(f"{str(directory)!r} has no {WEIGHTS_FILE}{pickled}") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot read {str(file)!r}: {exc}") from exc


def _method_for(config: dict[str, Any], file: Path) -> Any:
    method_name = config["method"]
    try:
        return registry.get_method(method_name)
    except PluginError as exc:
        provider = config.get("provider") or {}
        dist, version = provider.get("distribution"), provider.get("version")
        if method_name not in registry.METHODS and dist and dist != "peftcore":
            from peftcore.plugin import plugins_disabled

            disabled = " (or PEFTCORE_DISABLE_PLUGINS is set: unset it)" if plugins_disabled() else ""
            raise CheckpointError(
                f"the adapter in {str(file.parent)!r} was made by method {method_name!r} from the plugin "
                f"distribution {dist} {version}, which is not installed{disabled}; install it (pip install {dist}) and load again"
            ) from exc
        raise CheckpointError(f"cannot load the adapter in {str(file.parent)!r}: {exc}") from exc


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Attaches a saved adapter to a plain or already wrapped model; returns the same model object.

    The loaded adapter becomes the only active one. Method, targets and every tensor's key
    and shape are checked before the model counts as changed; on any mismatch the model is
    left exactly as it was.

    Args:
        model: the base model the adapter was trained on (plain or wrapped).
        path: an adapter directory in either format (written by :func:`save`, by HF PEFT's
            ``save_pretrained``, or converted), or a Hugging Face Hub repository id
            (``"org/name"``) resolved through ``huggingface_hub``'s cache (an existing local
            path of that name wins; ``HF_HUB_OFFLINE=1`` uses the cache only).
        name: the adapter's name on this model; default: the name it was saved under.

    Raises:
        CheckpointError: missing or malformed files, a method that is not installed, an HF PEFT
            adapter type or option peftcore does not read, a Hub id that cannot be resolved, or
            targets/tensors that do not fit the model (the first mismatches are named).
        AdapterStateError: the name is already taken on this model.
    """
    lifecycle._check_model(model)
    lifecycle._refuse_parallel_wrapper(model, "load")
    _check_not_sharded(model, path)
    directory = resolve(path)
    sums = _checksums(directory)
    config = _read_json(directory, sums)
    tensors = None
    if isinstance(config, dict) and "peft_type" in config:
        from peftcore.formats import peft

        config, tensors = peft.to_native(model, config, _read_tensors(directory, sums), str(directory))
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    _check_native(config, directory / CONFIG_FILE)
    method = _method_for(config, directory / CONFIG_FILE)
    name = name if name is not None else config["name"]
    lifecycle._check_name(name)
    state = lifecycle.get_state(model, required=False)
    if state is not None and name in state.adapters:
        raise AdapterStateError(
            f"the model already has an adapter named {name!r}; load this one under another name: "
            f"peftcore.load(model, path, name='other')"
        )
    try:
        options = method.config_class(**config["options"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the options in {str(directory / CONFIG_FILE)!r} are not valid for {method.name}: {exc}") from exc
    if tensors is None:
        tensors = _read_tensors(directory, sums)

    targets, trainable = list(config["targets"]), list(config.get("trainable", []))
    modules = dict(targeting.iter_modules(model))
    missing = [p for p in targets + trainable if p not in modules]
    if missing:
        raise CheckpointError(
            f"the adapter in {str(directory)!r} targets modules this {type(model).__name__} lacks: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (saved from {config.get('base_model', {}).get('class')})"
        )
    trainable_keys = set(config.get("trainable_keys", []))
    adapter_tensors = {k: v for k, v in tensors.items() if k not in trainable_keys}
    extra = {k: v for k, v in tensors.items() if k in trainable_keys}
    try:
        method.check_targets(model, options, targets)
    except PeftcoreError as exc:
        raise CheckpointError(f"the adapter in {str(directory)!r} does not fit this model: {exc}") from exc
    with lifecycle.transaction(model):
        lifecycle.attach(model, method, name, options, targets, trainable)
        try:
            method.load_adapter_state(model, name, adapter_tensors)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (loading {str(directory)!r})") from exc
        _load_trainable(model, trainable, extra, directory)
    return model


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, overwrite: bool = False) -> Path:
    """Rewrites the adapter directory ``src`` as ``dst`` in format ``to``, without a model.

    LoRA and DoRA convert from their files alone (module paths are in the keys). IA3, prompt
    and prefix tuning need the base model's geometry: load them with :func:`load` and write
    them with ``save(model, dst, format=...)``.

    Args:
        src: an adapter directory in either format, or a Hub repository id.
        dst: the directory to write; an existing one only with ``overwrite`` (and only if it is
            empty or an adapter directory; it is replaced atomically).
        to: ``"peft"`` or ``"peftcore"``.

    Raises:
        CheckpointError: ``dst`` exists and ``overwrite`` is false, ``to`` is unknown, the
            source is malformed, or the target format cannot hold the adapter (the message says why).
    """
    if to not in FORMATS:
        raise CheckpointError(f"unknown adapter format {to!r}; convert to one of {', '.join(FORMATS)}")
    source = resolve(src)
    target = Path(dst)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{str(target)!r} exists; pass overwrite=True (--overwrite) to replace it")
    _check_destination(target)
    sums = _checksums(source)
    config = _read_json(source, sums)
    tensors = _read_tensors(source, sums)
    from peftcore.formats import peft

    if isinstance(config, dict) and "peft_type" in config:
        if config["peft_type"] not in ("LORA",) and to == "peftcore":
            raise CheckpointError(
                f"converting the HF PEFT {config['peft_type']} adapter in {str(source)!r} needs the base model (its "
                "geometry decides the native layout): peftcore.load(model, SRC), then peftcore.save(model, DST, "
                "format='peftcore')"
            )
        if to == "peftcore":
            config, tensors = peft.to_native(None, config, tensors, str(source))
            config = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    else:
        _check_native(config, source / CONFIG_FILE)
        if to == "peft":
            if config["method"] in peft.methods() and config["method"] not in ("lora", "dora"):
                raise CheckpointError(
                    f"converting the {config['method']} adapter in {str(source)!r} to HF PEFT's format needs the base "
                    "model: peftcore.load(model, SRC), then peftcore.save(model, DST, format='peft')"
                )
            config, tensors = peft.from_native(None, config, tensors)
    _write(target, config, tensors, peft=to == "peft")
    return target


def _load_trainable(model: nn.Module, paths: list[str], tensors: dict[str, torch.Tensor], directory: Path) -> None:
    own: dict[str, torch.Tensor] = {}
    for path in paths:
        own.update(targeting.get_module(model, path).state_dict(prefix=f"{path}.", keep_vars=True))
    problems = [f"unexpected {k}" for k in tensors if k not in own]
    problems += [f"{k}: saved shape {tuple(v.shape)}, model has {tuple(own[k].shape)}" for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"the trainable-module weights in {str(directory)!r} do not fit the model: {'; '.join(problems[:5])}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(dtype=own[key].dtype, device=own[key].device))


# -- several processes (torch.distributed; see docs/distributed.md) -------------------------------
# save: an FSDP2-sharded tensor (DTensor) is gathered whole, which is a collective: every rank
# calls save. Under a process group of several ranks only global rank 0 writes (DDP ranks hold
# the same adapter; several writers would race for one directory); the others return the path.
# load: onto the model before fully_shard; a sharded model is refused with that order.


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _writes_here() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _unsharded_class(cls: type) -> type:
    # fully_shard swaps a module's class for a subclass FSDP<Name>(FSDPModule, <Name>)
    if cls.__name__.startswith("FSDP") and any(b.__name__ == "FSDPModule" for b in cls.__mro__):
        return next((b for b in cls.__bases__ if b.__name__ != "FSDPModule"), cls)
    return cls


def _check_not_sharded(model: nn.Module, path: Any) -> None:
    if any(_is_dtensor(p) for p in model.parameters()):
        raise CheckpointError(
            f"cannot load {str(path)!r} onto a model whose parameters are sharded (fully_shard / DTensor): load the "
            "adapter onto the model first, on every rank, then shard it (peftcore.load(model, path); fully_shard(...))"
        )
