"""Linux on the virt board meets a physical address with nothing behind it.

busybox ``devmem`` maps /dev/mem and reads an address where QEMU's virt has
no device: the CPU takes a synchronous external abort, Linux sends the
process SIGBUS, and the guest (and kemu) carry on, as under QEMU.
"""

import pytest


def test_devmem_of_nothing_is_a_bus_error_not_the_end_of_the_vm(guest, console_factory):
    c = console_factory("run")
    c.expect(rb"# ")
    if "No such file" in c.run("ls /dev/mem"):
        c.send("poweroff -f\n")
        c.wait(60)
        pytest.skip("the default guest has no /dev/mem")
    out = c.run("devmem 0x09100000 32; echo status=$?")
    assert "Bus error" in out and "status=135" in out      # 128 + SIGBUS
    out = c.run("devmem 0x09100000 32 0x1234; echo status=$?")
    assert "status=135" in out
    assert "aarch64" in c.run("uname -m").split()      # the guest goes on
    c.send("poweroff -f\n")
    assert c.wait(60) == 0
