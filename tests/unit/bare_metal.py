"""Run a bare-metal test guest (a raw binary printing hex lines on the PL011,
then PSCI SYSTEM_OFF) under kemu's virt board and under qemu-system-aarch64."""

from __future__ import annotations

import subprocess

import pytest

from kemu.backends.serial import SerialBackend
from kemu.machines.arm64_virt import VirtMachine
from kemu.machines.config import MachineConfig

MiB = 1 << 20

#: ``bl hex`` prints x0 as 16 hex digits and a newline (clobbers x9-x13).
HEX = r"""
hex:
    ldr x9, =0x09000000
    mov x10, #60
1:  lsr x11, x0, x10
    and x11, x11, #15
    cmp x11, #10
    add x12, x11, #'0'
    add x13, x11, #('a' - 10)
    csel x11, x12, x13, lt
    str w11, [x9]
    subs x10, x10, #4
    b.ge 1b
    mov x11, #10
    str w11, [x9]
    ret
"""


def run_kemu(kernel, **config) -> list[int]:
    """The numbers the guest printed under kemu (``config``: MachineConfig fields)."""
    out = bytearray()
    machine = VirtMachine(MachineConfig(kernel=kernel, memory=128 * MiB, **config),
                          SerialBackend(out.extend))
    machine.start()
    outcome = machine.wait(60)
    if outcome is None:
        machine.stop()
        machine.wait(10)
        pytest.fail(f"the guest did not power off; it printed {out.decode()!r}")
    assert outcome.reason == "poweroff", outcome
    return [int(line, 16) for line in out.decode().split()]


def run_qemu(qemu: str, kernel, *args: str, cpu: str = "cortex-a57") -> list[int]:
    """The numbers the guest printed under QEMU with the same board and CPU."""
    r = subprocess.run([qemu, "-M", "virt", "-cpu", cpu, "-m", "128", "-nographic",
                        "-nodefaults", "-serial", "stdio", "-kernel", str(kernel), *args],
                       capture_output=True, text=True, timeout=60, check=True)
    return [int(line, 16) for line in r.stdout.split()]
