"""The PMU and fw_cfg as Linux uses them, on the default aarch64 guest, under
kemu and under qemu-system-aarch64 with the same kernel, initramfs and
``-fw_cfg`` options.

The host hands the guest two fw_cfg files: a string, and a program
(tests/guests/perf_probe.S, assembled at test time) that counts its own
cycles and instructions through perf_event_open.  In the guest the files
appear under /sys/firmware/qemu_fw_cfg (the qemu_fw_cfg module), the PMU
driver probes the device tree's arm,armv8-pmuv3 node, and the program,
copied out of fw_cfg and run, counts cycles; what QEMU does not count
(instructions on TCG without icount) is refused alike.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from kemu.testing.stdio_console import Console

GREETING = "hello from the host, over fw_cfg"
BY_NAME = "/sys/firmware/qemu_fw_cfg/by_name/opt/kemu"


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    gas, ld = shutil.which("aarch64-linux-gnu-as"), shutil.which("aarch64-linux-gnu-ld")
    if not gas or not ld:
        pytest.skip("binutils-aarch64-linux-gnu is not installed "
                    "(scripts/bootstrap.sh --test installs it)")
    from pathlib import Path
    src = Path(__file__).parent.parent / "guests" / "perf_probe.S"
    tmp = tmp_path_factory.mktemp("probe")
    subprocess.run([gas, "-o", str(tmp / "p.o"), str(src)], check=True)
    subprocess.run([ld, "-static", "-o", str(tmp / "perf_probe"), str(tmp / "p.o")], check=True)
    return tmp / "perf_probe"


def fw_cfg_args(probe) -> list[str]:
    return ["-fw_cfg", f"name=opt/kemu/perf_probe,file={probe}",
            "-fw_cfg", f"opt/kemu/greeting,string={GREETING.replace(',', ',,')}"]


def last_line(vm: Console, command: str) -> str:
    """The last line a command printed (a command line may come back wrapped)."""
    return vm.run(command).strip().splitlines()[-1]


def inspect(vm: Console) -> dict:
    vm.expect(rb"kemu guest ready", timeout=240)
    vm.expect(rb"# ")
    seen = {
        "files": sorted(vm.run(f"ls {BY_NAME}").split()),
        "greeting": last_line(vm, f"cat {BY_NAME}/greeting/raw; echo"),
        "pmu_devices": sorted(d for d in vm.run("ls /sys/bus/event_source/devices").split()
                              if d.startswith("armv8")),
        "perfevents": re.findall(r"hw perfevents: .*", vm.run("dmesg | grep 'hw perfevents'")),
        "model": last_line(vm, "cat /proc/device-tree/model; echo").strip("\0"),
        # systemd-detect-virt names QEMU on a device tree with a fw-cfg node
        "fw_cfg_node": [d for d in vm.run("ls /proc/device-tree").split() if "fw-cfg" in d],
    }
    vm.run(f"cat {BY_NAME}/perf_probe/raw > /tmp/perf_probe; chmod +x /tmp/perf_probe")
    out = vm.run("/tmp/perf_probe", timeout=120)
    seen["counts"] = {k: int(v, 16) for k, v in re.findall(r"(\w+) ([0-9a-f]{16})", out)}
    vm.send("poweroff -f\n")
    vm.wait(60)
    return seen


def test_pmu_and_fw_cfg_in_linux_as_under_qemu(guest, probe, console_factory):
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        pytest.skip("qemu-system-aarch64 is not installed (scripts/bootstrap.sh --test)")
    ours = inspect(console_factory("run", *fw_cfg_args(probe)))
    theirs_vm = Console(["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-nographic",
                         "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
                         "-append", guest.append, *fw_cfg_args(probe)], command=[qemu])
    try:
        theirs = inspect(theirs_vm)
    finally:
        theirs_vm.close()

    assert ours["files"] == ["greeting", "perf_probe"], ours
    assert ours["greeting"] == GREETING
    assert ours["pmu_devices"] == ["armv8_pmuv3"], ours
    assert ours["perfevents"] == ["hw perfevents: enabled with armv8_pmuv3 PMU driver, "
                                  "7 counters available"], ours     # 6 + the cycle counter
    assert ours["model"] == "linux,dummy-virt"
    assert ours["counts"]["cycles"] > 1_000_000, ours     # 20M loop iterations counted
    assert ours["fw_cfg_node"] == ["fw-cfg@9020000"]
    for key in ("files", "greeting", "pmu_devices", "perfevents", "model", "fw_cfg_node"):
        assert ours[key] == theirs[key], (key, ours[key], theirs[key])
    # Counted on both, refused alike where QEMU does not count (a negative errno).
    assert theirs["counts"]["cycles"] > 1_000_000, theirs
    assert ours["counts"]["instructions"] == theirs["counts"]["instructions"], (ours, theirs)
