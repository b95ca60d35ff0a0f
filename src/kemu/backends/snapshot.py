"""QEMU's ``-snapshot``: the guest writes to a temporary qcow2 overlay.

As QEMU's bdrv_append_temp_snapshot: each writable image becomes the
backing file of a new qcow2 image in the temporary directory (``$TMPDIR``,
else ``/var/tmp`` as QEMU's get_tmp_filename) that takes every write; the
image itself is opened read-only and locked as QEMU locks it there (it
reads, and lets nobody else write or resize it), so it is left untouched.
The overlay file is unlinked as soon as it is open: it is gone when kemu
exits, however it exits.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from kemu.backends.block import open_image


def temp_dir() -> str:
    return os.environ.get("TMPDIR") or "/var/tmp"


def open_snapshot(path: str | Path, format: str | None = None, *,
                  on_warning: Callable[[str], None] | None = None,
                  locking: str = "auto"):
    """``path`` (raw or qcow2) read-only under a fresh writable qcow2 overlay."""
    from kemu.backends.block import detect_format
    from kemu.backends.locking import image_permissions, snapshot_base_permissions
    from kemu.backends.qcow2 import Qcow2Image
    from kemu.backends.qcow2.create import create_qcow2
    path = Path(path).absolute()
    fmt = format or detect_format(path)
    base = open_image(path, fmt, read_only=True, locking=locking,
                      lock=snapshot_base_permissions(), on_warning=on_warning)
    try:
        fd, overlay = tempfile.mkstemp(prefix="kemu-snapshot-", suffix=".qcow2", dir=temp_dir())
        os.close(fd)
        try:
            create_qcow2(overlay, base.size, backing_file=str(path), backing_format=fmt)
            return Qcow2Image.open(overlay, read_only=False, locking=locking,
                                   lock=image_permissions("qcow2", False), backing_image=base)
        finally:
            os.unlink(overlay)
    except BaseException:
        base.close()
        raise
