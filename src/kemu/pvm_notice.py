"""KVM on a PVM host: say what will happen, and never leave the screen silent.

On a host whose /dev/kvm is PVM (``/sys/module/kvm_pvm``), KVM runs the guest
kernel's code in its instruction emulator: Debian's kernel took 138 s to
decompress and about 60 s more to reach early init (docs: PLATFORM.md), and
its decompressor prints nothing (no ``CONFIG_X86_VERBOSE_BOOTUP``).  So
``kemu`` prints one line at start saying so, switches on the guest's early
console, and until the guest prints its first byte says every so often that
it is still starting.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from kemu.machines.config import MachineConfig

#: Added to an x86 guest's command line on PVM, unless it asks for early output
#: itself: the decompressor's errors and the early kernel print on COM1 (ttyS0).
EARLY_OUTPUT = "earlyprintk=serial,ttyS0,115200"

#: The one line printed at start.
PVM_NOTE = ("kemu: warning: /dev/kvm is PVM: the guest kernel runs in software emulation, "
            "far slower than TCG; expect minutes (Debian's kernel: about 3) before Linux "
            "prints anything, if it boots at all{early}")

_EARLY = re.compile(r"(^|\s)(earlyprintk|earlycon)(=|\s|$)")


def prepare_for_pvm(config: MachineConfig, pvm: bool | None = None) -> str | None:
    """On a PVM host, for a machine on KVM: the line to print at start, with the
    guest's early output switched on (``earlyprintk`` on ttyS0, unless the command
    line has an early console already or there is no serial).  None, and
    ``config`` untouched, elsewhere.  ``pvm`` overrides the host's answer."""
    if pvm is None:
        from kemu.accel.kvm import is_pvm
        pvm = is_pvm()
    if config.accel != "kvm" or not pvm:
        return None
    early = ""
    append = config.append or ""
    if not _EARLY.search(append) and config.extra.get("serial", "mon:stdio") != "none":
        config.append = f"{append} {EARLY_OUTPUT}".strip()
        early = f" ({EARLY_OUTPUT} added)"
    return PVM_NOTE.format(early=early)


class SilenceReporter:
    """Passes the guest's console output on; until its first byte, a line on
    ``stream`` every ``every`` seconds saying the guest is still starting."""

    def __init__(self, sink: Callable[[bytes], object], every: float = 30.0,
                 stream: TextIO | None = None) -> None:
        self._sink = sink
        self._every = every
        self._stream = stream
        self._spoke = threading.Event()
        self._thread = threading.Thread(target=self._report, name="pvm-silence", daemon=True)

    def write(self, data: bytes) -> None:
        if data and not self._spoke.is_set():
            self._spoke.set()
        self._sink(data)

    def start(self) -> None:
        self._thread.start()

    def _report(self) -> None:
        start = time.monotonic()
        while not self._spoke.wait(self._every):
            stream = self._stream or sys.stderr
            waited = int(time.monotonic() - start)
            stream.write(f"\r\nkemu: {waited} s, nothing from the guest yet: its kernel is "
                         "still starting under PVM\r\n")
            stream.flush()
