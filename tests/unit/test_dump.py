"""kemu.dump: the ELF core dump-guest-memory writes, read back with the struct layouts of
the ELF spec (and binutils' readelf when installed), and the QMP command's one-line errors."""

import io
import shutil
import struct
import subprocess

import pytest

from kemu import dump
from kemu.machines.config import MachineConfig
from kemu.qmp.commands import Commands
from kemu.qmp.protocol import QmpError


def test_core_layout(tmp_path):
    ram = bytearray(b"\xAB" * 4096)
    ram[100:104] = b"KEMU"
    regs = [{**{f"x{i}": i for i in range(31)}, "sp": 0x1000, "pc": 0x40080000,
             "pstate": 0x3C5}, {"pc": 0x40000000, "x0": -1}]
    out = io.BytesIO()
    dump.write_core(out, [(0x40000000, ram)], regs)
    core = out.getvalue()
    ident, etype, machine, _v, _entry, phoff, _sh, _fl, _eh, phentsize, phnum, *_ = \
        dump.EHDR.unpack_from(core)
    assert ident[:4] == b"\x7fELF" and etype == 4 and machine == 183 and phnum == 2
    note = dump.PHDR.unpack_from(core, phoff)
    load = dump.PHDR.unpack_from(core, phoff + phentsize)
    assert note[0] == dump.PT_NOTE and load[0] == dump.PT_LOAD
    assert (load[3], load[4], load[5]) == (0, 0x40000000, 4096)     # vaddr, paddr, filesz
    assert core[load[2]:load[2] + 4096] == bytes(ram)
    notes = core[note[2]:note[2] + note[5]]
    namesz, descsz, kind = struct.unpack_from("<III", notes)
    assert (namesz, descsz, kind) == (5, 392, dump.NT_PRSTATUS) and notes[12:16] == b"CORE"
    desc = notes[20:20 + 392]
    assert struct.unpack_from("<I", desc, 32)[0] == 1                   # pr_pid: index + 1
    reg = struct.unpack_from("<34Q", desc, 112)
    assert reg[:31] == tuple(range(31)) and reg[31:] == (0x1000, 0x40080000, 0x3C5)
    second = notes[20 + 392:]
    assert struct.unpack_from("<34Q", second, 20 + 112)[0] == 2**64 - 1
    if shutil.which("readelf"):
        path = tmp_path / "core"
        path.write_bytes(core)
        text = subprocess.run(["readelf", "-W", "-l", "-n", str(path)], capture_output=True,
                              text=True, check=True).stdout
        assert text.count("NT_PRSTATUS") == 2 and "0x0000000040000000" in text


class FakeVm:
    def __init__(self, machine="virt"):
        self.config = MachineConfig(machine=machine)

        class M:
            fds: dict = {}
        self.migration = M()

    def stop(self):
        pass


@pytest.mark.parametrize("args, why", [
    ({"paging": True, "protocol": "file:/tmp/x"}, "paging=true"),
    ({"protocol": "file:/tmp/x"}, "Parameter 'paging' is missing"),
    ({"paging": False}, "Parameter 'protocol' is missing"),
    ({"paging": False, "protocol": "file:/tmp/x", "format": "kdump-zlib"}, "have: elf"),
    ({"paging": False, "protocol": "file:/tmp/x", "begin": 0, "length": 4096}, "begin/length"),
    ({"paging": False, "protocol": "fd:nope"}, "File descriptor named 'nope' not found"),
    ({"paging": False, "protocol": "tcp:1:2"}, "must start with 'file:' or 'fd:'"),
    ({"paging": False, "protocol": "file:/nonexistent/dir/core"}, "cannot open"),
])
def test_dump_guest_memory_errors_are_one_line(args, why):
    with pytest.raises(QmpError) as e:
        Commands(FakeVm())("dump-guest-memory", args)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_dump_refuses_microvm():
    with pytest.raises(QmpError, match="aarch64 cores only"):
        Commands(FakeVm("microvm"))("dump-guest-memory", {"paging": False,
                                                          "protocol": "file:/tmp/x"})
