"""Atomic local file writes: a reader sees the old file or the complete new one, never half.

Used for bitstreams, decoded images, model files and pipeline outputs on local disks. The
temporary file lives in the destination's directory (so the rename stays on one
filesystem), is named `.sgarc-<16 hex>.tmp` (dot-prefixed and ending in `.tmp`, so
listings skip leftovers of a crash; 27 bytes whatever the target's name, so a target with a
255-byte name can still be written), is created with O_EXCL and mode 0o666 (the umask
applies, as for a plain open), fsynced, then
renamed over the target; it is removed if anything fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import BinaryIO


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of our temporary files (never a real object)."""
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file; on a clean exit it replaces `path` atomically and durably."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, f".sgarc-{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)
