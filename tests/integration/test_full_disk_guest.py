"""A Linux guest writing to a disk whose host file system fills up
(werror=enospc, QEMU's default): the machine pauses with BLOCK_IO_ERROR and
a STOP for io-error, and once space is freed, resuming (QMP's cont) retries
the held request and the guest's write completes with nothing lost."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
from fulldisk import fill, free_bytes, small_tmpfs  # noqa: E402

from kemu import Machine  # noqa: E402
from kemu.api import BlockIOError, Stop  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path):
    with small_tmpfs(tmp_path, 16 * MiB) as where:
        yield where


def test_enospc_pauses_and_cont_retries(guest, tmpfs):
    disk = tmpfs / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(32 * MiB)                # sparse: the guest's writes need host space
    filler = tmpfs / "filler"
    fill(filler, free_bytes(tmpfs) - 4 * MiB)
    with Machine(kernel=guest.kernel, initrd=guest.initrd, append=guest.append,
                 memory="256M", disks=[disk]) as vm:
        vm.start()
        vm.console.expect("# ", timeout=120)
        vm.console.run("dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null")
        digest = vm.console.run("md5sum < /tmp/p").split()[0]
        vm.console.write("dd if=/tmp/p of=/dev/vda bs=1M oflag=direct 2>/dev/null"
                         " && echo DD-''OK\n")
        seen: list = []
        deadline = time.monotonic() + 120
        while not any(isinstance(e, Stop) for e in seen):
            assert time.monotonic() < deadline, f"no pause; events {seen}"
            seen += list(vm.events(timeout=1))
        errors = [e for e in seen if isinstance(e, BlockIOError)]
        assert errors and errors[0].action == "stop" and errors[0].nospace
        assert errors[0].operation == "write" and errors[0].device == "virtio0"
        assert errors[0].reason == "No space left on device"
        assert [e.reason for e in seen if isinstance(e, Stop)] == ["io-error"]
        assert vm.state == "paused" and vm.io_error
        filler.unlink()                     # the administrator frees space
        vm.resume()
        vm.console.expect("DD-OK", timeout=120)
        back = vm.console.run("dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | md5sum")
        assert back.split()[0] == digest
        vm.console.write("poweroff -f\n")
        assert vm.wait(60) == 0
    assert hashlib.md5(disk.read_bytes()[:8 * MiB]).hexdigest() == digest
