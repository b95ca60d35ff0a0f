"""fw_cfg through its registers from a bare-metal guest, under kemu and under QEMU.

The guest (assembled at test time) reads the signature and the id over the
data register, the DMA register's "QEMU CFG", the kernel-size item (absent
on both: with -kernel and no firmware the kernel is loaded directly), finds
``opt/t`` in the file directory by name, and reads it by DMA (select and
read in one descriptor).  Both print the same lines.
"""

import pytest

from bare_metal import HEX, run_kemu, run_qemu
from kemu.options.fw_cfg import parse_fw_cfg_option
from test_tcg_aarch64 import assemble

FILE = "kemu+qemu"   # 9 bytes: DMA reads 16, the rest zero past the end

GUEST = r"""
    .text
    .global _start
_start:
    ldr x19, =0x09020000
    mov w0, #0                  // FW_CFG_SIGNATURE
    bl select
    ldr w0, [x19]
    bl hex
    mov w0, #1                  // FW_CFG_ID
    bl select
    ldr w0, [x19]
    bl hex
    ldr x0, [x19, #16]          // the DMA register: "QEMU CFG"
    bl hex
    mov w0, #8                  // FW_CFG_KERNEL_SIZE
    bl select
    ldr w0, [x19]
    bl hex

    mov w0, #0x19               // FW_CFG_FILE_DIR
    bl select
    ldr w20, [x19]
    rev w20, w20                // count (big-endian)
    mov w21, #0                 // select of opt/t
    ldr x22, =0x00000000742f74706f   // "opt/t\0\0\0" as a little-endian word
1:  cbz w20, 3f
    ldr w23, [x19]              // size
    ldrh w24, [x19]             // select
    ldrh w25, [x19]             // reserved
    ldr x26, [x19]              // name[0:8]
    mov x27, #6
2:  ldr x28, [x19]              // name[8:56]
    subs x27, x27, #1
    b.ne 2b
    cmp x26, x22
    b.ne 4f
    rev16 w21, w24
    rev w0, w23
    bl hex                      // its size
4:  sub w20, w20, #1
    b 1b
3:
    // DMA: select opt/t and read 16 bytes into buf
    adr x2, desc
    lsl w3, w21, #16
    mov w7, #(8 | 2)            // SELECT | READ
    orr w3, w3, w7
    rev w3, w3
    str w3, [x2]
    mov w3, #16
    rev w3, w3
    str w3, [x2, #4]
    adr x4, buf
    rev x5, x4
    str x5, [x2, #8]
    dsb sy
    rev x6, x2
    str x6, [x19, #16]          // the DMA address (big-endian): runs the transfer
    ldr w0, [x2]
    rev w0, w0                  // control written back: 0
    bl hex
    ldr x0, [x4]
    bl hex
    ldr x0, [x4, #8]
    bl hex
    ldr x0, =0x84000008         // PSCI SYSTEM_OFF
    hvc #0
    b .

select:                         // w0: the selector, stored big-endian
    rev16 w0, w0
    strh w0, [x19, #8]
    ret

""" + HEX + r"""
    .ltorg
    .balign 16
desc: .fill 16, 1, 0
buf:  .fill 16, 1, 0xff
"""

EXPECTED = [
    int.from_bytes(b"QEMU", "little"), 3, int.from_bytes(b"QEMU CFG", "little"), 0,
    len(FILE), 0, int.from_bytes(FILE[:8].encode(), "little"),
    int.from_bytes(FILE[8:].encode().ljust(8, b"\0"), "little"),
]


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fwcfg")
    kernel = tmp / "fwcfg.bin"
    kernel.write_bytes(assemble(tmp, GUEST))
    return kernel


def test_fw_cfg_registers_and_dma_as_under_qemu(guest, need):
    qemu = need("qemu-system-aarch64")
    theirs = run_qemu(qemu, guest, "-fw_cfg", f"name=opt/t,string={FILE}")
    ours = run_kemu(guest, fw_cfg=[parse_fw_cfg_option(f"name=opt/t,string={FILE}")])
    assert theirs == EXPECTED, [hex(v) for v in theirs]
    assert ours == theirs, [hex(v) for v in ours]
