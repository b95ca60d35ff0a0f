"""A small tmpfs to fill up under disk images (tests of a full host disk).

``small_tmpfs`` mounts a tmpfs of a given size in the test's temporary
directory (root only: the test is skipped, saying why, where mounting is
not permitted) and unmounts it afterwards.  ``fill`` writes a filler file
until the file system is full; deleting it frees the space again.
"""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def mount_tmpfs(where: Path, size: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): "
                    f"full-disk tests need root")


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextmanager
def small_tmpfs(parent: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``parent/tmpfs`` meanwhile (or a skip)."""
    where = parent / "tmpfs"
    mount_tmpfs(where, size)
    try:
        yield where
    finally:
        unmount(where)


def fill(path: Path, limit: int | None = None) -> int:
    """Write ``path`` until the file system is full (or ``limit`` bytes); its size."""
    chunk = b"\xA5" * 65536
    written = 0
    with open(path, "wb", buffering=0) as f:
        while limit is None or written < limit:
            try:
                n = f.write(chunk if limit is None else chunk[:limit - written])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
            written += n or 0
            if not n:
                break
    return written


def free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize
