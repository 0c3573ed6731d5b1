"""Saving and loading the parameters a layer strategy trained (the frozen rest is never written).

PEFT strategies save through :func:`peftcore.save`; the layer strategies (full, partial, ...)
change the model's own weights, so their run directory holds ``weights.safetensors``: the
trained parameters under their ordinary state-dict names, loadable onto the base model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from peftcore.errors import CheckpointError

WEIGHTS_FILE = "weights.safetensors"


def save_weights(params: Sequence[tuple[str, nn.Parameter]], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Writes ``params`` to a safetensors file (written to a temporary name, then renamed).

    Args:
        params: ``(name, parameter)`` pairs, e.g. ``plan.named_parameters()``.
        path: the file to write.
        metadata: string metadata stored in the file's header (e.g. the strategy).

    Returns:
        The file's path.
    """
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").contiguous().clone() for name, p in params}
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@torch.no_grad()
def load_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copies saved parameters into ``model``; every key and shape is checked before any copy.

    Returns:
        The names of the parameters loaded.

    Raises:
        CheckpointError: the file is missing or unreadable, or holds a name the model lacks or
            a shape that differs (the model is then unchanged).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    try:
        tensors = load_file(str(file))
    except FileNotFoundError as exc:
        raise CheckpointError(f"no weights file at {str(file)!r}") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(file)!r}: {exc}") from exc
    own = dict(model.named_parameters())
    problems = [f"{k}: not a parameter of {type(model).__name__}" for k in tensors if k not in own]
    problems += [f"{k}: saved shape {tuple(v.shape)}, model has {tuple(own[k].shape)}"
                 for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"the weights in {str(file)!r} do not fit the model: {'; '.join(problems[:5])}")
    for key, value in tensors.items():
        own[key].copy_(value.to(dtype=own[key].dtype, device=own[key].device))
    return list(tensors)
