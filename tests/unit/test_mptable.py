"""The MP table (Intel MP spec 1.4) the microvm board writes, read back."""

import pytest

from kemu.boot.mptable import (
    LEVEL_HIGH,
    MP_IRQ_EXTINT,
    MP_IRQ_INT,
    MP_IRQ_NMI,
    build_mp_table,
    level_triggered,
    mp_table_size,
    parse_mp_table,
)
from kemu.machines.console_watch import ConsoleWatcher


def test_table_lists_every_cpu_the_ioapic_and_pins():
    data = build_mp_table(0xF0000, 4, level_triggered([5, 6]))
    assert len(data) == mp_table_size(4)
    assert sum(data[:16]) & 0xFF == 0 and data[:4] == b"_MP_"
    t = parse_mp_table(data)
    assert t["physptr"] == 0xF0010
    assert t["lapic"] == 0xFEE00000
    assert t["cpus"] == [(0, 3), (1, 1), (2, 1), (3, 1)]     # enabled, the first the BSP
    assert t["ioapics"] == [(4, 0xFEC00000)]
    assert [(irq, pin) for _k, _f, irq, _d, pin in t["irqs"]] == [(i, i) for i in range(24)]
    assert all(k == MP_IRQ_INT and d == 4 for k, _f, _i, d, _p in t["irqs"])
    flags = {irq: f for _k, f, irq, _d, _p in t["irqs"]}
    assert flags[5] == flags[6] == LEVEL_HIGH and flags[4] == 0 and flags[0] == 0
    assert t["lints"] == [(MP_IRQ_EXTINT, 0, 0, 0, 0), (MP_IRQ_NMI, 0, 0, 0xFF, 1)]


def test_bad_sizes():
    with pytest.raises(ValueError):
        build_mp_table(0xF0000, 0)
    with pytest.raises(ValueError):
        parse_mp_table(b"\0" * 64)


def test_console_watcher_lines_split_anywhere():
    seen = []
    w = ConsoleWatcher({b"Kernel panic - not syncing": seen.append,
                        b"reboot: System halted": lambda line: seen.append("halt")})
    for chunk in (b"[ 1.0] Kernel pa", b"nic - not syncing: VFS: no root", b"\r\nok\n"):
        w.feed(chunk)
    assert seen == ["Kernel panic - not syncing: VFS: no root"]
    w.feed(b"x" * 10000 + b"reboot: System halted\n")
    assert seen[-1] == "halt"
