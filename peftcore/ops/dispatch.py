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
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any

from peftcore.errors import BackendUnavailableError

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
    from peftcore import registry

    return {kernel.backend: kernel for _, kernel in registry.KERNELS.load_all(prefix=f"{op}.")}


def _status(kernel: Any) -> tuple[bool, str]:
    try:
        ok, reason = kernel.available()
    except Exception as exc:  # a probe that crashes means "not available", with the reason
        return False, f"availability check failed: {type(exc).__name__}: {exc}"
    return bool(ok), "" if ok else str(reason)


def backends(op: str | None = None) -> BackendTable:
    """Every known backend of every op (or of ``op``), whether it is available, and why not."""
    from peftcore import registry

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


def refresh() -> None:
    """Forgets cached selections and fallback warnings (e.g. after building the extension)."""
    _selected.clear()
    _warn_fallback_once.cache_clear()


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else ``PEFTCORE_BACKEND``, else ``auto``.

    A backend named in code (``wrap(..., backend="cpp")``) wins over the environment variable;
    ``backend="auto"`` (the default) lets ``PEFTCORE_BACKEND`` choose.
    """
    if backend is not None and backend != AUTO:
        return backend
    return os.environ.get("PEFTCORE_BACKEND", "").strip() or AUTO


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(op: str, device: str, chosen: str, better: str, reason: str, hint: str) -> None:
    warnings.warn(
        f"peftcore: {op} on {device} runs on the {chosen!r} backend because {better!r} is unavailable "
        f"({reason}). {hint}".rstrip(),
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
    """
    from peftcore import registry

    wanted = requested_backend(backend)
    key = (op, device_type, wanted, registry.KERNELS.generation)
    kernel = _selected.get(key)
    if kernel is None:
        kernel = _selected[key] = _select(op, device_type, wanted)
    return kernel


def _select(op: str, device_type: str, wanted: str) -> Any:
    kernels = _kernels(op)
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
