"""``kemu -M microvm -accel kvm`` where /dev/kvm is PVM (issue 17, item 1): the
first line says what will happen and the guest gets an early console; where
KVM is hardware-backed nothing is added.  A purpose-built guest (it prints
its command line) boots in seconds even on PVM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guests"))
import guestbuild

from kemu.accel.kvm import is_pvm
from kemu.pvm_notice import EARLY_OUTPUT

_reason = guestbuild.kvm_guest_unavailable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def test_the_first_line_says_what_kvm_will_do_here(tmp_path):
    kernel = tmp_path / "microvm.bzImage"
    kernel.write_bytes(guestbuild.build_bzimage("microvm", tmp_path))
    proc = subprocess.run([sys.executable, "-m", "kemu.cli", "-M", "microvm", "-accel", "kvm",
                           "-kernel", str(kernel), "-append", "console=ttyS0 kemu.test",
                           "-nographic", "-no-reboot"],
                          input=b"ping\n", capture_output=True, timeout=600)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, out + err
    cmdline = next(line for line in out.splitlines() if line.startswith("cmdline "))
    if is_pvm():
        first = err.splitlines()[0]
        assert first.startswith("kemu: warning: /dev/kvm is PVM") and "minutes" in first
        assert cmdline == f"cmdline console=ttyS0 kemu.test {EARLY_OUTPUT}"
    else:
        assert "PVM" not in err
        assert cmdline == "cmdline console=ttyS0 kemu.test"
