"""Adapter directories on disk: atomic replacement, checksums, and cleaning up after killed saves.

An adapter directory is written whole into a temporary sibling (``.<name>.tmp-<pid>-<random>``),
with a ``SHA256SUMS`` file (the format of ``sha256sum``, so ``sha256sum -c SHA256SUMS`` checks it
by hand) listing every other file's digest. The files and the directory are flushed to disk, then
the temporary directory takes the target's place:

* a new target: one ``rename``;
* an existing target: one ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+, glibc 2.28+, on ext4,
  xfs, btrfs, tmpfs and most local file systems) swaps the two directories in one step, and the
  old one, now under the temporary name, is removed. A reader, or a process killed at any point,
  sees the complete old directory or the complete new one at the path, never neither.

Where the exchange is unavailable (other systems, some network file systems) the old directory is
first renamed aside and the new one renamed into place: a kill between the two renames leaves
no directory at the path; the old one survives as ``.<name>.old-<pid>-<random>``.

A killed save leaves its temporary directory behind. The next save to the same path removes
every such leftover whose process is no longer running (a save running concurrently in another
live process keeps its own).

Reading verifies: a file listed in ``SHA256SUMS`` whose bytes do not match raises
:class:`CheckpointError` naming the file, before anything is loaded. Directories without
``SHA256SUMS`` (written by older peftcore versions or other tools) load unverified.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

from peftcore.errors import CheckpointError

CHECKSUM_FILE = "SHA256SUMS"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def write_dir(target: Path, files: dict[str, bytes]) -> None:
    """Writes ``files`` (name -> content) as the directory ``target``, replacing it atomically.

    ``SHA256SUMS`` is added. ``target``'s parent is created if needed; an existing ``target``
    must be a directory the caller has agreed to replace.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = _sibling(target, "tmp")
    os.mkdir(tmp)
    try:
        contents = dict(files)
        contents[CHECKSUM_FILE] = "".join(f"{sha256(data)}  {name}\n" for name, data in sorted(files.items())).encode()
        for name, data in contents.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the old directory


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        return
    old = _sibling(target, "old")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two directory entries atomically; ``False`` where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {str(a)!r} into {str(b)!r}: {os.strerror(err)}")


_libc_renameat2: object = None


def _renameat2():
    global _libc_renameat2
    if _libc_renameat2 is None:
        fn = False
        if os.name == "posix":
            try:
                fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", False)
            except OSError:
                fn = False
        if fn:
            fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
            fn.restype = ctypes.c_int
        _libc_renameat2 = fn
    return _libc_renameat2 or None


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: an earlier save of this process that was interrupted
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(target: Path) -> list[Path]:
    """The temporary directories that killed saves to ``target`` left behind (their process is gone)."""
    if not target.parent.is_dir():
        return []
    found = []
    for entry in target.parent.iterdir():
        match = _LEFTOVER.fullmatch(entry.name)
        if match and match["name"] == target.name and not _running(int(match["pid"])):
            found.append(entry)
    return found


def remove_leftovers(target: Path) -> None:
    """Removes what :func:`leftovers` lists."""
    for entry in leftovers(target):
        shutil.rmtree(entry, ignore_errors=True)


def sha256(data: bytes) -> str:
    """The hex SHA-256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def checksums(directory: Path) -> dict[str, str] | None:
    """File name -> recorded digest from ``SHA256SUMS``, or ``None`` when the directory has none.

    Raises:
        CheckpointError: ``SHA256SUMS`` exists but cannot be read or parsed.
    """
    file = directory / CHECKSUM_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {str(file)!r}: {exc}") from exc
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if match is None:
            raise CheckpointError(
                f"{str(file)!r} line {number} is not '<sha256>  <file name>'; the checksum file is damaged. "
                f"Restore the adapter, or delete {CHECKSUM_FILE} to load it unverified"
            )
        sums[match[2]] = match[1].lower()
    return sums


def read_verified(directory: Path, name: str, sums: dict[str, str] | None) -> bytes:
    """The bytes of ``directory / name``, checked against ``sums`` when it lists the file.

    Raises:
        FileNotFoundError: the file is missing (callers say what it should have been).
        CheckpointError: the file cannot be read, or its digest differs from the recorded one.
    """
    path = directory / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from exc
    if sums is not None and name in sums and sha256(data) != sums[name]:
        raise CheckpointError(
            f"{str(path)!r} does not match the checksum recorded when it was saved (in {CHECKSUM_FILE}): the file "
            f"is damaged or was changed after saving. Restore it from a good copy; if you changed it on purpose, "
            f"delete its line from {CHECKSUM_FILE} (or the whole file) to load it unverified"
        )
    return data
