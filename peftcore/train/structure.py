"""A model's layer structure as the strategies see it: embeddings, blocks, top, task head.

Transformers models are read without any per-family table:

* **head**: the direct children of the model other than its base model
  (``model.base_model``, a public attribute of every ``PreTrainedModel``) that hold
  parameters, e.g. ``classifier`` (BERT), ``score`` (GPT-2 / Llama classifiers), ``lm_head``
  (causal LMs), ``pre_classifier`` + ``classifier`` (DistilBERT). A model without a separate
  base model falls back to modules named like heads (``classifier``, ``score``, ``head``, ...).
* **blocks**: the largest ``nn.ModuleList`` of same-type modules outside the head, e.g.
  ``bert.encoder.layer``, ``transformer.h``, ``model.layers``; bottom to top in list order.
* **embeddings**: every other parameter registered before the first block (token and position
  embeddings and their norm).
* **top**: every other parameter registered after the first block (BERT's pooler, GPT-2's
  ``ln_f``, Llama's final norm). Strategies treat it as part of the top block.

For other models pass ``blocks=`` (the dotted path of the block list, a regular expression
fully matching each block's path, or a list of block paths) and ``head=`` (module names,
suffixes, or a regular expression).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence, Union

from torch import nn

from peftcore.errors import TargetError

Names = Union[None, str, Sequence[str]]

#: Module names that mark a task head in models without a separate base model.
HEAD_NAMES = ("classifier", "pre_classifier", "score", "lm_head", "qa_outputs", "head", "cls", "output_layer")


@dataclasses.dataclass(frozen=True)
class ModelStructure:
    """Every parameter of a model, assigned to exactly one part.

    Attributes:
        embeddings: names of the parameters below the first block.
        blocks: per block, bottom to top, the names of its parameters.
        top: names of the parameters above the blocks that are not in the head.
        head: names of the task head's parameters.
        block_paths: module path of each block.
        head_paths: module paths that make up the head.
    """

    embeddings: tuple[str, ...]
    blocks: tuple[tuple[str, ...], ...]
    top: tuple[str, ...]
    head: tuple[str, ...]
    block_paths: tuple[str, ...]
    head_paths: tuple[str, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def layers(self) -> list[tuple[str, tuple[str, ...]]]:
        """Named layer groups from the bottom up: ``embeddings``, ``block.0`` ... (``top`` joins the
        last block), ``head``. Empty groups are left out."""
        groups = [("embeddings", self.embeddings)]
        for i, names in enumerate(self.blocks):
            extra = self.top if i == len(self.blocks) - 1 else ()
            groups.append((f"block.{i}", names + extra))
        groups.append(("head", self.head))
        return [(name, names) for name, names in groups if names]


def _param_names_under(model: nn.Module, path: str) -> list[str]:
    module = model.get_submodule(path)
    return [f"{path}.{name}" for name, _ in module.named_parameters()]


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _within(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TargetError(f"{what}={pattern!r} is not a valid regular expression: {exc}") from exc


def _select_modules(model: nn.Module, names: Names, what: str) -> list[str]:
    """Module paths named by a list of paths/suffixes or a regex string, in model order."""
    modules = [p for p, _ in model.named_modules() if p]
    if isinstance(names, str):
        regex = _compile(names, what)
        found = [p for p in modules if regex.fullmatch(p)]
        if not found:
            raise TargetError(f"{what}={names!r} matches no module of {type(model).__name__}; "
                              f"module paths look like {', '.join(modules[:6])}, ...")
        return found
    found = []
    for name in names or ():
        hits = [p for p in modules if p == name or p.endswith("." + name)]
        if not hits:
            raise TargetError(f"{what} name {name!r} matches no module of {type(model).__name__}; "
                              f"module paths look like {', '.join(modules[:6])}, ...")
        found += [h for h in hits if h not in found]
    return found


def find_head(model: nn.Module, head: Names = None) -> list[str]:
    """Module paths of the task head (see the module docstring for how it is found).

    Raises:
        TargetError: no head can be found, or ``head`` names nothing.
    """
    if head is not None:
        return _select_modules(model, head, "head")
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        found = [name for name, child in model.named_children() if child is not base and _has_params(child)]
        if found:
            return found
    found = [p for p, m in model.named_modules() if p and p.rsplit(".", 1)[-1] in HEAD_NAMES and _has_params(m)]
    # keep outermost matches only (``cls`` contains ``cls.predictions``...)
    found = [p for p in found if not _within(p, [q for q in found if q != p])]
    if not found:
        raise TargetError(
            f"cannot find the task head of {type(model).__name__}: it has no base_model and no module named "
            f"{', '.join(HEAD_NAMES)}; pass head=['<module name>']"
        )
    return found


def find_blocks(model: nn.Module, blocks: Names = None, head_paths: Sequence[str] = ()) -> list[str]:
    """Module paths of the blocks, bottom to top.

    Args:
        model: the model.
        blocks: ``None`` (find the largest list of same-type modules), the path of a
            ``ModuleList``, a regular expression matching each block's path, or a list of paths.
        head_paths: modules to leave out of the search.

    Raises:
        TargetError: nothing found, or ``blocks`` names nothing.
    """
    if isinstance(blocks, str):
        try:
            container = model.get_submodule(blocks)
        except AttributeError:
            container = None
        if isinstance(container, nn.ModuleList):
            return [f"{blocks}.{i}" for i in range(len(container))]
        return _select_modules(model, blocks, "blocks")
    if blocks is not None:
        return _select_modules(model, list(blocks), "blocks")
    best, best_size = None, 0
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or _within(path, head_paths):
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = path, size
    if best is None:
        raise TargetError(
            f"cannot find the blocks of {type(model).__name__} (no nn.ModuleList of same-type modules with "
            "parameters); pass blocks='<path of the block list>' or a regex matching each block"
        )
    return [f"{best}.{i}" for i in range(len(model.get_submodule(best)))]


def model_structure(model: nn.Module, *, blocks: Names = None, head: Names = None) -> ModelStructure:
    """Assigns every parameter of ``model`` to embeddings, a block, the top or the head.

    Args:
        model: a transformers-style model (or any module, with ``blocks`` and ``head`` given).
        blocks: overrides block discovery (see :func:`find_blocks`).
        head: overrides head discovery: module names/suffixes or a regex.

    Returns:
        The :class:`ModelStructure`; shared (tied) parameters count once, under their first name.

    Raises:
        TargetError: the head or blocks cannot be found, or they overlap.
    """
    head_paths = find_head(model, head)
    block_paths = find_blocks(model, blocks, head_paths)
    overlap = [b for b in block_paths if _within(b, head_paths) or any(_within(h, [b]) for h in head_paths)]
    if overlap:
        raise TargetError(f"block {overlap[0]!r} overlaps the head ({', '.join(head_paths)}); pass blocks= or head=")
    embeddings, top, head_names = [], [], []
    per_block: list[list[str]] = [[] for _ in block_paths]
    seen_block = False
    for name, _ in model.named_parameters():
        if _within(name, head_paths):
            head_names.append(name)
            continue
        index = next((i for i, b in enumerate(block_paths) if name.startswith(b + ".")), None)
        if index is not None:
            per_block[index].append(name)
            seen_block = True
        elif seen_block:
            top.append(name)
        else:
            embeddings.append(name)
    empty = [block_paths[i] for i, names in enumerate(per_block) if not names]
    if empty:
        raise TargetError(f"block {empty[0]!r} holds no parameters of its own; pass blocks= naming the real blocks")
    return ModelStructure(
        embeddings=tuple(embeddings),
        blocks=tuple(tuple(names) for names in per_block),
        top=tuple(top),
        head=tuple(head_names),
        block_paths=tuple(block_paths),
        head_paths=tuple(head_paths),
    )
