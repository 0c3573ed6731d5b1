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

* ``PEFTCORE_DISABLE_PLUGINS=1``: only peftcore's own entries (and objects registered in code)
  are used. Read on every lookup, so it can be changed at run time.
* ``PEFTCORE_PREFER="lora=dist-a,lora_linear.cpp=dist-b"`` or :func:`prefer`: which
  distribution wins when two claim the same entry name.

Failures: a name claimed by two third-party distributions is a :class:`PluginConflictError`
wherever it is used, until one is preferred; where peftcore itself is one of the claimants, its
own entry wins with a ``RuntimeWarning`` naming the others (:func:`prefer` can still choose one). A plugin that fails to import, is built for another plugin API, or
is not a valid method/handler/kernel raises :class:`peftcore.PluginError` (naming its
distribution, the original exception chained) when asked for by name; where peftcore merely
enumerates entries (layer handlers of a method, kernels of an op) it is skipped with one
``RuntimeWarning`` and the rest keeps working. A distribution whose entry-point metadata cannot
be read is skipped with a warning as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata as metadata
import os
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator

from peftcore.errors import PluginConflictError, PluginError

#: The plugin API version this peftcore implements. A plugin states the versions it was
#: built for in a ``peftcore_api`` attribute (an int or a tuple of ints) on its entry object.
API_VERSION = 1
#: Every API version this peftcore can still load plugins for.
SUPPORTED_API_VERSIONS = frozenset({1})

GROUPS = ("peftcore.methods", "peftcore.layers", "peftcore.kernels")
BUILTIN_DISTRIBUTION = "peftcore"

_preferences: dict[tuple[str | None, str], str] = {}
_REGISTRIES: "weakref.WeakSet[Registry]" = weakref.WeakSet()


def prefer(name: str, distribution: str | None, group: str | None = None) -> None:
    """Chooses which distribution provides ``name`` when several claim it.

    Takes precedence over ``PEFTCORE_PREFER``.

    Args:
        name: the entry name, e.g. ``"lora"`` or ``"lora_linear.cpp"``.
        distribution: the distribution (pip package) whose entry wins; ``None`` forgets an
            earlier choice.
        group: restrict the choice to one group; ``None`` applies it to every group.
    """
    if distribution is None:
        _preferences.pop((group, name), None)
    elif not isinstance(distribution, str) or not distribution.strip():
        raise PluginError(f"prefer({name!r}, ...) needs a distribution name such as 'peftcore-ia3', got {distribution!r}")
    else:
        _preferences[(group, name)] = distribution.strip()
    for registry in list(_REGISTRIES):
        registry._forget(name)


def refresh() -> None:
    """Forgets what every registry discovered, so distributions installed (or removed) since are seen.

    Needed only when the set of installed distributions changes while Python runs (e.g.
    ``pip install`` from a notebook); discovery otherwise happens once, on first use.
    """
    for registry in list(_REGISTRIES):
        registry.refresh()


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
    #: the error of the first failed load, raised again on later loads (no repeated imports)
    error: PluginError | None = dataclasses.field(default=None, repr=False)
    warned: bool = dataclasses.field(default=False, repr=False)

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION

    def describe(self) -> str:
        if self.distribution is None:
            return f"{self.name!r} (registered in code)"
        return f"{self.name!r} from distribution {self.distribution} {self.version}"

    def load(self, validate: Callable[[Any, "Entry"], Any] | None = None) -> Any:
        """Imports the entry (once), checks its API version and returns the object.

        Raises:
            PluginError: the import fails (original exception chained), the object declares an
                unsupported ``peftcore_api``, or ``validate`` rejects it. The same error is
                raised again on later calls, without importing again.
        """
        if self.loaded:
            return self.obj
        if self.error is not None:
            raise self.error
        try:
            obj = self._import()
            check_api_version(obj, self)
            if validate is not None:
                try:
                    obj = validate(obj, self)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"the {self.group} plugin {self.describe()} ({self.value}) could not be set up: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
        except PluginError as exc:
            self.error = exc
            raise
        self.obj, self.loaded = obj, True
        return obj

    def _import(self) -> Any:
        if self.value is None:
            raise PluginError(f"{self.describe()} has nothing to load")
        module_name, _, attr = self.value.partition(":")
        try:
            obj = importlib.import_module(module_name.strip())
            for part in filter(None, attr.strip().split(".")):
                obj = getattr(obj, part)
        except Exception as exc:
            raise PluginError(
                f"the {self.group} plugin {self.describe()} failed to import ({self.value}): "
                f"{type(exc).__name__}: {exc}. Reinstall or upgrade {self.distribution}, or set "
                "PEFTCORE_DISABLE_PLUGINS=1 to run without third-party plugins"
            ) from exc
        return obj


def check_api_version(obj: Any, entry: Entry) -> None:
    """Raises :class:`PluginError` if ``obj`` was built for a plugin API this peftcore lacks.

    Built-ins and objects registered in code may leave ``peftcore_api`` out; entry points of
    other distributions must declare it.
    """
    declared = getattr(obj, "peftcore_api", None)
    if declared is None:
        if entry.builtin or entry.distribution is None:
            return
        raise PluginError(
            f"the {entry.group} plugin {entry.describe()} does not declare the peftcore plugin API "
            f"it was built for; its entry object needs a 'peftcore_api = {API_VERSION}' attribute "
            f"(this peftcore supports API versions {sorted(SUPPORTED_API_VERSIONS)})"
        )
    try:
        versions = {declared} if isinstance(declared, int) else set(declared)
    except TypeError:
        versions = set()
    if not versions or not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
        raise PluginError(
            f"the {entry.group} plugin {entry.describe()} declares peftcore_api = {declared!r}; it must be "
            f"an int or a tuple of ints, e.g. peftcore_api = {API_VERSION}"
        )
    if not versions & SUPPORTED_API_VERSIONS:
        owner = entry.distribution or "the code that registers it"
        raise PluginError(
            f"the {entry.group} plugin {entry.describe()} was built for peftcore plugin API "
            f"version {sorted(versions)}, but this peftcore supports {sorted(SUPPORTED_API_VERSIONS)} "
            f"(current: {API_VERSION}); install a release of {owner} built for "
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


def _distribution_entries(group: str) -> Iterator[Entry]:
    """Entry points of ``group`` in every installed distribution (peftcore's own included).

    Like :func:`importlib.metadata.entry_points`, the first distribution of a name on
    ``sys.path`` hides later ones; unlike it, one distribution with unreadable metadata is
    skipped with a warning instead of breaking every lookup.
    """
    seen: set[str] = set()
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception:  # unreadable METADATA
            name = None
        where = str(getattr(dist, "_path", "") or "")
        if not name:
            if any(True for _ in _safe_entry_points(dist, group, where)):
                warnings.warn(f"peftcore: skipping the distribution at {where or '?'}: its METADATA has no Name",
                              RuntimeWarning, stacklevel=4)
            continue
        key = _normalise(name)
        if key in seen:  # a second copy further down sys.path is never imported either
            continue
        seen.add(key)
        if key == BUILTIN_DISTRIBUTION:
            name = BUILTIN_DISTRIBUTION
        for ep in _safe_entry_points(dist, group, where, name):
            yield Entry(group, ep.name, ep.value, name, dist.version)


def _safe_entry_points(dist: Any, group: str, where: str, name: str | None = None) -> list[Any]:
    try:
        return [ep for ep in dist.entry_points if ep.group == group]
    except Exception as exc:
        label = f"{name} {getattr(dist, 'version', '')}".strip() if name else where
        warnings.warn(
            f"peftcore: skipping the plugins of distribution {label}: its entry_points.txt cannot be read "
            f"({type(exc).__name__}: {exc}); reinstall it",
            RuntimeWarning,
            stacklevel=4,
        )
        return []


def discover(group: str, *, include_disabled: bool = False) -> list[Entry]:
    """Reads the entry points of ``group`` from the installed distributions; imports nothing.

    peftcore's own entries come through the same entry points as everyone's: from peftcore's
    packaging metadata. ``_entry_points.py`` (the file ``setup.py`` writes that metadata from)
    fills in where the metadata is missing (a source tree that was never installed) or older
    than the code that runs (an editable install whose entry points changed since).

    Args:
        group: an entry-point group from :data:`GROUPS`.
        include_disabled: also return third-party entries when ``PEFTCORE_DISABLE_PLUGINS`` is set.
    """
    builtin: list[Entry] = []
    third_party: list[Entry] = []
    for entry in _distribution_entries(group):
        (builtin if entry.builtin else third_party).append(entry)
    declared = {e.name: e for e in builtin}
    for entry in _builtin_entries(group):
        if entry.name not in declared or declared[entry.name].value != entry.value:
            declared[entry.name] = entry
    entries = list(declared.values())
    if include_disabled or not plugins_disabled():
        entries += third_party
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
        self._resolved: dict[tuple[str, bool], Entry] = {}
        self._generation = 0
        _REGISTRIES.add(self)

    @property
    def generation(self) -> int:
        """Changes whenever what the registry answers may have changed, for callers' caches:
        registrations, :func:`prefer`, :meth:`refresh`, and ``PEFTCORE_DISABLE_PLUGINS``."""
        return 2 * self._generation + int(plugins_disabled())

    @property
    def changes(self) -> int:
        """Counts registrations, :func:`prefer` and :meth:`refresh` calls; unlike :attr:`generation`
        it reads no environment variable, so per-call caches can compare it cheaply."""
        return self._generation

    def _candidates(self) -> dict[str, list[Entry]]:
        """Name -> providers, honouring ``PEFTCORE_DISABLE_PLUGINS`` as it is now."""
        with self._lock:
            if self._discovered is None:
                found: dict[str, list[Entry]] = {}
                for entry in discover(self.group, include_disabled=True):
                    found.setdefault(entry.name, []).append(entry)
                self._discovered = found
            found = self._discovered
        if not plugins_disabled():
            return found
        kept = {name: [e for e in entries if e.builtin] for name, entries in found.items()}
        return {name: entries for name, entries in kept.items() if entries}

    def _forget(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._resolved if k[0] == name]:
                del self._resolved[key]
            self._generation += 1

    def refresh(self) -> None:
        """Forgets what was discovered, so newly installed (or removed) distributions are seen."""
        with self._lock:
            self._discovered = None
            self._resolved.clear()
            self._generation += 1

    def names(self) -> list[str]:
        return sorted(set(self._candidates()) | set(self._code))

    def __contains__(self, name: str) -> bool:
        return name in self._code or name in self._candidates()

    def candidates(self, name: str) -> list[Entry]:
        """Every entry point claiming ``name`` (objects registered in code excluded)."""
        return list(self._candidates().get(name, []))

    def entry(self, name: str) -> Entry:
        """The one provider of ``name``: registered in code, preferred, peftcore's own (a
        ``RuntimeWarning`` names the third parties that claim it too), or the only one.

        Raises:
            PluginConflictError: several third-party distributions claim ``name`` and none is preferred.
            PluginError: ``name`` is unknown.
        """
        if name in self._code:
            return self._code[name]
        key = (name, plugins_disabled())
        if key in self._resolved:
            return self._resolved[key]
        candidates = self._candidates().get(name, [])
        if not candidates:
            known = ", ".join(self.names()) or "none"
            hint = " (PEFTCORE_DISABLE_PLUGINS is set, so only peftcore's own entries are used)" if plugins_disabled() else ""
            raise PluginError(
                f"no {self.what} named {name!r}{hint}; available: {known}. A {self.what} from a "
                f"plugin appears here once its distribution is installed (entry-point group "
                f"{self.group!r}), or after peftcore.register_{self.what}(...)"
            )
        chosen = self._choose(name, candidates)
        self._resolved[key] = chosen
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
                raise PluginConflictError(
                    f"the preferred distribution {wanted!r} for {self.what} {name!r} provides no "
                    f"such entry; candidates: {', '.join(e.describe() for e in candidates)}"
                )
            return match
        builtin = [e for e in candidates if e.builtin]
        if builtin:  # peftcore's own entry wins over third-party claims, which are named
            others = ", ".join(f"{e.distribution} {e.version}" for e in candidates if not e.builtin)
            warnings.warn(
                f"peftcore: {self.what} {name!r} (entry-point group {self.group!r}) is also claimed by {others}; "
                f"peftcore's own {name!r} is used. To use the other one, call "
                f"peftcore.plugin.prefer({name!r}, '<distribution>') or set PEFTCORE_PREFER='{name}=<distribution>'",
                RuntimeWarning,
                stacklevel=5,
            )
            return builtin[0]
        claims = " and ".join(f"{e.distribution} {e.version}" for e in candidates)
        raise PluginConflictError(
            f"{self.what} {name!r} (entry-point group {self.group!r}) is claimed by {claims}. "
            f"Choose one with peftcore.plugin.prefer({name!r}, '<distribution>') or the "
            f"environment variable PEFTCORE_PREFER='{name}=<distribution>', or uninstall one"
        )

    def get(self, name: str) -> Any:
        """Loads (once) and returns the object that provides ``name``.

        Raises:
            PluginError: unknown name, a conflict, or a plugin that fails to load (the
                distribution is named and the original exception chained).
        """
        entry = self.entry(name)
        return entry.load(self._validate)

    def register(self, name: str, obj: Any, *, replace: bool = False) -> Any:
        """Registers ``obj`` under ``name`` from code; it wins over entry points of that name.

        Raises:
            PluginError: ``name`` is already registered in code and ``replace`` is false, the
                object declares an unsupported ``peftcore_api``, or validation rejects it.
        """
        with self._lock:
            if name in self._code and not replace:
                raise PluginError(
                    f"a {self.what} named {name!r} is already registered in code; pass "
                    "replace=True to replace it"
                )
            entry = Entry(self.group, name, None, None, None)
            check_api_version(obj, entry)
            obj = self._validate(obj, entry) if self._validate else obj
            entry.obj, entry.loaded = obj, True
            self._code[name] = entry
            self._generation += 1
            return obj

    def unregister(self, name: str) -> None:
        """Removes an object registered in code (entry points are not affected)."""
        with self._lock:
            self._code.pop(name, None)
            self._generation += 1

    @contextlib.contextmanager
    def temporarily(self, name: str, obj: Any) -> Iterator[Any]:
        """Registers ``obj`` under ``name`` inside the block, then restores what was there.

        Yields:
            The registered (validated) object.
        """
        with self._lock:
            previous = self._code.get(name)
            registered = self.register(name, obj, replace=True)
        try:
            yield registered
        finally:
            with self._lock:
                if previous is None:
                    self._code.pop(name, None)
                else:
                    self._code[name] = previous
                self._generation += 1

    def load_all(self, prefix: str = "") -> Iterator[tuple[Entry, Any]]:
        """Loads every entry whose name starts with ``prefix``.

        A third-party entry that fails to load is skipped with one warning naming its
        distribution, so that the rest keeps working; a broken built-in raises, and so does a
        conflict (the user must choose, see :func:`prefer`).
        """
        for name in self.names():
            if not name.startswith(prefix):
                continue
            entry = self.entry(name)  # raises PluginConflictError
            try:
                obj = entry.load(self._validate)
            except PluginError as exc:
                if entry.builtin:
                    raise
                if not entry.warned:
                    entry.warned = True
                    warnings.warn(f"peftcore: skipping {self.what} {name!r}: {exc}", RuntimeWarning, stacklevel=3)
                continue
            yield entry, obj
