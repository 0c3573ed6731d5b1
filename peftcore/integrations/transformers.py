"""transformers: ``save_pretrained`` of a wrapped model also writes its adapters.

``peftcore.wrap`` and ``peftcore.load`` change a transformers model in place; it stays an instance of
its own class, so ``transformers.Trainer`` saves it (``save_model`` and every checkpoint) with
``model.save_pretrained(dir, state_dict=..., is_main_process=...)``. The class's method writes the
full state dict: the base weights under their original keys and the adapter tensors under theirs
(``transformer.h.0.attn.c_attn.lora_A.default``). ``resume_from_checkpoint`` and
``load_best_model_at_end`` load that file back into the wrapped model, adapter included; but
``from_pretrained(dir)`` builds a plain model and drops the adapter keys. So a wrapped model's
``save_pretrained`` first writes its adapters with :func:`peftcore.save`, into subdirectories (a
checkpoint directory holds other files, and ``peftcore.save`` replaces only a directory of its own)::

    <dir>/adapter/            the adapter, when the model holds one
    <dir>/adapters/<name>/    each adapter, when it holds several

and ``peftcore.load(base, "<dir>/adapter")`` puts it onto a fresh base.

The replacement method is an instance attribute of the wrapped model, set by :func:`install` when a
transformers model gets its first adapter and removed by :func:`uninstall` at ``unwrap``; neither
the model's class nor transformers is changed, and transformers is never imported here.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from torch import nn

ADAPTER_DIR = "adapter"
ADAPTERS_DIR = "adapters"
_ATTR = "save_pretrained"


def is_transformers_model(model: nn.Module) -> bool:
    """``model`` is a transformers ``PreTrainedModel`` (matched by class name and module, no import)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> list[Path]:
    """Writes every adapter of ``model`` with :func:`peftcore.save` below ``directory``.

    Args:
        model: a wrapped model.
        directory: a model directory (may hold other files); the adapter goes to
            ``directory/adapter`` when the model holds one adapter, else each adapter ``name`` to
            ``directory/adapters/<name>``.

    Returns:
        The adapter directories written.

    Raises:
        CheckpointError: a destination exists and is not a peftcore adapter directory.
    """
    import peftcore

    names = list(peftcore.adapters(model))
    directory = Path(directory)
    if len(names) == 1:
        targets = {names[0]: directory / ADAPTER_DIR}
    else:
        targets = {name: directory / ADAPTERS_DIR / name for name in names}
    written = []
    for name, target in targets.items():
        try:
            written.append(peftcore.save(model, target, name=name))
        except peftcore.CheckpointError as exc:
            raise peftcore.CheckpointError(
                f"cannot write adapter {name!r} of this wrapped {type(model).__name__} beside the model in "
                f"{str(directory)!r}: {exc}. save_pretrained (and so transformers.Trainer) writes it to "
                f"{str(target)!r}: move what is there away, or save to another directory"
            ) from exc
    return written


class SavePretrained:
    """``save_pretrained`` of one wrapped transformers model: its adapters, then the class's method.

    The adapters are written first, so a destination peftcore refuses (a file, a foreign
    ``adapter`` directory) raises before the model's own files are written; they are written only
    by the process that saves (``is_main_process``). The model holds this object and this object the model, so
    ``copy.deepcopy`` and pickling give a copy that saves its own adapters.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        import peftcore

        model = self.model
        original = type(model).save_pretrained.__get__(model)
        if peftcore.adapters(model) and _is_main_process(original, save_directory, args, kwargs):
            save_adapters(model, save_directory)
        return original(save_directory, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<save_pretrained of a peftcore-wrapped {type(self.model).__name__}: the model, then its adapters>"


def _is_main_process(original: Any, save_directory: Any, args: tuple, kwargs: dict) -> bool:
    try:
        bound = inspect.signature(original).bind(save_directory, *args, **kwargs)
    except (TypeError, ValueError):
        return True  # the class's method reports the bad call itself
    return bool(bound.arguments.get("is_main_process", True))


def install(model: nn.Module) -> None:
    """Gives a transformers ``model`` the adapter-writing ``save_pretrained``; other modules, and a
    model that already has its own instance-level ``save_pretrained``, are left as they are."""
    if is_transformers_model(model) and _ATTR not in model.__dict__:
        model.__dict__[_ATTR] = SavePretrained(model)


def uninstall(model: nn.Module) -> None:
    """Removes what :func:`install` set, so the class's ``save_pretrained`` applies again."""
    if isinstance(model.__dict__.get(_ATTR), SavePretrained):
        del model.__dict__[_ATTR]
