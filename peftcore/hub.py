"""Hugging Face Hub repository ids as adapter paths, resolved through ``huggingface_hub``'s cache.

``peftcore.load(model, "org/name")`` downloads the adapter's files once into the Hub cache
(``HF_HUB_CACHE``, or ``HF_HOME/hub``, or ``~/.cache/huggingface/hub``) and reads them from there
afterwards. A local path that exists always wins over a repository of the same name.
``HF_HUB_OFFLINE=1`` reads the cache only. ``huggingface_hub`` is imported only for ids.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from peftcore.errors import CheckpointError

#: What ``owner/name`` may look like (the Hub's rule: letters, digits, ``-``, ``_``, ``.``).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
#: The files an adapter consists of, in either format.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "SHA256SUMS")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub repository id (``owner/name``, no ``..``)."""
    return _REPO_ID.fullmatch(text) is not None and ".." not in text and not text.endswith(".")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str | None:
    """The Hub cache as the environment says now (``huggingface_hub`` reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve(path: str | os.PathLike) -> Path:
    """The local directory of ``path``: itself if it exists or is not a repository id, else the Hub snapshot.

    Raises:
        CheckpointError: a repository id that cannot be resolved: ``huggingface_hub`` missing,
            offline and not cached, no such repository, or the Hub unreachable.
    """
    local = Path(path)
    text = os.fspath(path)
    if local.exists() or not is_repo_id(text):
        return local
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:
        raise CheckpointError(
            f"no local directory {text!r}; reading it as a Hugging Face Hub repository id needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from exc
    cache = _cache_dir()
    where = cache or "the default Hugging Face cache"
    try:
        snapshot = huggingface_hub.snapshot_download(
            text, allow_patterns=list(ADAPTER_FILES), cache_dir=cache, local_files_only=_offline()
        )
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"no local directory {text!r}, and no Hub repository {text!r} (or it is private: "
                              f"log in with `hf auth login`)") from exc
    except LocalEntryNotFoundError as exc:
        if _offline():
            raise CheckpointError(
                f"no local directory {text!r}, and the Hub repository {text!r} is not in the cache ({where}) while "
                "HF_HUB_OFFLINE is set; download it once with network access (unset HF_HUB_OFFLINE) or pass a local path"
            ) from exc
        raise CheckpointError(f"no local directory {text!r}, and the Hub repository {text!r} could not be fetched "
                              f"(not cached in {where}, and the Hub is unreachable): {exc}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"no local directory {text!r}, and fetching the Hub repository {text!r} failed: {exc}") from exc
    return Path(snapshot)
