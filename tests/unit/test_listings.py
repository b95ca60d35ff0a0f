"""QEMU's help listings on a real kemu command, compared with QEMU's own format."""

import shutil
import subprocess
import sys

import pytest

KEMU = [sys.executable, "-m", "kemu"]
QEMU = shutil.which("qemu-system-aarch64")


def kemu(*args):
    return subprocess.run(KEMU + list(args), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("prefix", [[], ["run"]])
@pytest.mark.parametrize("args,first,contains", [
    (["-M", "help"], "Supported machines are:", "virt "),
    (["-machine", "help"], "Supported machines are:", "microvm "),
    (["-cpu", "help"], "Available CPUs:", "  cortex-a57"),
    (["-device", "help"], "Storage devices:", 'name "virtio-blk-device", bus virtio-bus'),
    (["-device", "virtio-blk-device,help"], "virtio-blk-device options:", "  drive=<str>"),
    (["-accel", "help"], "Accelerators supported in kemu:", "tcg"),
    (["-netdev", "help"], "Available netdev backend types:", "user"),
    (["-chardev", "help"], "Available chardev backend types: ", "  stdio"),
])
def test_listing(prefix, args, first, contains):
    r = kemu(*prefix, *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == first and contains in r.stdout and r.stderr == ""


@pytest.mark.skipif(QEMU is None, reason="qemu-system-aarch64 is not installed")
def test_listing_lines_are_qemus():
    qemu = subprocess.run([QEMU, "-M", "virt", "-device", "virtio-blk-device,help"],
                          capture_output=True, text=True, timeout=60).stdout.splitlines()
    ours = kemu("-device", "virtio-blk-device,help").stdout.splitlines()
    assert ours[0] == qemu[0]
    assert [line for line in ours if line.startswith("  drive=")][0] in qemu
    qemu_devices = subprocess.run([QEMU, "-M", "virt", "-device", "help"], capture_output=True,
                                  text=True, timeout=60).stdout.splitlines()
    for line in kemu("-device", "help").stdout.splitlines():
        assert line == "" or line in qemu_devices, line
    qemu_cpus = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True,
                               timeout=60).stdout.splitlines()
    assert set(kemu("-cpu", "help").stdout.splitlines()) <= set(qemu_cpus)


def test_python_dash_m_kemu():
    r = kemu("--version")
    assert r.returncode == 0 and r.stdout.startswith("kemu ")


@pytest.mark.parametrize("args", [["-accel", "kvm", "-M", "virt", "-kernel", "/x"],
                                  ["run", "-accel", "kvm", "-M", "virt"],
                                  ["run", "-M", "virt", "--accel", "kvm"]])
def test_virt_on_kvm_is_one_line(args):
    r = kemu(*args)
    assert r.returncode == 2
    assert r.stderr == ("kemu: the virt board runs on TCG here, not KVM "
                        "(use -accel tcg, or -M microvm for kvm)\n")
