"""kemu's TCG engine: the switches its Unicorn patch series adds, one by one.

Raw Unicorn instances here (no board), so each test shows one switch's
behaviour against the engine's default, which must stay Unicorn's own.
"""

import ctypes
import struct
import threading

import pytest
from unicorn import UC_ARCH_ARM64, UC_HOOK_INTR, UC_MODE_ARM, Uc
from unicorn import arm64_const as A
from unicorn.unicorn_py3.arch.arm64 import HOOK_INSN_SYS_CFUNC

from kemu.accel.tcg import engine
from kemu.errors import AccelError

RAM = 0x40000000


def chase_pointers(exact: bool, stops: int) -> int:
    """Stop ``ldr x0, [x0]; add x1, x1, #1; b 1b`` from another thread ``stops``
    times; count the stops after which x0 and x1 disagree."""
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    if exact:
        assert engine.uc_ctl_write(uc, engine.UC_CTL_TCG_EXACT_STOP, 1) == 0
    uc.mem_map(RAM, 0x100000)
    nodes = RAM + 0x10000
    for i in range(256):
        uc.mem_write(nodes + 16 * i, struct.pack("<Q", nodes + 16 * ((i + 1) % 256)))
    uc.mem_write(RAM, struct.pack("<III", 0xF9400000, 0x91000421, 0x17FFFFFE))
    uc.reg_write(A.UC_ARM64_REG_X0, nodes)
    pc, inconsistent = RAM, 0
    for _ in range(stops):
        threading.Timer(0.0005, uc.emu_stop).start()
        # The stock engine loses a stop that lands before emu_start begins;
        # its own timeout (the same asynchronous stop) ends the run then.
        uc.emu_start(pc, 0, timeout=0 if exact else 200_000)
        pc = uc.reg_read(A.UC_ARM64_REG_PC)
        x0, x1 = uc.reg_read(A.UC_ARM64_REG_X0), uc.reg_read(A.UC_ARM64_REG_X1)
        inconsistent += x0 != nodes + 16 * (x1 % 256)
    return inconsistent


def test_default_engine_rewinds_an_executed_load():
    """Off by default: Unicorn's own behaviour, a stop replays ``ldr x0, [x0]``."""
    assert chase_pointers(exact=False, stops=20) > 0


def test_exact_stop_never_replays_an_instruction():
    assert chase_pointers(exact=True, stops=300) == 0


def test_exact_stop_requested_while_idle_is_kept():
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    assert engine.uc_ctl_write(uc, engine.UC_CTL_TCG_EXACT_STOP, 1) == 0
    assert engine.uc_ctl_read(uc, engine.UC_CTL_TCG_EXACT_STOP) == 1
    uc.mem_map(RAM, 0x1000)
    uc.mem_write(RAM, struct.pack("<I", 0x14000000))      # b . (forever)
    uc.emu_stop()                                          # before emu_start
    uc.emu_start(RAM, 0)                                   # returns at once
    assert uc.reg_read(A.UC_ARM64_REG_PC) == RAM
    # Consumed: a later stop from another thread ends the next run.
    threading.Timer(0.01, uc.emu_stop).start()
    uc.emu_start(RAM, 0)


def test_exact_stop_is_never_lost_around_the_start_of_a_run():
    """Stops landing just before, during and just after uc_emu_start begins
    all end the run (a lost one would leave ``b .`` spinning forever)."""
    import random
    import time

    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    assert engine.uc_ctl_write(uc, engine.UC_CTL_TCG_EXACT_STOP, 1) == 0
    uc.mem_map(RAM, 0x1000)
    uc.mem_write(RAM, struct.pack("<I", 0x14000000))      # b . (forever)
    go, done = threading.Semaphore(0), threading.Event()
    lost = []

    def stopper():
        rng = random.Random(1)
        while not done.is_set():
            if not go.acquire(timeout=0.1):
                continue
            end = time.perf_counter() + rng.random() * 100e-6
            while time.perf_counter() < end:
                pass
            uc.emu_stop()

    def watchdog(run):
        if not run.wait(10):                               # not stopped within 10 s
            lost.append(True)
            while not run.is_set():
                uc.emu_stop()
                time.sleep(0.01)

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            run = threading.Event()
            dog = threading.Thread(target=watchdog, args=(run,), daemon=True)
            dog.start()
            go.release()
            uc.emu_start(RAM, 0)
            run.set()
            dog.join()
            assert not lost
    finally:
        done.set()
        thread.join()


def test_sysreg_hook_sees_only_its_register():
    """UC_ARM64_INS_SYSREG: an MSR hook on CNTV_CTL_EL0 only."""
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    uc.mem_map(RAM, 0x1000)
    uc.mem_write(RAM, struct.pack("<5I",
                                  0xD51B4220,   # msr daif, x0
                                  0xD51BE321,   # msr cntv_ctl_el0, x1
                                  0xD518D082,   # msr tpidr_el1, x2
                                  0xD51BE321,   # msr cntv_ctl_el0, x1
                                  0xD503201F))  # nop
    uc.reg_write(A.UC_ARM64_REG_X1, 0x3)
    seen = []

    def on_msr(_uc, _reg, cp, key):
        raw = ctypes.string_at(cp, 32)
        crn, crm, op0, op1, op2 = struct.unpack_from("<5I", raw)
        seen.append(((op0, op1, crn, crm, op2), struct.unpack_from("<Q", raw, 24)[0], key))
        return 0

    cb = HOOK_INSN_SYS_CFUNC(on_msr)
    engine.add_sysreg_hook(uc, cb, A.UC_ARM64_INS_MSR, (3, 3, 14, 3, 1), key=7)
    uc.emu_start(RAM, RAM + 16)
    assert seen == [((3, 3, 14, 3, 1), 0x3, 7)] * 2


def test_native_exceptions_skip_the_hook_and_enter_the_vector():
    """UC_CTL_CPU_NATIVE_EXCEPTIONS: SVC taken by the CPU (ESR, ELR, vector)."""
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    uc.reg_write(A.UC_ARM64_REG_CP_REG, (1, 1, 3, 6, 0, 0x501))     # SCR_EL3: NS RW HCE
    uc.reg_write(A.UC_ARM64_REG_CP_REG, (1, 1, 3, 4, 0, 1 << 31))   # HCR_EL2: RW
    assert engine.uc_ctl_write(uc, engine.UC_CTL_CPU_NATIVE_EXCEPTIONS, 1 << 2,
                               ctypes.c_uint64) == 0
    assert engine.uc_ctl_read(uc, engine.UC_CTL_CPU_NATIVE_EXCEPTIONS,
                              ctypes.c_uint64) == 1 << 2
    uc.mem_map(RAM, 0x2000)
    uc.mem_write(RAM, struct.pack("<I", 0xD4024681))                 # svc #0x1234
    uc.mem_write(RAM + 0x1000 + 0x200, struct.pack("<I", 0xD503201F))  # current EL, SPx, sync
    uc.reg_write(A.UC_ARM64_REG_VBAR_EL1, RAM + 0x1000)
    uc.reg_write(A.UC_ARM64_REG_PSTATE, 0x3C5)                       # EL1h, DAIF masked
    hooked = []
    uc.hook_add(UC_HOOK_INTR, lambda u, n, d: hooked.append(n))
    uc.emu_start(RAM, RAM + 0x1000 + 0x204)
    assert hooked == []
    assert uc.reg_read(A.UC_ARM64_REG_ESR_EL1) == 0x56001234
    assert uc.reg_read(A.UC_ARM64_REG_ELR_EL1) == RAM + 4


def test_a_stock_engine_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(engine, "uc_ctl_write", lambda *a, **k: engine._UC_ERR_ARG)
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    with pytest.raises(AccelError) as err:
        engine.configure(uc, 0)
    message = str(err.value)
    assert "\n" not in message and "scripts/bootstrap.sh" in message
    assert "kemu's build of Unicorn" in message


def test_the_installed_engine_is_kemus():
    engine.configure(Uc(UC_ARCH_ARM64, UC_MODE_ARM), 0)     # raises on a stock engine
