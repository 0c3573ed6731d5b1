"""Plugin discovery: peftcore's extension points, fed by Python entry points.

Three entry-point groups extend peftcore without editing it:

* ``peftcore.methods``: an adapter method (an object or class following
  :class:`peftcore.tuners.base.Method`), entry name = method name, e.g. ``lora``.
* ``peftcore.layers``: a layer handler that lets a method attach to a module type,
  entry name = ``<method>.<handler>``, e.g. ``lora.linear``.
* ``peftcore.kernels``: an op implementation for a backend, entry name =
  ``<op>.<backend>``, e.g. ``lora_linear.cpp``.

peftcore's built-ins are declared through the same groups (see ``_entry_points.py``).
Discovery is lazy: reading the groups imports nothing; an entry's module is imported the
first time the entry is used.

Settings:

* ``PEFTCORE_DISABLE_PLUGINS=1``: only peftcore's own entries are used.
* ``PEFTCORE_PREFER="lora=dist-a,lora_linear.cpp=dist-b"`` or :func:`prefer`: which
  distribution wins when two claim the same entry name.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as metadata
import os
import threading
import warnings
from typing import Any, Callable, Iterator

from peftcore.errors import PluginError

#: The plugin API version this peftcore implements. A plugin states the versions it was
#: built for in a ``peftcore_api`` attribute (an int or a tuple of ints) on its entry object.
API_VERSION = 1
#: Every API version this peftcore can still load plugins for.
SUPPORTED_API_VERSIONS = frozenset({1})

GROUPS = ("peftcore.methods", "peftcore.layers", "peftcore.kernels")
BUILTIN_DISTRIBUTION = "peftcore"

_preferences: dict[tuple[str | None, str], str] = {}
_REGISTRIES: dict[str, "Registry"] = {}


def prefer(name: str, distribution: str, group: str | None = None) -> None:
    """Chooses which distribution provides ``name`` when several claim it.

    Args:
        name: the entry name, e.g. ``"lora"`` or ``"lora_linear.cpp"``.
        distribution: the distribution (pip package) whose entry wins.
        group: restrict the choice to one group; ``None`` applies it to every group.
    """
    _preferences[(group, name)] = distribution
    for registry in _REGISTRIES.values():
        registry._resolved.pop(name, None)
        registry.generation += 1


def plugins_disabled() -> bool:
    """Whether ``PEFTCORE_DISABLE_PLUGINS`` turns third-party entry points off."""
    return os.environ.get("PEFTCORE_DISABLE_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


def _env_preferences() -> dict[str, str]:
    raw = os.environ.get("PEFTCORE_PREFER", "")
    chosen = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, dist = item.partition("=")
        if not sep or not name.strip() or not dist.strip():
            raise PluginError(
                f"PEFTCORE_PREFER has a malformed item {item!r}; write 'name=distribution', "
                "several separated by commas, e.g. PEFTCORE_PREFER='lora=my-lora-dist'"
            )
        chosen[name.strip()] = dist.strip()
    return chosen


def _normalise(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


@dataclasses.dataclass
class Entry:
    """One provider of a name in a group: an entry point, or an object registered in code.

    Attributes:
        group: the entry-point group.
        name: the entry name.
        value: ``"module:attribute"`` for entry points, ``None`` for objects registered in code.
        distribution: the distribution that declares it (``None`` when registered in code).
        version: that distribution's version.
    """

    group: str
    name: str
    value: str | None
    distribution: str | None
    version: str | None
    obj: Any = dataclasses.field(default=None, repr=False)
    loaded: bool = dataclasses.field(default=False, repr=False)

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION

    def describe(self) -> str:
        if self.distribution is None:
            return f"{self.name!r} (registered in code)"
        return f"{self.name!r} from distribution {self.distribution} {self.version}"

    def load(self, validate: Callable[[Any, "Entry"], Any] | None = None) -> Any:
        """Imports the entry (once), checks its API version and returns the object."""
        if self.loaded:
            return self.obj
        if self.value is None:
            raise PluginError(f"{self.describe()} has nothing to load")
        module_name, _, attr = self.value.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
        except Exception as exc:
            raise PluginError(
                f"the {self.group} plugin {self.describe()} failed to import ({self.value}): "
                f"{type(exc).__name__}: {exc}. Reinstall or upgrade {self.distribution}, or set "
                "PEFTCORE_DISABLE_PLUGINS=1 to run without third-party plugins"
            ) from exc
        check_api_version(obj, self)
        if validate is not None:
            obj = validate(obj, self)
        self.obj, self.loaded = obj, True
        return obj


def check_api_version(obj: Any, entry: Entry) -> None:
    """Raises :class:`PluginError` if ``obj`` was built for a plugin API this peftcore lacks."""
    declared = getattr(obj, "peftcore_api", None)
    if declared is None:
        if entry.builtin or entry.distribution is None:
            return
        raise PluginError(
            f"the {entry.group} plugin {entry.describe()} does not declare the peftcore plugin API "
            f"it was built for; its entry object needs a 'peftcore_api = {API_VERSION}' attribute "
            f"(this peftcore supports API versions {sorted(SUPPORTED_API_VERSIONS)})"
        )
    versions = {declared} if isinstance(declared, int) else set(declared)
    if not versions & SUPPORTED_API_VERSIONS:
        raise PluginError(
            f"the {entry.group} plugin {entry.describe()} was built for peftcore plugin API "
            f"version {sorted(versions)}, but this peftcore supports {sorted(SUPPORTED_API_VERSIONS)} "
            f"(current: {API_VERSION}); install a release of {entry.distribution} built for "
            f"API {API_VERSION}, or a peftcore that supports {sorted(versions)}"
        )


def _builtin_entries(group: str) -> list[Entry]:
    from peftcore import __version__
    from peftcore._entry_points import ENTRY_POINTS

    entries = []
    for spec in ENTRY_POINTS.get(group, []):
        name, _, value = (part.strip() for part in spec.partition("="))
        entries.append(Entry(group, name, value, BUILTIN_DISTRIBUTION, __version__))
    return entries


def discover(group: str) -> list[Entry]:
    """Reads the entry points of ``group`` from the installed distributions; imports nothing.

    peftcore's own entries are always present: read from its packaging metadata, and from
    ``_entry_points.py`` where that metadata is missing or older than the source tree.
    """
    entries: list[Entry] = []
    seen: set[tuple[str, str, str]] = set()
    for ep in metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "unknown"
        version = dist.version if dist is not None else "unknown"
        key = (ep.name, _normalise(dist_name), ep.value)
        if key in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(key)
        entries.append(Entry(group, ep.name, ep.value, dist_name, version))
    declared = {(e.name, e.value) for e in entries if _normalise(e.distribution or "") == BUILTIN_DISTRIBUTION}
    for builtin in _builtin_entries(group):
        if (builtin.name, builtin.value) not in declared:
            entries = [e for e in entries if not (e.builtin and e.name == builtin.name)]
            entries.append(builtin)
    for entry in entries:
        if entry.distribution and _normalise(entry.distribution) == BUILTIN_DISTRIBUTION:
            entry.distribution = BUILTIN_DISTRIBUTION
    if plugins_disabled():
        entries = [e for e in entries if e.builtin]
    return entries


class Registry:
    """The providers of one entry-point group, plus objects registered in code.

    Args:
        group: the entry-point group, e.g. ``"peftcore.methods"``.
        what: a word for error messages, e.g. ``"method"``.
        validate: called on each loaded object; returns the object to use or raises.
    """

    def __init__(self, group: str, what: str, validate: Callable[[Any, Entry], Any] | None = None):
        self.group = group
        self.what = what
        self._validate = validate
        self._lock = threading.RLock()
        self._discovered: dict[str, list[Entry]] | None = None
        self._code: dict[str, Entry] = {}
        self._resolved: dict[str, Entry] = {}
        #: bumped whenever what the registry answers may have changed (for callers' caches)
        self.generation = 0
        _REGISTRIES[group] = self

    def _candidates(self) -> dict[str, list[Entry]]:
        with self._lock:
            if self._discovered is None:
                found: dict[str, list[Entry]] = {}
                for entry in discover(self.group):
                    found.setdefault(entry.name, []).append(entry)
                self._discovered = found
            return self._discovered

    def refresh(self) -> None:
        """Forgets what was discovered, so newly installed distributions are seen."""
        with self._lock:
            self._discovered = None
            self._resolved.clear()
            self.generation += 1

    def names(self) -> list[str]:
        return sorted(set(self._candidates()) | set(self._code))

    def __contains__(self, name: str) -> bool:
        return name in self._code or name in self._candidates()

    def entry(self, name: str) -> Entry:
        """The one provider of ``name``: registered in code, preferred, or the only one.

        Raises:
            PluginError: if several distributions claim ``name`` and none is preferred,
                or ``name`` is unknown.
        """
        if name in self._code:
            return self._code[name]
        if name in self._resolved:
            return self._resolved[name]
        candidates = self._candidates().get(name, [])
        if not candidates:
            known = ", ".join(self.names()) or "none"
            raise PluginError(
                f"no {self.what} named {name!r}; available: {known}. A {self.what} from a "
                f"plugin appears here once its distribution is installed (entry-point group "
                f"{self.group!r}), or after peftcore.register_{self.what}(...)"
            )
        chosen = self._choose(name, candidates)
        self._resolved[name] = chosen
        return chosen

    def _choose(self, name: str, candidates: list[Entry]) -> Entry:
        distributions = {_normalise(e.distribution or ""): e for e in candidates}
        if len(distributions) == 1:
            return candidates[0]
        wanted = _preferences.get((self.group, name)) or _preferences.get((None, name))
        wanted = wanted or _env_preferences().get(name)
        if wanted is not None:
            match = distributions.get(_normalise(wanted))
            if match is None:
                raise PluginError(
                    f"the preferred distribution {wanted!r} for {self.what} {name!r} provides no "
                    f"such entry; candidates: {', '.join(e.describe() for e in candidates)}"
                )
            return match
        claims = " and ".join(f"{e.distribution} {e.version}" for e in candidates)
        raise PluginError(
            f"{self.what} {name!r} (entry-point group {self.group!r}) is claimed by {claims}. "
            f"Choose one with peftcore.plugin.prefer({name!r}, '<distribution>') or the "
            f"environment variable PEFTCORE_PREFER='{name}=<distribution>', or uninstall one"
        )

    def get(self, name: str) -> Any:
        """Loads (once) and returns the object that provides ``name``."""
        entry = self.entry(name)
        return entry.load(self._validate)

    def register(self, name: str, obj: Any, *, replace: bool = False) -> Any:
        """Registers ``obj`` under ``name`` from code; it wins over entry points of that name.

        Raises:
            PluginError: if ``name`` is already registered in code and ``replace`` is false.
        """
        with self._lock:
            if name in self._code and not replace:
                raise PluginError(
                    f"a {self.what} named {name!r} is already registered in code; pass "
                    "replace=True to replace it"
                )
            entry = Entry(self.group, name, None, None, None)
            obj = self._validate(obj, entry) if self._validate else obj
            entry.obj, entry.loaded = obj, True
            self._code[name] = entry
            self.generation += 1
            return obj

    def unregister(self, name: str) -> None:
        """Removes an object registered in code (entry points are not affected)."""
        with self._lock:
            self._code.pop(name, None)
            self.generation += 1

    def load_all(self, prefix: str = "") -> Iterator[tuple[Entry, Any]]:
        """Loads every entry whose name starts with ``prefix``.

        A broken third-party entry is skipped with a warning naming its distribution, so that
        the rest keeps working; a broken built-in raises.
        """
        for name in self.names():
            if not name.startswith(prefix):
                continue
            try:
                entry = self.entry(name)
                obj = entry.load(self._validate)
            except PluginError as exc:
                candidates = self._candidates().get(name, [])
                if any(e.builtin for e in candidates) and len(candidates) == 1:
                    raise
                warnings.warn(f"skipping {self.what} {name!r}: {exc}", RuntimeWarning, stacklevel=3)
                continue
            yield entry, obj
