"""-cpu max at EL1: pointer authentication and SVE are not trapped.

As QEMU's boot code does for a kernel entered below EL3, kemu's vCPU set-up
enables them for EL1 (SCR_EL3.API/APK, CPTR_EL3.EZ, and HCR_EL2.API/APK since
kemu's CPUs have an EL2); Linux uses both on -cpu max, and before this a trap
went to a zero VBAR_EL2 and stopped the VM.  The same raw guest runs under
kemu and qemu-system-aarch64 and must print the same.
"""

import subprocess
import sys

from test_tcg_aarch64 import assemble

GUEST = """
    .text
    .global _start
_start:
    mov x30, #0x1230
    mov x19, x30
    .inst 0xd503233f                // PACIASP: sign LR
    .inst 0xd50323bf                // AUTIASP: authenticate it again
    cmp x30, x19
    cset x0, eq
    bl hex
    mov x0, #(3 << 16 | 3 << 20)    // CPACR_EL1.ZEN, FPEN: EL1's own enables
    msr cpacr_el1, x0
    isb
    .inst 0x04bf5020                // RDVL x0, #1: the SVE vector length in bytes
    cmp x0, #16
    cset x0, ge
    bl hex
    ldr x0, =0x84000008             // PSCI SYSTEM_OFF
    hvc #0
    b .
hex:
    ldr x1, =0x09000000
    add x0, x0, #'0'
    str w0, [x1]
    mov x0, #10
    str w0, [x1]
    ret
    .ltorg
"""

ARGV = ["-M", "virt", "-cpu", "max", "-m", "128", "-nographic", "-nodefaults",
        "-serial", "stdio", "-kernel"]


def test_pauth_and_sve_at_el1_as_under_qemu(tmp_path, need):
    kernel = tmp_path / "max.bin"
    kernel.write_bytes(assemble(tmp_path, GUEST))
    outs = []
    for argv0 in ([sys.executable, "-m", "kemu"], [need("qemu-system-aarch64")]):
        r = subprocess.run([*argv0, *ARGV, str(kernel)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.split())
    assert outs[0] == ["1", "1"]
    assert outs[0] == outs[1]
