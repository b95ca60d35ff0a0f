"""Build the test guests in this directory with the system toolchain (gcc, as, ld).

Used by the integration tests and the KVM exit benchmark; each function
returns the guest image as bytes.  :func:`toolchain_missing` gives the reason
to skip when a tool is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent

CFLAGS = ["-O2", "-std=gnu11", "-ffreestanding", "-fno-pic", "-fno-pie", "-nostdlib",
          "-mno-red-zone", "-mgeneral-regs-only", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-m64", "-Wall",
          "-Werror"]


def toolchain_missing() -> str | None:
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (needed to build the test guests)"
    return None


def kvm_guest_unavailable() -> str | None:
    """Why the purpose-built guests cannot run on KVM here (no usable /dev/kvm, or no
    toolchain to build them), or None: the skip reason of the tests that boot them."""
    from kemu.accel.kvm import kvm_unavailable_reason
    reason = kvm_unavailable_reason()
    return f"no usable /dev/kvm: {reason}" if reason else toolchain_missing()


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def build_bzimage(name: str, outdir: Path) -> bytes:
    """``<name>.c`` + ``header.S`` linked by ``bzimage.ld`` into a bzImage."""
    outdir.mkdir(parents=True, exist_ok=True)
    head = outdir / "header.o"
    obj = outdir / f"{name}.o"
    out = outdir / f"{name}.bzImage"
    _run(["gcc", *CFLAGS, "-c", str(GUEST_DIR / "header.S"), "-o", str(head)])
    _run(["gcc", *CFLAGS, "-c", str(GUEST_DIR / f"{name}.c"), "-o", str(obj)])
    _run(["ld", "-m", "elf_x86_64", "-nostdlib", "-T", str(GUEST_DIR / "bzimage.ld"),
          "--oformat", "binary", "-o", str(out), str(head), str(obj)])
    return out.read_bytes()


def build_pvh(outdir: Path) -> bytes:
    """``pvh.S`` linked by ``pvh.ld`` into an ELF64 with a PVH entry note."""
    outdir.mkdir(parents=True, exist_ok=True)
    obj = outdir / "pvh.o"
    out = outdir / "pvh.elf"
    _run(["gcc", *CFLAGS, "-c", str(GUEST_DIR / "pvh.S"), "-o", str(obj)])
    _run(["ld", "-m", "elf_x86_64", "-nostdlib", "-T", str(GUEST_DIR / "pvh.ld"),
          "-o", str(out), str(obj)])
    return out.read_bytes()


def build_flat(name: str, outdir: Path, base: int = 0x1000) -> bytes:
    """``<name>.S`` as a flat binary linked at ``base`` (real-mode guests)."""
    outdir.mkdir(parents=True, exist_ok=True)
    obj = outdir / f"{name}.o"
    out = outdir / f"{name}.bin"
    _run(["gcc", "-m32", "-c", str(GUEST_DIR / f"{name}.S"), "-o", str(obj)])
    _run(["ld", "-m", "elf_i386", "-nostdlib", f"-Ttext={base:#x}", "--oformat", "binary",
          "-o", str(out), str(obj)])
    return out.read_bytes()
