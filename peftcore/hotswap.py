"""Hot-swapping a LoRA adapter: another saved adapter's weights into an adapter's slot, in place.

Serving many fine-tunes often means one compiled model whose adapter changes between requests.
:func:`hotswap` copies a saved adapter's factors into the parameters of an adapter the model
already holds: no module, parameter or Python attribute that ``torch.compile`` guards on changes,
so a compiled model runs the new adapter without recompiling. A saved adapter of a smaller rank
is zero-padded to the slot's rank, and the ratio of its scale to the slot's is folded into ``B``
(the slot keeps its rank and alpha, so the products ``scale B A`` are exactly the new adapter's).
Anything else that differs (targets, a larger rank, the method, PiSSA, ``trainable=`` modules) is
refused before a tensor is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcore import lifecycle, registry, targeting
from peftcore.errors import AdapterStateError, CheckpointError


def _read(model: nn.Module, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """Config and tensors of a saved adapter (peftcore's format or HF PEFT's), as :func:`peftcore.load` reads them."""
    from peftcore import persistence
    from peftcore.hub import resolve

    directory = resolve(path)
    sums = persistence._checksums(directory)
    config = persistence._read_json(directory, sums)
    tensors = None
    if isinstance(config, dict) and "peft_type" in config:
        from peftcore.formats import peft

        config, tensors = peft.to_native(model, config, persistence._read_tensors(directory, sums), str(directory))
    else:
        persistence._check_native(config, directory / persistence.CONFIG_FILE)
    if tensors is None:
        tensors = persistence._read_tensors(directory, sums)
    return config, tensors, directory


def _pad(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] == size:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def hotswap(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Replaces the weights of LoRA adapter ``name`` with those of the adapter saved at ``path``.

    Args:
        model: a wrapped model holding LoRA adapter ``name`` (compiled or not: pass the module
            that ``torch.compile`` wrapped, or the compiled one, whose parameters are the same).
        path: a directory written by :func:`peftcore.save` (or HF PEFT's LoRA format, or a Hub id).
        name: the adapter whose weights are replaced; its name, rank, alpha and state stay.

    Returns:
        ``model``.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
        AdapterStateError: the adapter is merged, or is not a LoRA adapter.
        CheckpointError: the saved adapter does not fit the slot (another method or targets, a
            larger rank than the slot's at some module, PiSSA init, ``trainable=`` modules); the
            message names the module. Nothing is written then.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module shares the parameters
    state = lifecycle.get_state(model)
    record = lifecycle._record(state, name)
    if record.method != "lora":
        raise AdapterStateError(f"hotswap replaces LoRA adapters; {name!r} is a {record.method!r} adapter")
    if record.merged:
        raise AdapterStateError(f"adapter {name!r} is merged into the base weights; call peftcore.unmerge(model) first")
    config, tensors, directory = _read(model, path)
    where = f"the adapter in {str(directory)!r}"
    if config.get("method") != "lora":
        raise CheckpointError(f"{where} is a {config.get('method')!r} adapter; hotswap puts LoRA adapters into LoRA slots")
    if config.get("trainable"):
        raise CheckpointError(f"{where} also trains whole modules ({', '.join(config['trainable'])}); hotswap replaces LoRA factors only")
    if sorted(config["targets"]) != sorted(record.targets):
        extra = sorted(set(config["targets"]) ^ set(record.targets))
        raise CheckpointError(f"{where} targets other modules than adapter {name!r} (differing: {', '.join(extra[:5])})")
    method = registry.get_method("lora")
    options = method.config_class(**config["options"])
    if options.init == "pissa" or record.config.init == "pissa":
        raise CheckpointError(f"{where}: PiSSA adapters change the base weights and cannot be hot-swapped")
    plan = []  # (A parameter, B parameter, new A, new B): checked whole before anything is written
    for path_ in record.targets:
        layer = targeting.get_module(model, path_)
        slot_A, slot_B = layer.lora_A[name], layer.lora_B[name]
        new_A, new_B = tensors.get(f"{path_}.lora_A"), tensors.get(f"{path_}.lora_B")
        if new_A is None or new_B is None:
            raise CheckpointError(f"{where} lacks the factors of {path_!r}")
        r_slot, r_new = slot_A.shape[0], new_A.shape[0]
        fits = (
            new_A.shape[1:] == slot_A.shape[1:] and new_B.dim() == slot_B.dim() and new_B.shape[0] == slot_B.shape[0]
            and new_B.shape[2:] == slot_B.shape[2:] and new_B.shape[1] == r_new
        )
        if not fits or r_new > r_slot:
            raise CheckpointError(
                f"{where} does not fit adapter {name!r} at {path_!r}: saved A {tuple(new_A.shape)} and B "
                f"{tuple(new_B.shape)}, the slot holds A {tuple(slot_A.shape)} and B {tuple(slot_B.shape)} "
                f"(a saved rank may be smaller than the slot's, then it is zero-padded, never larger: wrap the "
                f"slot with rank >= {r_new})"
            )
        ratio = method.layer_config(options, path_).scale / layer.lora_config[name].scale
        plan.append((slot_A, slot_B, _pad(new_A, 0, r_slot), _pad(new_B.double() * ratio, 1, r_slot)))
    with torch.no_grad():
        for slot_A, slot_B, new_A, new_B in plan:
            slot_A.copy_(new_A.to(slot_A.dtype))
            slot_B.copy_(new_B.to(slot_B.dtype))
    return model
