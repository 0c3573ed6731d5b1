"""The exceptions peftcore raises.

Every error derives from :class:`PeftcoreError`; where a builtin exception fits the
meaning, the peftcore error subclasses it as well, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class PeftcoreError(Exception):
    """Base class of every error peftcore raises."""


class ConfigError(PeftcoreError, ValueError):
    """An option has a value the method cannot use (rank <= 0, dropout outside [0, 1), ...)."""


class TargetError(PeftcoreError, ValueError):
    """A ``targets``/``exclude``/``trainable``/``layers`` selection matched nothing or is malformed."""


class UnsupportedModuleError(PeftcoreError, TypeError):
    """A targeted module has a type that the method has no layer handler for."""


class AdapterNotFoundError(PeftcoreError, KeyError):
    """An adapter name that the model does not hold."""

    def __str__(self) -> str:  # KeyError would otherwise print the message quoted
        return str(self.args[0]) if self.args else ""


class AdapterStateError(PeftcoreError, RuntimeError):
    """The model's adapter state does not allow the operation (e.g. merged, not wrapped)."""


class CheckpointError(PeftcoreError, ValueError):
    """An adapter directory is missing, malformed, or does not fit the model."""


class PluginError(PeftcoreError, RuntimeError):
    """A plugin cannot be found, imported, or is built for another plugin API version."""


class PluginConflictError(PluginError):
    """Several distributions claim one entry name and the user has not chosen one."""


class BackendUnavailableError(PeftcoreError, RuntimeError):
    """A kernel backend asked for by name is not available here."""


class DataError(PeftcoreError, ValueError):
    """A dataset file is missing, malformed, or lacks a column."""
