"""-smp N on the virt board with purpose-built bare-metal guests.

Each guest is assembled at test time as an arm64 Image (the header the board
loads), boots on CPU 0, starts the others with PSCI CPU_ON, and powers off
with PSCI SYSTEM_OFF; the test reads its results from guest RAM.  Shared
data lives at RESULTS, identity-mapped where a guest turns its MMU on.
"""

import threading

import pytest

from kemu.backends.serial import SerialBackend
from kemu.machines.arm64_virt import VirtMachine
from kemu.machines.config import MachineConfig

from test_tcg_aarch64 import assemble

RESULTS = 0x4F000000

HEADER = """
    .text
_start:
    b entry
    .word 0
    .quad 0                 // text_offset
    .quad 0x100000          // image_size
    .quad 0xa               // flags: little-endian, 4K pages
    .quad 0, 0, 0
    .ascii "ARM\\x64"
    .word 0
entry:
"""

# x0 = CPU index to start, x1 = entry; clobbers x0-x3.
CPU_ON = """
    mov x2, x1
    mov x1, x0
    ldr x0, =0xC4000003     // CPU_ON (64-bit)
    mov x3, x1              // context_id = index
    hvc #0
"""

POWEROFF = """
    ldr x0, =0x84000008
    hvc #0
"""


def run_guest(tmp_path, body: str, smp: int, cpu: str = "cortex-a57",
              timeout: float = 60.0) -> VirtMachine:
    kernel = tmp_path / "Image"
    kernel.write_bytes(assemble(tmp_path, HEADER + body + "\n    .ltorg\n"))
    cfg = MachineConfig(kernel=kernel, memory=256 << 20, smp=smp, cpu=cpu, append="")
    machine = VirtMachine(cfg, SerialBackend(lambda b: None))
    machine.start()
    outcome = machine.wait(timeout)
    if outcome is None:
        machine.stop()
        machine.wait(10)
        pytest.fail("the guest did not power off")
    assert outcome.reason == "poweroff", outcome
    return machine


def u64(machine: VirtMachine, addr: int) -> int:
    return machine.memory.read_int(addr, 8)


def counter_guest(smp: int, rounds: int, increment: str) -> str:
    """Every CPU adds 1 to RESULTS ``rounds`` times with ``increment`` (x1 = address),
    records its MPIDR at RESULTS + 0x100 + 8 * index, then counts itself done at
    RESULTS + 0x40; CPU 0 powers off when all are done."""
    return f"""
    mov x20, #0                  // CPU 0
    mov x21, #1
start_next:
    cmp x21, #{smp}
    b.ge work
    mov x0, x21
    adr x1, secondary
    {CPU_ON}
    add x21, x21, #1
    b start_next
secondary:
    mov x20, x0                  // context_id: this CPU's index
work:
    mrs x9, mpidr_el1
    ldr x10, ={RESULTS + 0x100}
    str x9, [x10, x20, lsl #3]
    ldr x1, ={RESULTS}
    ldr x22, ={rounds}
1:  {increment}
    subs x22, x22, #1
    b.ne 1b
    ldr x5, ={RESULTS + 0x40}
2:  ldxr x3, [x5]
    add x3, x3, #1
    stxr w4, x3, [x5]
    cbnz w4, 2b
    cbnz x20, park
3:  ldr x3, [x5]
    cmp x3, #{smp}
    b.ne 3b
    {POWEROFF}
park:
    wfi
    b park
"""


LDXR_STXR = """
4:  ldxr x3, [x1]
    add x3, x3, #1
    stxr w4, x3, [x1]
    cbnz w4, 4b
"""


@pytest.mark.parametrize("smp", [2, 4])
def test_exclusive_increments_from_every_cpu_add_up(tmp_path, smp):
    rounds = 200_000
    m = run_guest(tmp_path, counter_guest(smp, rounds, LDXR_STXR), smp)
    assert u64(m, RESULTS) == smp * rounds
    assert [u64(m, RESULTS + 0x100 + 8 * i) for i in range(smp)] == \
        [0x80000000 | i for i in range(smp)]
    assert len(m.vcpu_thread_ids()) == smp


def test_exclusive_pair_increments_from_every_cpu_add_up(tmp_path):
    """LDXP/STXP: a 128-bit host compare-and-swap (cmpxchg16b), no stop-the-world."""
    rounds = 100_000
    m = run_guest(tmp_path, counter_guest(2, rounds, """
4:  ldxp x3, x4, [x1]
    add x3, x3, #1
    add x4, x4, #2
    stxp w5, x3, x4, [x1]
    cbnz w5, 4b
"""), 2)
    assert (u64(m, RESULTS), u64(m, RESULTS + 8)) == (2 * rounds, 4 * rounds)


def test_lse_atomic_adds_from_every_cpu_add_up(tmp_path):
    rounds = 200_000
    body = ".arch armv8.1-a\n" + counter_guest(2, rounds, "mov x3, #1\n    stadd x3, [x1]")
    m = run_guest(tmp_path, body, 2, cpu="max")
    assert u64(m, RESULTS) == 2 * rounds


def test_vcpus_run_on_host_threads_in_parallel(tmp_path):
    """Both vCPU threads are inside guest code at the same time: each spins until
    it sees the other's flag, which only a vCPU running concurrently can set."""
    m = run_guest(tmp_path, f"""
    mov x0, #1
    adr x1, secondary
    {CPU_ON}
    ldr x1, ={RESULTS}
    mov x2, #1
    str x2, [x1]             // CPU 0 is here
1:  ldr x3, [x1, #8]         // until CPU 1 is too
    cbz x3, 1b
    {POWEROFF}
secondary:
    ldr x1, ={RESULTS}
2:  ldr x3, [x1]
    cbz x3, 2b
    mov x2, #1
    str x2, [x1, #8]
3:  wfi
    b 3b
""", 2)
    assert u64(m, RESULTS + 8) == 1


GICD, GICC = 0x08000000, 0x08010000


def test_sgi_through_gicd_sgir_wakes_a_cpu_in_wfi(tmp_path):
    """CPU 1 waits in WFI with IRQs unmasked; CPU 0 sends it SGI 5 through
    GICD_SGIR (target list): CPU 1 takes the IRQ and reads IAR = 5 from CPU 0."""
    m = run_guest(tmp_path, f"""
    ldr x10, ={GICD}
    mov w11, #1
    str w11, [x10]               // GICD_CTLR.Enable
    mov x0, #1
    adr x1, secondary
    {CPU_ON}
    ldr x1, ={RESULTS}
1:  ldr x3, [x1]                 // CPU 1 ready
    cbz x3, 1b
    ldr x10, ={GICD + 0xF00}
    ldr w11, =0x00020005         // TargetListFilter 0, CPU 1, SGI 5
    str w11, [x10]
2:  ldr x3, [x1, #8]             // CPU 1 took it
    cbz x3, 2b
    {POWEROFF}
secondary:
    adr x0, vectors
    msr vbar_el1, x0
    ldr x10, ={GICC}
    mov w11, #0xff
    str w11, [x10, #4]           // GICC_PMR
    mov w11, #1
    str w11, [x10]               // GICC_CTLR.Enable
    msr daifclr, #2
    ldr x1, ={RESULTS}
    mov x2, #1
    str x2, [x1]
3:  wfi
    ldr x3, [x1, #8]
    cbz x3, 3b
4:  wfi
    b 4b
    .balign 2048
vectors:
    .skip 0x280                  // current EL with SP_ELx, IRQ
    ldr x10, ={GICC}
    ldr w12, [x10, #0xC]         // GICC_IAR
    str w12, [x10, #0x10]        // GICC_EOIR
    ldr x1, ={RESULTS}
    add x12, x12, #0x1000        // nonzero even for INTID 0
    str x12, [x1, #8]
    eret
""", 2)
    assert u64(m, RESULTS + 8) - 0x1000 == 5           # INTID 5, source CPU 0


# Translation tables built by CPU 0: TTBR0 L1[1] -> identity 2 MiB blocks over
# RAM; L1[2] (VA 0x80000000) -> one 2 MiB block, first at OLD then at NEW.
OLD, NEW = 0x48000000, 0x48200000
MMU_ON = """
    adr x0, l1
    msr ttbr0_el1, x0
    ldr x0, =0x100803519         // IPS 36 bits, EPD1, SH0 inner, WB, T0SZ 25
    msr tcr_el1, x0
    ldr x0, =0x00ff
    msr mair_el1, x0             // attr 0: normal write-back
    isb
    mrs x0, sctlr_el1
    orr x0, x0, #1
    msr sctlr_el1, x0
    isb
"""


def test_tlbi_is_on_one_cpu_reaches_the_other(tmp_path):
    """CPU 1 has a translation of VA 0x80000000 in its TLB; CPU 0 changes the
    block descriptor and issues TLBI VAAE1IS + DSB: CPU 1 then sees the new page."""
    m = run_guest(tmp_path, f"""
    adr x1, l1
    adr x2, l2a
    orr x3, x2, #3
    str x3, [x1, #8]
    adr x2, l2b
    orr x3, x2, #3
    str x3, [x1, #16]
    ldr x4, =0x40000701          // block, AF, inner shareable, attr 0
    adr x2, l2a
    mov x5, #128
1:  str x4, [x2], #8
    add x4, x4, #0x200000
    subs x5, x5, #1
    b.ne 1b
    ldr x4, ={OLD | 0x701}
    adr x2, l2b
    str x4, [x2]
    ldr x1, ={OLD}
    ldr x2, =1111
    str x2, [x1]
    ldr x1, ={NEW}
    ldr x2, =2222
    str x2, [x1]
    dsb sy
    mov x0, #1
    adr x1, secondary
    {CPU_ON}
    {MMU_ON}
    ldr x1, ={RESULTS}
2:  ldr x3, [x1]                 // CPU 1 has used the old translation
    cbz x3, 2b
    ldr x4, ={NEW | 0x701}
    adr x2, l2b
    str x4, [x2]
    dsb ishst
    mov x0, #0x80000             // VA >> 12
    tlbi vaae1is, x0
    dsb ish
    isb
    mov x2, #1
    str x2, [x1, #8]             // switched
3:  ldr x3, [x1, #16]
    cbz x3, 3b
    {POWEROFF}
secondary:
    {MMU_ON}
    mov x6, #0x80000000
    ldr x7, [x6]
    ldr x1, ={RESULTS}
    str x7, [x1]
4:  ldr x3, [x1, #8]
    cbz x3, 4b
    ldr x7, [x6]
    str x7, [x1, #16]
5:  wfi
    b 5b
    .ltorg
    .balign 4096
l1: .skip 4096
l2a: .skip 4096
l2b: .skip 4096
""", 2)
    assert (u64(m, RESULTS), u64(m, RESULTS + 16)) == (1111, 2222)


IC_MAINTENANCE = """
    adr x2, func
    dc cvau, x2
    dsb ish
    ic ivau, x2
    dsb ish
"""


@pytest.mark.parametrize("cleaner", ["writer", "runner"])
def test_code_written_by_one_cpu_runs_on_the_other_after_ic_ivau(tmp_path, cleaner):
    """CPU 1 has run (translated) a function; CPU 0 rewrites it, and the
    writer or CPU 1 itself does the instruction-cache maintenance (DC CVAU,
    DSB, IC IVAU, DSB): CPU 1, after its ISB, runs the new code, though its
    own engine never saw the store."""
    m = run_guest(tmp_path, f"""
    mov x0, #1
    adr x1, secondary
    {CPU_ON}
    ldr x1, ={RESULTS}
1:  ldr x3, [x1]                 // CPU 1 ran the old code
    cbz x3, 1b
    adr x2, func
    ldr w4, new_insn
    str w4, [x2]
    dsb ish
    {IC_MAINTENANCE if cleaner == "writer" else ""}
    mov x3, #1
    str x3, [x1, #8]
2:  ldr x3, [x1, #16]
    cbz x3, 2b
    {POWEROFF}
secondary:
    ldr x1, ={RESULTS}
    bl func
    str x0, [x1]
3:  ldr x3, [x1, #8]
    cbz x3, 3b
    {IC_MAINTENANCE if cleaner == "runner" else ""}
    isb
    bl func
    str x0, [x1, #16]
4:  wfi
    b 4b
new_insn:
    mov x0, #2
    .balign 4096
func:
    mov x0, #1
    ret
""", 2)
    assert (u64(m, RESULTS), u64(m, RESULTS + 16)) == (1, 2)


def test_psci_cpu_off_and_affinity_info(tmp_path):
    """CPU 1 turns itself off (CPU_OFF); CPU 0 polls AFFINITY_INFO until OFF,
    gets ALREADY_ON while it ran, and starts it again with CPU_ON."""
    m = run_guest(tmp_path, f"""
    mov x0, #1
    adr x1, secondary
    {CPU_ON}
    mov x0, #1
    adr x1, secondary
    {CPU_ON}
    ldr x1, ={RESULTS}
    str x0, [x1, #0x20]          // second CPU_ON: ALREADY_ON or ON_PENDING
    mov x3, #1
    str x3, [x1, #0x38]          // CPU 1 may turn itself off now
1:  ldr x0, =0xC4000004          // AFFINITY_INFO
    mov x1, #1
    mov x2, #0
    hvc #0
    cmp x0, #1                   // OFF
    b.ne 1b
    ldr x1, ={RESULTS}
    ldr x3, [x1]
    str x3, [x1, #0x28]          // runs so far
    mov x0, #1
    adr x1, again
    {CPU_ON}
    ldr x1, ={RESULTS}
2:  ldr x3, [x1, #0x30]
    cbz x3, 2b
    {POWEROFF}
secondary:
    ldr x1, ={RESULTS}
    ldr x3, [x1]
    add x3, x3, #1
    str x3, [x1]
5:  ldr x3, [x1, #0x38]
    cbz x3, 5b
    ldr x0, =0x84000002          // CPU_OFF
    hvc #0
    b .
again:
    ldr x1, ={RESULTS}
    mov x3, #1
    str x3, [x1, #0x30]
3:  wfi
    b 3b
""", 2)
    assert u64(m, RESULTS + 0x28) == 1
    assert u64(m, RESULTS + 0x20) in ((1 << 64) - 4, (1 << 64) - 5)
    assert u64(m, RESULTS + 0x30) == 1


def test_more_than_eight_cpus_are_refused(tmp_path):
    from kemu.errors import ConfigError
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"")
    with pytest.raises(ConfigError, match="1 to 8"):
        VirtMachine(MachineConfig(kernel=kernel, smp=9), SerialBackend(lambda b: None))


def test_pause_and_resume_stop_every_vcpu(tmp_path):
    """Pause stops both spinning vCPUs; the shared counters do not move while paused."""
    kernel = tmp_path / "Image"
    kernel.write_bytes(assemble(tmp_path, HEADER + f"""
    mov x0, #1
    adr x1, secondary
    {CPU_ON}
    ldr x1, ={RESULTS}
1:  ldr x3, [x1]
    add x3, x3, #1
    str x3, [x1]
    b 1b
secondary:
    ldr x1, ={RESULTS + 8}
2:  ldr x3, [x1]
    add x3, x3, #1
    str x3, [x1]
    b 2b
    .ltorg
"""))
    machine = VirtMachine(MachineConfig(kernel=kernel, memory=256 << 20, smp=2, append=""),
                          SerialBackend(lambda b: None))
    machine.start()
    try:
        moving = threading.Event()
        for _ in range(2000):
            if u64(machine, RESULTS) and u64(machine, RESULTS + 8):
                moving.set()
                break
            threading.Event().wait(0.005)
        assert moving.is_set()
        assert machine.pause()
        before = (u64(machine, RESULTS), u64(machine, RESULTS + 8))
        threading.Event().wait(0.05)
        assert (u64(machine, RESULTS), u64(machine, RESULTS + 8)) == before
        machine.resume()
        for _ in range(2000):
            if u64(machine, RESULTS + 8) > before[1] and u64(machine, RESULTS) > before[0]:
                break
            threading.Event().wait(0.005)
        assert u64(machine, RESULTS + 8) > before[1] and u64(machine, RESULTS) > before[0]
    finally:
        machine.stop()
        assert machine.wait(10) is not None


def test_an_atomic_on_mmio_runs_once_with_parallel_translation(tmp_path):
    """LDADD on a device register cannot be a host atomic: the engine runs that
    one instruction serially (it used to retry it forever)."""
    m = run_guest(tmp_path, f"""
    .arch armv8.1-a
    ldr x1, ={GICD + 0x420}      // GICD_IPRIORITYR, INTIDs 32-35
    ldr w2, =0x10203040
    str w2, [x1]
    ldr w3, =0x01010101
    ldadd w3, w4, [x1]
    ldr w5, [x1]
    ldr x1, ={RESULTS}
    stp x4, x5, [x1]
    {POWEROFF}
""", 2, cpu="max", timeout=20)
    assert (u64(m, RESULTS), u64(m, RESULTS + 8)) == (0x10203040, 0x11213141)
