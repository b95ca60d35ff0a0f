"""Host ends of the serial console's chardev (``-chardev pty|file,id=ID -serial chardev:ID``).

:class:`PtyChardev`: a pseudo-terminal pair; the guest's output goes to the
master side and what is typed on the slave side (``/dev/pts/N``, which
``virsh console`` opens) goes to the guest.  kemu keeps its own slave fd
open, in raw mode, so the master never sees a hang-up between clients;
output nobody reads fills the pty's buffer and is then dropped, never
blocking the guest.  :class:`FileChardev`: output appended to a file.
"""

from __future__ import annotations

import os
import select
import threading
import tty
from typing import Callable


class PtyChardev:
    def __init__(self, label: str) -> None:
        self.label = label
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None

    @property
    def filename(self) -> str:
        """QEMU's query-chardev ``filename``."""
        return f"pty:{self.path}"

    def write(self, data: bytes) -> None:
        try:
            os.write(self._master, data)
        except (BlockingIOError, OSError):
            pass                       # nobody reads: dropped, as a serial line would

    def start(self, on_input: Callable[[bytes], None]) -> None:
        def pump() -> None:
            while True:
                ready, _, _ = select.select([self._master, self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                try:
                    data = os.read(self._master, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if data:
                    on_input(data)
        self._thread = threading.Thread(target=pump, name=f"chardev-{self.label}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(2)
        for fd in (self._master, self._slave, self._stop_r, self._stop_w):
            os.close(fd)


class FileChardev:
    def __init__(self, label: str, path: str, append: bool) -> None:
        self.label = label
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append
                                                             else os.O_TRUNC), 0o644)

    @property
    def filename(self) -> str:
        return f"file:{self.path}"

    def write(self, data: bytes) -> None:
        try:
            os.write(self._fd, data)
        except OSError:
            pass

    def start(self, on_input: Callable[[bytes], None]) -> None:
        """A file gives no input."""

    def close(self) -> None:
        os.close(self._fd)


def open_chardev(cd) -> PtyChardev | FileChardev:
    """The host end of a pty or file :class:`kemu.machines.config.ChardevConfig`."""
    from kemu.errors import StartupError
    from kemu.options.keyval import parse_bool
    if cd.backend == "pty":
        return PtyChardev(cd.id)
    try:
        return FileChardev(cd.id, cd.props["path"],
                           parse_bool(cd.props.get("append", "off"), "append"))
    except OSError as e:
        raise StartupError(f"-chardev file,id={cd.id}: Could not open "
                           f"'{cd.props['path']}': {e.strerror or e}") from None
