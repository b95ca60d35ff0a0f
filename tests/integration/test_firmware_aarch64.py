"""UEFI firmware on the virt board: Debian's EDK2 build (qemu-efi-aarch64) in CFI flash.

* ``-bios QEMU_EFI.fd`` runs EDK2 from flash0 to its UEFI shell on the
  serial console; the shell's view of the PCI bus equals the one it has
  under qemu-system-aarch64 with the same command line.
* ``-drive if=pflash`` (code read-only in unit 0, variables in unit 1): a
  non-volatile variable set in the shell reaches the variables image file,
  through EDK2's NorFlash driver (block erase, word program and
  write-to-buffer on the emulated flash).
* ``-bios`` with ``-kernel``/``-initrd``/``-append``: EDK2 takes the kernel
  from fw_cfg and boots it through its EFI stub to the default guest's
  userspace, under kemu and under QEMU.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from kemu.testing.stdio_console import Console

EDK2 = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")
FLASH_SIZE = 64 << 20

pytestmark = pytest.mark.skipif(not EDK2.is_file(),
                                reason=f"{EDK2} is missing (Debian package qemu-efi-aarch64)")

BASE = ["-M", "virt", "-cpu", "cortex-a57", "-m", "512", "-nographic", "-nic", "none"]
SHELL = rb"Shell> "


def qemu_or_skip() -> str:
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        pytest.skip("qemu-system-aarch64 is not installed: no comparison with QEMU")
    return qemu


def to_shell(c: Console) -> float:
    """Wait for EDK2's shell prompt (skipping startup.nsh); seconds it took."""
    start = time.monotonic()
    c.expect(rb"UEFI Interactive Shell", 900)
    c.expect(SHELL, 120)
    return time.monotonic() - start


def shell(c: Console, command: str, timeout: float = 120) -> str:
    """A shell command's output (the shell wants CR to end a line)."""
    c.send(command + "\r")
    start = c._pos
    c.expect(SHELL, timeout)
    with c._lock:
        out = c.buffer[start:c._pos].decode(errors="replace")
    out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out).replace("\r", "")
    return out.split("\n", 1)[1].rsplit("\n", 1)[0] if "\n" in out else ""


def pci_view(c: Console) -> list[str]:
    return sorted(line.strip() for line in shell(c, "pci").splitlines()
                  if "==>" in line or "Vendor" in line)


def test_edk2_reaches_its_shell_and_sees_the_pci_bus_as_under_qemu():
    # disable-legacy=on: kemu's virtio-pci devices are modern only (QEMU's transitional)
    args = BASE + ["-bios", str(EDK2), "-device", "virtio-rng-pci,addr=3,disable-legacy=on"]
    ours = Console(args)
    try:
        to_shell(ours)
        ours_pci = pci_view(ours)
        assert any("1B36" in line and "0008" in line for line in ours_pci), ours_pci
        assert "UEFI" in shell(ours, "ver")
        ours.send("reset -s\r")               # EDK2 powers off through PSCI SYSTEM_OFF
        assert ours.wait(120) == 0
    finally:
        ours.close()
    qemu = qemu_or_skip()
    theirs = Console(args, command=[qemu])
    try:
        to_shell(theirs)
        theirs_pci = pci_view(theirs)
    finally:
        theirs.close()
    assert ours_pci == theirs_pci, f"kemu: {ours_pci}\nQEMU: {theirs_pci}"


def test_uefi_variable_reaches_the_pflash_image(tmp_path):
    code = tmp_path / "code.fd"
    code.write_bytes(EDK2.read_bytes().ljust(FLASH_SIZE, b"\0"))
    variables = tmp_path / "vars.fd"
    variables.write_bytes(bytes(FLASH_SIZE))
    c = Console(BASE + ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                        "-drive", f"if=pflash,format=raw,unit=1,file={variables}"])
    try:
        to_shell(c)
        # EDK2 found no variable store in flash1 and formatted it (erase, program).
        assert b"_FVH" in variables.read_bytes()[:0x100]
        shell(c, "setvar KemuFlashTest -guid 3c1c3d8e-5a4b-4e2f-9a53-6b656d75f1a5 "
                 "-nv -bs =6B656D752D666C617368")
        out = shell(c, "setvar KemuFlashTest -guid 3c1c3d8e-5a4b-4e2f-9a53-6b656d75f1a5")
        assert "6B 65 6D 75" in out.upper(), out
        c.send("reset -s\r")
        assert c.wait(120) == 0
    finally:
        c.close()
    data = variables.read_bytes()
    assert "KemuFlashTest".encode("utf-16-le") in data
    assert b"kemu-flash" in data
    # The code image is as it was: readonly=on.
    assert code.read_bytes()[:len(EDK2.read_bytes())] == EDK2.read_bytes()


def test_kernel_through_the_firmware_under_kemu_and_qemu(guest):
    # Without "quiet", which silences the EFI stub's messages.
    append = " ".join(w for w in guest.append.split() if w != "quiet")
    args = BASE + ["-bios", str(EDK2), "-kernel", str(guest.kernel),
                   "-initrd", str(guest.initrd), "-append", append]
    for command in (None, [qemu_or_skip()]):
        c = Console(args) if command is None else Console(args, command=command)
        try:
            c.expect(rb"EFI stub: Loaded initrd", 600)   # EDK2 ran the kernel's EFI stub
            c.expect(rb"kemu guest ready", 600)
            c.expect(rb"# ", 60)
            assert "efi" in c.run("ls /sys/firmware")      # booted as a UEFI application
            c.send("poweroff -f\n")
            assert c.wait(120) == 0
        finally:
            c.close()


def test_edk2_draws_its_shell_on_virtio_gpu_pci(tmp_path):
    # EDK2's VirtioGpuDxe drives the adapter (GOP); its shell then shows on the screen
    # as on the serial console.  QMP's screendump reads the screen back.
    from PIL import Image

    from kemu.testing.qmp_client import QmpClient
    sock = tmp_path / "qmp.sock"
    ours = Console(BASE + ["-bios", str(EDK2), "-device", "virtio-gpu-pci,disable-legacy=on",
                           "-qmp", f"unix:{sock},server=on,wait=off"])
    try:
        to_shell(ours)
        qmp = QmpClient(sock)
        shot = tmp_path / "screen.ppm"
        deadline = time.monotonic() + 60
        while True:             # the screen may be a frame behind the serial console
            qmp.execute("screendump", filename=str(shot))
            with Image.open(shot) as image:
                size = image.size
                lit = sum(1 for p in image.convert("L").getdata() if p > 64)
            if lit > 2000 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert size == (1280, 800)
        assert lit > 2000, f"the screen shows nothing ({lit} lit pixels)"
        ours.send("reset -s\r")
        assert ours.wait(120) == 0
    finally:
        ours.close()
