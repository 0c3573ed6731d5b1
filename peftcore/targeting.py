"""Targeting: which submodules of a model a method attaches to.

A selection (``targets``, ``exclude``, ``trainable``) is one of:

* a list of names: each an exact dotted path (``"bert.encoder.layer.0.attention.self.query"``)
  or a suffix of whole components (``"query"``, ``"self.query"``);
* a string: ``"all-linear"``, or a regular expression fully matched against the dotted path;
* a callable ``(name, module) -> bool``.

``layers=`` keeps only modules inside some block indices (the first integer component of the
path: ``layer.3`` in BERT, ``h.3`` in GPT-2, ``layers.3`` in Llama); negative indices count
from the last block.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterator, Sequence, Union

from torch import nn

from peftcore.errors import TargetError

Selection = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

#: Path components that mark a task head: never a default target.
HEAD_NAMES = frozenset({"lm_head", "classifier", "pre_classifier", "score", "qa_outputs", "cls", "head", "output_layer"})


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What the user asked for: ``targets``, ``exclude`` and ``layers`` as given to ``wrap``."""

    targets: Selection = None
    exclude: Selection = None
    layers: Union[None, int, Sequence[int]] = None


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yields ``(dotted path, module)`` for every submodule, treating adapter layers as leaves.

    An adapter layer stands where the original module stood, under the same path; the
    original inside it (``<path>.base_layer``) is not yielded again.
    """
    from peftcore.tuners.base import AdapterLayer

    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if path:
            yield path, module
        if isinstance(module, AdapterLayer):
            continue
        children = [(f"{path}.{n}" if path else n, c) for n, c in module._modules.items() if c is not None]
        stack.extend(reversed(children))


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path; raises :class:`TargetError` if there is none."""
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise TargetError(f"{type(model).__name__} has no submodule {path!r}") from exc


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Puts ``module`` at a dotted path, replacing what was there."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def block_index(path: str) -> int | None:
    """The block a module belongs to: the first integer component of its path."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the task/output head: ``get_output_embeddings()`` and head-named modules."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        try:
            out = get_out()
        except (AttributeError, NotImplementedError, TypeError):
            out = None
    for path, module in iter_modules(model):
        if module is out or (out is not None and getattr(module, "base_layer", None) is out):
            heads.add(path)
        elif any(part in HEAD_NAMES for part in path.split(".")):
            heads.add(path)
    return heads


def name_matches(pattern: str, path: str) -> bool:
    """Exact dotted path, or a suffix made of whole components."""
    return path == pattern or path.endswith("." + pattern)


def _kind(selection: Selection) -> str:
    if selection is None:
        return "none"
    if callable(selection) and not isinstance(selection, str):
        return "callable"
    if isinstance(selection, str):
        return "all-linear" if selection == "all-linear" else "regex"
    if isinstance(selection, (list, tuple, set, frozenset)):
        if not all(isinstance(item, str) for item in selection):
            raise TargetError(f"a list of target names must hold only strings, got {list(selection)!r}")
        return "names"
    raise TargetError(
        f"cannot select modules with {selection!r} ({type(selection).__name__}); pass a list of "
        "names, a regex string, 'all-linear', or a callable (name, module) -> bool"
    )


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TargetError(f"{pattern!r} is not a valid regular expression: {exc}") from exc


def _examples(model: nn.Module, limit: int = 8) -> str:
    paths = [p for p, m in iter_modules(model) if not m._modules or _is_adapter(m)]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    shown = ", ".join(paths[:limit]) + (", ..." if len(paths) > limit else "")
    leaf_list = ", ".join(leaves[:20]) + (", ..." if len(leaves) > 20 else "")
    return f"some module names of {type(model).__name__}: {shown} (leaf names: {leaf_list})"


def _is_adapter(module: nn.Module) -> bool:
    from peftcore.tuners.base import AdapterLayer

    return isinstance(module, AdapterLayer)


def matching(
    model: nn.Module,
    selection: Selection,
    *,
    what: str,
    is_linear_like: Callable[[nn.Module], bool] | None = None,
) -> list[str]:
    """Paths of the modules a selection names, in model order.

    Args:
        model: the model to search.
        selection: a list of names, a regex string, ``"all-linear"`` or a callable.
        what: the argument's name for error messages (``"targets"``, ``"exclude"``, ...).
        is_linear_like: what ``"all-linear"`` means for the calling method.

    Raises:
        TargetError: if the selection is malformed or names nothing in the model; list
            selections fail on the first name that matches nothing.
    """
    kind = _kind(selection)
    modules = list(iter_modules(model))
    if kind == "none":
        return []
    if kind == "all-linear":
        if is_linear_like is None:
            raise TargetError(f"{what}='all-linear' is not meaningful here; name the modules instead")
        heads = output_head_paths(model)
        found = [p for p, m in modules if p not in heads and is_linear_like(m)]
    elif kind == "regex":
        regex = _compile(selection)  # type: ignore[arg-type]
        found = [p for p, _ in modules if regex.fullmatch(p)]
    elif kind == "callable":
        found = []
        for path, module in modules:
            try:
                if selection(path, module):  # type: ignore[operator]
                    found.append(path)
            except Exception as exc:
                raise TargetError(f"the {what} callable raised on module {path!r}: {exc}") from exc
    else:
        found = []
        for pattern in selection:  # type: ignore[union-attr]
            hits = [p for p, _ in modules if name_matches(pattern, p)]
            if not hits:
                raise TargetError(f"{what} name {pattern!r} matches no module; {_examples(model)}")
            found.extend(hits)
        order = {p: i for i, (p, _) in enumerate(modules)}
        found = sorted(set(found), key=order.__getitem__)
    if not found:
        raise TargetError(f"{what}={_describe(selection)} matches no module; {_examples(model)}")
    return found


def _describe(selection: Selection) -> str:
    if callable(selection) and not isinstance(selection, str):
        return getattr(selection, "__name__", "<callable>")
    return repr(selection)


def filter_layers(model: nn.Module, paths: list[str], layers: Union[None, int, Sequence[int]]) -> list[str]:
    """Keeps the paths inside the given block indices (negative ones count from the end)."""
    if layers is None:
        return paths
    wanted = [layers] if isinstance(layers, int) else list(layers)
    if not wanted or not all(isinstance(i, int) and not isinstance(i, bool) for i in wanted):
        raise TargetError(f"layers= takes an int or a list of ints, got {layers!r}")
    indices = [block_index(p) for p, _ in iter_modules(model)]
    count = max((i for i in indices if i is not None), default=-1) + 1
    if count == 0:
        raise TargetError(f"layers={layers!r} given, but {type(model).__name__} has no numbered blocks")
    resolved = set()
    for i in wanted:
        j = i + count if i < 0 else i
        if not 0 <= j < count:
            raise TargetError(f"layers={layers!r}: block {i} does not exist; the model has blocks 0..{count - 1}")
        resolved.add(j)
    kept = [p for p in paths if block_index(p) in resolved]
    if not kept:
        raise TargetError(f"layers={layers!r} keeps none of the selected modules ({', '.join(paths[:5])}, ...)")
    return kept


def select(
    model: nn.Module,
    spec: TargetSpec,
    *,
    default: Callable[[str, nn.Module], bool],
    is_linear_like: Callable[[nn.Module], bool],
) -> list[str]:
    """Resolves a :class:`TargetSpec` to module paths: targets (or the default), minus exclude, in layers.

    Args:
        model: the model to search.
        spec: what the user asked for.
        default: the method's default selection when ``spec.targets`` is None.
        is_linear_like: what ``"all-linear"`` means for the method.

    Raises:
        TargetError: if anything matches nothing, or nothing is left after ``exclude``/``layers``.
    """
    targets = spec.targets if spec.targets is not None else default
    paths = matching(model, targets, what="targets", is_linear_like=is_linear_like)
    if spec.exclude is not None:
        excluded = matching(model, spec.exclude, what="exclude", is_linear_like=is_linear_like)
        # excluding a container excludes everything inside it
        paths = [p for p in paths if not any(p == e or p.startswith(e + ".") for e in excluded)]
        if not paths:
            raise TargetError(f"exclude={_describe(spec.exclude)} removes every target")
    return filter_layers(model, paths, spec.layers)
