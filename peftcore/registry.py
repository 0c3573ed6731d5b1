"""The registries of methods, layer handlers and kernels.

Each is fed by its entry-point group (see :mod:`peftcore.plugin`) and by ``register_*`` calls
from code. peftcore's built-in LoRA comes in through the ``peftcore.methods`` group exactly as a
third-party method does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peftcore.errors import PluginError
from peftcore.plugin import Entry, PluginConflictError, Registry

_HANDLER_ATTRS = ("method", "matches", "wrap")
_KERNEL_ATTRS = ("op", "backend", "available")


def _instance(obj: Any) -> Any:
    return obj() if isinstance(obj, type) else obj


def _check_attrs(obj: Any, attrs: tuple[str, ...], what: str, entry: Entry) -> None:
    missing = [a for a in attrs if not hasattr(obj, a)]
    if missing:
        raise PluginError(
            f"the {what} {entry.describe()} lacks {', '.join(missing)}; see docs/plugins.md for "
            f"what a {what} must provide"
        )


def _method_protocol() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The data attributes and the methods of :class:`peftcore.tuners.base.Method`, read off the Protocol."""
    from peftcore.tuners.base import Method

    data = tuple(Method.__annotations__)
    functions = tuple(n for n, v in vars(Method).items() if callable(v) and not n.startswith("_"))
    return data, functions


def _validate_method(obj: Any, entry: Entry) -> Any:
    method = _instance(obj)
    data, functions = _method_protocol()
    _check_attrs(method, data + functions, "method", entry)
    not_callable = [n for n in functions if not callable(getattr(method, n))]
    if not_callable:
        raise PluginError(f"the method {entry.describe()} has {', '.join(not_callable)} but not as callables; see docs/plugins.md")
    flags = [n for n in ("merges", "identity_at_init") if not isinstance(getattr(method, n), bool)]
    if flags:
        raise PluginError(f"the method {entry.describe()} must set {', '.join(flags)} to True or False")
    if method.name != entry.name:
        raise PluginError(f"the method {entry.describe()} calls itself {method.name!r}; the names must agree")
    return method


def _validate_handler(obj: Any, entry: Entry) -> Any:
    handler = _instance(obj)
    _check_attrs(handler, _HANDLER_ATTRS, "layer handler", entry)
    prefix = entry.name.split(".", 1)[0]
    if "." not in entry.name or handler.method != prefix:
        raise PluginError(
            f"the layer handler {entry.describe()} must be named '<method>.<handler>' with "
            f"<method> = its method ({handler.method!r})"
        )
    return handler


def _validate_kernel(obj: Any, entry: Entry) -> Any:
    kernel = _instance(obj)
    _check_attrs(kernel, _KERNEL_ATTRS, "kernel", entry)
    if entry.name != f"{kernel.op}.{kernel.backend}":
        raise PluginError(
            f"the kernel {entry.describe()} must be named '{kernel.op}.{kernel.backend}' (<op>.<backend>)"
        )
    return kernel


METHODS = Registry("peftcore.methods", "method", _validate_method)
LAYERS = Registry("peftcore.layers", "layer", _validate_handler)
KERNELS = Registry("peftcore.kernels", "kernel", _validate_kernel)


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """One registered name, described without importing it.

    Attributes:
        name: the registered name.
        distribution: the distribution that provides it (``None`` when registered in code).
        version: the distribution's version.
        value: the entry point's ``module:attribute``.
        claimed_by: every distribution claiming the name, when more than one does.
    """

    name: str
    distribution: str | None
    version: str | None
    value: str | None
    claimed_by: tuple[str, ...] = ()

    def __str__(self) -> str:
        source = f"{self.distribution} {self.version}" if self.distribution else "registered in code"
        conflict = f"  [conflict: {', '.join(self.claimed_by)}]" if self.claimed_by else ""
        return f"{self.name:<16} {source}{conflict}"


class Catalog(dict):
    """A name -> :class:`PluginInfo` mapping that prints as a table."""

    def __str__(self) -> str:
        return "\n".join(str(info) for info in self.values()) or "(none)"


def _catalog(registry: Registry) -> Catalog:
    catalog = Catalog()
    for name in registry.names():
        if name in registry._code:
            catalog[name] = PluginInfo(name, None, None, None)
            continue
        candidates = registry.candidates(name)
        try:
            chosen = registry.entry(name)  # the preferred one where several claim the name
        except PluginConflictError:
            chosen = candidates[0]
        claims = tuple(f"{e.distribution} {e.version}" for e in candidates) if len(candidates) > 1 else ()
        catalog[name] = PluginInfo(name, chosen.distribution, chosen.version, chosen.value, claims)
    return catalog


def methods() -> Catalog:
    """The available methods: name -> distribution and version. Imports no plugin."""
    return _catalog(METHODS)


def layers() -> Catalog:
    """The available layer handlers (``<method>.<handler>``): distribution and version. Imports no plugin."""
    return _catalog(LAYERS)


def kernels() -> Catalog:
    """The available kernels (``<op>.<backend>``): distribution and version. Imports no plugin."""
    return _catalog(KERNELS)


def get_method(name: str) -> Any:
    """The method object registered as ``name`` (imports its plugin on first use).

    Its layer handlers (``peftcore.layers`` entries ``<name>.<handler>``) are resolved too, so
    that two distributions claiming one handler name fail here, before the model is touched,
    rather than in the middle of target selection.

    Raises:
        PluginError: unknown name, conflicting distributions (:class:`PluginConflictError`), or a
            plugin that fails to load.
    """
    if not isinstance(name, str):
        raise PluginError(f"a method is named by a string such as 'lora', got {name!r}")
    method = METHODS.get(name)
    layer_handlers(name)
    return method


def method_provider(name: str) -> dict[str, str | None]:
    """The distribution and version that provide method ``name`` (recorded in saved adapters)."""
    entry = METHODS.entry(name)
    return {"distribution": entry.distribution, "version": entry.version}


_handler_cache: dict[tuple[str, int], list[Any]] = {}


def layer_handlers(method: str) -> list[Any]:
    """The layer handlers of a method, highest ``priority`` first; at equal priority, handlers
    registered in code come before plugins, and plugins before built-ins.

    A third-party handler that fails to load is skipped with a warning (see
    :meth:`peftcore.plugin.Registry.load_all`).

    Raises:
        PluginConflictError: two distributions claim one handler name and none is preferred.
    """
    key = (method, LAYERS.generation)
    cached = _handler_cache.get(key)
    if cached is not None:
        return list(cached)
    loaded = list(LAYERS.load_all(prefix=f"{method}."))

    def rank(item: tuple[Entry, Any]) -> tuple[int, int]:
        entry, handler = item
        origin = 0 if entry.distribution is None else (2 if entry.builtin else 1)
        return (-getattr(handler, "priority", 0), origin)

    handlers = [handler for _, handler in sorted(loaded, key=rank)]
    if len(_handler_cache) > 64:  # generations only grow; old keys are dead
        _handler_cache.clear()
    _handler_cache[key] = handlers
    return list(handlers)


def register_method(method: Any, *, replace: bool = False) -> Any:
    """Registers a method object (or class) from code, e.g. in a notebook or a test.

    Args:
        method: an object following :class:`peftcore.tuners.base.Method`, or its class.
        replace: replace a method registered in code under the same name.

    Returns:
        The registered method object.
    """
    method = _instance(method)
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{method!r} has no 'name'; a method needs a name such as 'my_method'")
    return METHODS.register(name, method, replace=replace)


def register_layer(name: str, handler: Any, *, replace: bool = False) -> Any:
    """Registers a layer handler from code under ``'<method>.<handler>'``, e.g. ``'lora.qlinear'``."""
    return LAYERS.register(name, handler, replace=replace)


def register_kernel(kernel: Any, *, replace: bool = False) -> Any:
    """Registers a kernel (an object with ``op``, ``backend``, ``available``...) from code."""
    kernel = _instance(kernel)
    return KERNELS.register(f"{kernel.op}.{kernel.backend}", kernel, replace=replace)
