"""Stage 1 address translation for the EL1&0 regime, 4 KiB granule.

Used by the VMM to read guest instructions at a virtual PC (Unicorn's
memory API only takes physical addresses).  Follows the VMSAv8-64 table
walk (Arm ARM D8.2, "Translation table walk"): TTBR0/TTBR1 chosen by VA bit
55, TxSZ sets the input size and the start level, table/page descriptors
have bits[1:0] = 0b11, block descriptors 0b01 at levels 1 and 2.
"""

from __future__ import annotations

from typing import Callable

OA_MASK = ((1 << 48) - 1) & ~0xFFF


class TranslationFault(Exception):
    pass


def translate(va: int, sctlr: int, tcr: int, ttbr0: int, ttbr1: int,
              read_u64: Callable[[int], int]) -> int:
    """Physical address of ``va``, or raise :class:`TranslationFault`."""
    if not sctlr & 1:  # MMU off: flat mapping
        return va
    upper = (va >> 55) & 1
    if upper:
        tsz, tg, ttbr, epd = (tcr >> 16) & 0x3F, (tcr >> 30) & 3, ttbr1, (tcr >> 23) & 1
        granule_4k = tg == 2
    else:
        tsz, tg, ttbr, epd = tcr & 0x3F, (tcr >> 14) & 3, ttbr0, (tcr >> 7) & 1
        granule_4k = tg == 0
    if epd:
        raise TranslationFault(f"walks disabled for {va:#x}")
    if not granule_4k:
        raise TranslationFault("only the 4 KiB translation granule is supported")
    va_bits = 64 - tsz
    top = va >> va_bits
    if top != (((1 << (64 - va_bits)) - 1) if upper else 0):
        raise TranslationFault(f"{va:#x} is outside the translated range")
    level = 4 - (va_bits - 12 + 8) // 9
    table = ttbr & OA_MASK
    while True:
        shift = 12 + 9 * (3 - level)
        index = (va >> shift) & 0x1FF
        desc = read_u64(table + 8 * index)
        kind = desc & 3
        if kind == 3 and level < 3:
            table = desc & OA_MASK
            level += 1
            continue
        if (kind == 3 and level == 3) or (kind == 1 and level in (1, 2)):
            out_mask = ((1 << 48) - 1) & ~((1 << shift) - 1)
            return (desc & out_mask) | (va & ((1 << shift) - 1))
        raise TranslationFault(f"no mapping for {va:#x} at level {level}")
