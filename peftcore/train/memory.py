"""Peak memory of the running process, for ``peftcore compare``.

On Linux the kernel keeps the peak resident set size (``VmHWM`` in ``/proc/self/status``) and
lets a process reset it (writing ``5`` to ``/proc/self/clear_refs``), so the peak of one phase,
such as training, can be read on its own. Elsewhere the peak since the process started
(``getrusage``) is the fallback. Resident memory includes what the allocator keeps after a
free, which is why ``peftcore compare`` runs each strategy in a fresh process.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak() -> bool:
    """Resets the peak RSS to the current RSS; returns whether this platform allows it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_mib() -> float | None:
    """The current resident set size in MiB (``None`` where unknown)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def peak_rss_mib() -> float:
    """The peak resident set size in MiB since the last :func:`reset_peak` (or process start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
