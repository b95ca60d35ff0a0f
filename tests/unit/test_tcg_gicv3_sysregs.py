"""The engine's GICv3 CPU interface registers (patch 0010) through Aarch64Cpu.

With a GICv3 the vCPU has the ICC_* registers: each MRS/MSR reaches the
device with the CPU's index, ID_AA64PFR0_EL1.GIC reads 1, and an EL0 access
(which the architecture makes UNDEFINED) is an exception the guest takes,
not a call into the device.  Without one, ICC_* is UNDEFINED at EL1 too.
"""

from kemu.accel.base import SystemEvent
from kemu.accel.tcg.aarch64 import Aarch64Cpu
from kemu.devices.gic import cpuif as icc

from test_tcg_aarch64 import POWEROFF, RAM, Board, assemble


class RecordingCpuif:
    readable, writable = icc.READABLE, icc.WRITABLE

    def __init__(self):
        self.log = []

    def read(self, cpu, enc):
        self.log.append(("read", cpu, enc))
        return 0x1B if enc == icc.ICC_IAR1_EL1 else 0x7

    def write(self, cpu, enc, value):
        self.log.append(("write", cpu, enc, value))


GUEST = f"""
    adr x1, vectors
    msr vbar_el1, x1
    isb
    mrs x19, id_aa64pfr0_el1
    mrs x20, S3_0_C12_C12_0        // ICC_IAR1_EL1
    ldr x1, =0x0100000000010002
    msr S3_0_C12_C11_5, x1         // ICC_SGI1R_EL1
    mrs xzr, S3_0_C12_C12_5        // ICC_SRE_EL1 into xzr
    ldr x1, =0x40070000
    msr sp_el0, x1
    adr x1, user
    msr elr_el1, x1
    msr spsr_el1, xzr              // EL0t
    eret
user:
    mrs x21, S3_0_C12_C12_0        // UNDEFINED at EL0
    b .
    .balign 2048
vectors:
    .skip 0x400
    mrs x22, esr_el1               // lower EL, synchronous
    {POWEROFF}
    .ltorg
"""


def _cpu_with(code, device):
    """Test_tcg_aarch64's board with CPU 3 and a GICv3 CPU interface."""
    b = Board(code)
    b.cpu = Aarch64Cpu(3, b.memory, [(0x09000000, 0x1000)], b._io,
                       lambda cpu, args: b.psci.call(cpu, *args), b.vtimer, b.ptimer,
                       gicv3=device)
    b.cpu.reset_for_linux(RAM, 0)
    return b


def test_icc_registers_reach_the_device_and_el0_is_refused(tmp_path):
    device = RecordingCpuif()
    b = _cpu_with(assemble(tmp_path, GUEST), device)
    assert b.run() == SystemEvent("poweroff")
    assert (b.x(19) >> 24) & 0xF == 1                       # ID_AA64PFR0_EL1.GIC
    assert b.x(20) == 0x1B
    assert device.log == [("read", 3, icc.ICC_IAR1_EL1),
                          ("write", 3, icc.ICC_SGI1R_EL1, 0x0100000000010002),
                          ("read", 3, icc.ICC_SRE_EL1)]      # nothing from EL0
    assert b.x(22) >> 26 == 0                               # EC 0: UNDEFINED


def test_without_gicv3_icc_is_undefined_and_pfr0_gic_is_0(tmp_path):
    b = Board(assemble(tmp_path, f"""
        adr x1, vectors
        msr vbar_el1, x1
        isb
        mrs x19, id_aa64pfr0_el1
        mrs x20, S3_0_C12_C12_0
        b .
        .balign 2048
    vectors:
        .skip 0x200
        mrs x22, esr_el1
        {POWEROFF}
        .ltorg"""))
    assert b.run() == SystemEvent("poweroff")
    assert (b.x(19) >> 24) & 0xF == 0
    assert b.x(22) >> 26 == 0
