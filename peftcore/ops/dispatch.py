"""Backend dispatch: which implementation of an op runs for given tensors.

Kernels come from the ``peftcore.kernels`` entry-point group (entry name ``<op>.<backend>``) or
:func:`peftcore.register_kernel`. A kernel object has:

* ``op``, ``backend``: e.g. ``"lora_linear"``, ``"cpp"``;
* ``devices``: device types it runs on, e.g. ``("cpu",)``;
* ``priority``: ``auto`` prefers higher (reference is 0);
* ``available() -> (bool, reason)``: whether it can run here, and why not;
* ``hint``: what to do to make it available (shown when ``auto`` falls back);
* ``__call__(*args)``: the op.

The user chooses with ``backend=`` (per call / per adapter) or ``PEFTCORE_BACKEND``; ``auto``
(the default) picks the highest-priority available kernel for the device and warns once when a
faster one exists but is unavailable.

``PEFTCORE_BACKEND`` names one backend for every op (``cpp``), or one per op
(``lora_linear=triton,bottleneck=cpp``), or both (``reference,bottleneck=cpp``: the per-op entry
wins). An op that lacks the backend of the plain form runs on ``auto`` (with one warning); a
per-op entry naming a backend its op lacks is an error. The variable is read once, on first
use, and again after :func:`refresh`. Adapter layers resolve their kernel once per backend,
device type and dtype through a :class:`KernelCache` (at ``wrap``/``load``, or at the first forward
on a new device type or dtype) and keep it until :func:`refresh` or a change of the kernel
registry (a registration, :func:`peftcore.plugin.refresh`); a changed ``PEFTCORE_DISABLE_PLUGINS``
reaches them at :func:`refresh` too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any

from peftcore import registry
from peftcore.errors import BackendUnavailableError, ConfigError

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether one backend of one op can run here.

    Attributes:
        op: the op, e.g. ``"lora_linear"``.
        backend: the backend, e.g. ``"cpp"``.
        devices: device types it runs on.
        available: whether it can run now.
        reason: why not (empty when available).
        distribution: who provides it.
    """

    op: str
    backend: str
    devices: tuple[str, ...]
    available: bool
    reason: str
    distribution: str | None

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"{self.op:<16} {self.backend:<10} {','.join(self.devices):<10} {state}"


class BackendTable(list):
    """A list of :class:`BackendStatus` that prints as a table."""

    def __str__(self) -> str:
        devices = [",".join(s.devices) for s in self]
        widths = [max((len(v) for v in column), default=0) for column in
                  ([s.op for s in self], [s.backend for s in self], devices)]
        lines = []
        for s, dev in zip(self, devices):
            state = "available" if s.available else f"unavailable: {s.reason}"
            lines.append(f"{s.op:<{widths[0]}}  {s.backend:<{widths[1]}}  {dev:<{widths[2]}}  {state}")
        return "\n".join(lines)


def _kernels(op: str) -> dict[str, Any]:
    return {kernel.backend: kernel for _, kernel in registry.KERNELS.load_all(prefix=f"{op}.")}


def _status(kernel: Any) -> tuple[bool, str]:
    try:
        ok, reason = kernel.available()
    except Exception as exc:  # a probe that crashes means "not available", with the reason
        return False, f"availability check failed: {type(exc).__name__}: {exc}"
    return bool(ok), "" if ok else str(reason)


def backends(op: str | None = None) -> BackendTable:
    """Every known backend of every op (or of ``op``), whether it is available, and why not."""
    table = BackendTable()
    for entry, kernel in registry.KERNELS.load_all():
        if op is not None and kernel.op != op:
            continue
        ok, reason = _status(kernel)
        table.append(BackendStatus(kernel.op, kernel.backend, tuple(kernel.devices), ok, reason, entry.distribution))
    return table


def known_backends(op: str) -> list[str]:
    """The backend names registered for ``op`` (available here or not)."""
    return sorted(_kernels(op))


def _raise_if_broken_plugin(op: str, backend: str) -> None:
    """Raises the :class:`PluginError` of a kernel plugin ``<op>.<backend>`` that failed to load.

    Enumerating an op's kernels skips such a plugin (with one warning), so without this a
    backend whose plugin is installed but broken would look as if it did not exist.
    """
    name = f"{op}.{backend}"
    if name in registry.KERNELS:
        registry.KERNELS.get(name)  # re-raises the failed load's PluginError, naming the distribution


def check_backend(op: str, backend: str, what: str) -> None:
    """Checks, without running anything, that ``backend`` is ``"auto"`` or a backend of ``op``.

    Args:
        op: the op, e.g. ``"lora_linear"``.
        backend: the name asked for, e.g. in ``wrap(..., backend=...)``.
        what: how messages name the option, e.g. ``"lora backend"``.

    Raises:
        PluginError: ``backend`` comes from a kernel plugin that failed to import (the message
            names its distribution; the import error is chained).
        ConfigError: no kernel of ``op`` has that name.
    """
    if backend == AUTO:
        return
    known = known_backends(op)
    if backend in known:
        return
    _raise_if_broken_plugin(op, backend)
    raise ConfigError(
        f"{what} {backend!r} does not exist; choose 'auto' or one of {', '.join(known)} "
        "(peftcore.backends() shows which can run here)"
    )


_refreshes = 0  # how many times refresh() ran: KernelCache objects compare it


def refresh() -> None:
    """Forgets resolved kernels, fallback warnings and ``PEFTCORE_BACKEND`` as read.

    Call it after changing ``PEFTCORE_BACKEND`` in a running process, or after building the
    extension: the next call reads the variable again, and every adapter layer resolves its
    kernel again at its next forward.
    """
    global _env, _refreshes
    _selected.clear()
    _warn_fallback_once.cache_clear()
    _warn_plain_env_once.cache_clear()
    _env = None
    _refreshes += 1


_ALL = "*"  # key of the plain form's backend in the parsed PEFTCORE_BACKEND
_env: dict[str, str] | None = None  # PEFTCORE_BACKEND parsed; None until read (again)


def _parse_env(raw: str) -> dict[str, str]:
    """``PEFTCORE_BACKEND`` as ``{op: backend}``, the plain form's backend under ``"*"``.

    Raises:
        ConfigError: a malformed value, or an op name that no kernel has.
    """
    def bad(problem: str) -> ConfigError:
        return ConfigError(
            f"PEFTCORE_BACKEND={raw!r}: {problem}. Write one backend for every op (e.g. 'cpp') or "
            "one per op (e.g. 'lora_linear=triton,bottleneck=cpp'), or both ('reference,bottleneck=cpp')"
        )

    parsed: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        op, sep, backend = (part.strip() for part in item.partition("="))
        if not sep:
            op, backend = _ALL, op
        if not op or not backend or "=" in backend:
            raise bad(f"cannot read {item!r}")
        if op in parsed:
            raise bad(f"{'the backend for every op' if op == _ALL else repr(op)} is given twice")
        parsed[op] = backend
    ops = {name.split(".", 1)[0] for name in registry.KERNELS.names()}
    unknown = sorted(set(parsed) - ops - {_ALL})
    if unknown:
        raise bad(f"no op named {', '.join(map(repr, unknown))}; the ops are {', '.join(sorted(ops))}")
    return {op: backend for op, backend in parsed.items() if backend != AUTO}


def _requested(op: str, backend: str | None) -> tuple[str, bool]:
    """The backend asked for ``op``, and whether it comes from the plain ``PEFTCORE_BACKEND`` form."""
    global _env
    if backend is not None and backend != AUTO:
        return backend, False
    if _env is None:
        _env = _parse_env(os.environ.get("PEFTCORE_BACKEND", ""))
    if op in _env:
        return _env[op], False
    if _ALL in _env:
        return _env[_ALL], True
    return AUTO, False


def requested_backend(backend: str | None, op: str = "lora_linear") -> str:
    """The backend asked for ``op``: the argument, else ``PEFTCORE_BACKEND``, else ``auto``.

    A backend named in code (``wrap(..., backend="cpp")``) wins over the environment variable;
    ``backend="auto"`` (the default) lets ``PEFTCORE_BACKEND`` choose (its per-op entry for
    ``op``, else its plain form). The variable is read once, and again after :func:`refresh`.
    """
    return _requested(op, backend)[0]


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(op: str, device: str, chosen: str, better: str, reason: str, hint: str) -> None:
    warnings.warn(
        f"peftcore: {op} on {device} runs on the {chosen!r} backend because {better!r} is unavailable "
        f"({reason}). {hint}".rstrip(),
        RuntimeWarning,
        stacklevel=4,
    )


@functools.lru_cache(maxsize=None)
def _warn_plain_env_once(op: str, wanted: str, known: tuple[str, ...]) -> None:
    warnings.warn(
        f"peftcore: PEFTCORE_BACKEND asks for {wanted!r}, which {op} does not have (its backends: "
        f"{', '.join(known)}), so {op} runs on 'auto'. Name a backend per op to choose for it, e.g. "
        f"PEFTCORE_BACKEND='{wanted},{op}=reference'",
        RuntimeWarning,
        stacklevel=4,
    )


_selected: dict[tuple[str, str, str, int], Any] = {}


def select(op: str, device_type: str, backend: str | None = None) -> Any:
    """The kernel to run ``op`` on tensors of ``device_type``.

    Args:
        op: the op name, e.g. ``"lora_linear"``.
        device_type: ``"cpu"``, ``"cuda"``, ...
        backend: a backend name, ``"auto"``, or ``None`` (then ``PEFTCORE_BACKEND`` or auto).

    Raises:
        BackendUnavailableError: a named backend is unknown, unavailable, or does not run on
            ``device_type``; the message says why.
        PluginError: the named backend comes from a kernel plugin that failed to import.
        ConfigError: ``PEFTCORE_BACKEND`` is malformed or names an op that does not exist.
    """
    wanted, plain = _requested(op, backend)
    key = (op, device_type, wanted, registry.KERNELS.generation)
    kernel = _selected.get(key)
    if kernel is None:
        kernel = _selected[key] = _select(op, device_type, wanted, plain)
    return kernel


class KernelCache:
    """The kernels one adapter layer runs for one op, resolved once per (backend, device type, dtype).

    Layers call it on every forward instead of :func:`select`: a dict lookup, after checking that
    :func:`refresh` has not run and nothing was registered since the last call; it reads no
    environment variable (``PEFTCORE_BACKEND`` and ``PEFTCORE_DISABLE_PLUGINS`` changes reach it
    through :func:`refresh`). A copy or an unpickled layer starts empty and resolves again where
    it runs.

    Args:
        op: the op, e.g. ``"lora_linear"``.
    """

    def __init__(self, op: str):
        self.op = op
        self._kernels: dict[tuple[str | None, str, Any], Any] = {}
        self._refreshes = -1
        self._generation = -1

    def __call__(self, backend: str | None, device_type: str, dtype: Any) -> Any:
        """The kernel for ``backend`` (a name, ``"auto"`` or ``None``) on tensors of ``device_type``
        and ``dtype``; raises as :func:`select` does."""
        # ``changes``, not ``generation``: that one also reads PEFTCORE_DISABLE_PLUGINS from the
        # environment at every call, which this per-forward path must not do; layers follow that
        # switch at refresh() instead.
        generation = registry.KERNELS.changes
        if self._refreshes != _refreshes or self._generation != generation:
            self._kernels.clear()
            self._refreshes, self._generation = _refreshes, generation
        key = (backend, device_type, dtype)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = select(self.op, device_type, backend)
        return kernel

    def __reduce__(self):
        return (KernelCache, (self.op,))


def _select(op: str, device_type: str, wanted: str, plain: bool = False) -> Any:
    kernels = _kernels(op)
    if wanted != AUTO and wanted not in kernels:
        _raise_if_broken_plugin(op, wanted)
        if plain:  # PEFTCORE_BACKEND's one backend for every op, which this op lacks
            _warn_plain_env_once(op, wanted, tuple(sorted(kernels)))
            wanted = AUTO
    if wanted != AUTO:
        kernel = kernels.get(wanted)
        if kernel is None:
            raise BackendUnavailableError(
                f"no backend {wanted!r} for {op}; known: {', '.join(sorted(kernels)) or 'none'} (or 'auto')"
            )
        if device_type not in kernel.devices:
            raise BackendUnavailableError(
                f"the {wanted!r} backend of {op} runs on {', '.join(kernel.devices)}, not on {device_type}"
            )
        ok, reason = _status(kernel)
        if not ok:
            hint = getattr(kernel, "hint", "")
            raise BackendUnavailableError(f"the {wanted!r} backend of {op} is unavailable: {reason}. {hint}".rstrip())
        return kernel
    ranked = sorted(
        (k for k in kernels.values() if device_type in k.devices),
        key=lambda k: -getattr(k, "priority", 0),
    )
    skipped = []
    for kernel in ranked:
        ok, reason = _status(kernel)
        if ok:
            if skipped:
                better, why, hint = skipped[0]
                _warn_fallback_once(op, device_type, kernel.backend, better, why, hint)
            return kernel
        skipped.append((kernel.backend, reason, getattr(kernel, "hint", "")))
    raise BackendUnavailableError(f"no available backend for {op} on {device_type}: " + "; ".join(f"{b}: {r}" for b, r, _ in skipped))
