"""MSI-X (PCI Local Bus 3.0 section 6.8.2; PCIe 4.0 section 7.7.2).

:class:`Msix` adds the MSI-X capability to a :class:`~.config.PciFunction`
and models the vector table and Pending Bit Array that live in one of its
memory BARs (:meth:`read` / :meth:`write` at offsets in that BAR).  A
vector is a message (a 64-bit address and 32-bit data) that :meth:`notify`
writes through ``deliver`` (the host's bus: on the virt board, the GICv2m
frame) while MSI-X is enabled and neither the function nor the vector is
masked; otherwise the vector's pending bit is set and the message goes out
when it is unmasked (6.8.3.4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kemu.devices.pci.config import PciFunction

CAP_ID_MSIX = 0x11
# Message Control (upper 16 bits of the capability's first dword).
MSIX_ENABLE = 1 << 15
MSIX_FUNCTION_MASK = 1 << 14
ENTRY_SIZE = 16
VECTOR_MASKED = 1


@dataclass
class MsixState:
    """The MSI-X table and pending bits (the capability's control word is in the
    function's configuration space)."""

    version: int
    table: bytes
    pending: list[bool]


class Msix:
    """The MSI-X capability, table and PBA of one function."""

    def __init__(self, function: PciFunction, vectors: int, bar: int, table_offset: int,
                 pba_offset: int) -> None:
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X has 1 to 2048 vectors")
        self.function = function
        self.vectors = vectors
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        body = ((vectors - 1).to_bytes(2, "little")
                + (table_offset | bar).to_bytes(4, "little")
                + (pba_offset | bar).to_bytes(4, "little"))
        self.cap = function.add_capability(CAP_ID_MSIX, body,
                                           writable=b"\x00" + bytes([0xC0]) + bytes(8))
        self.table = bytearray(vectors * ENTRY_SIZE)
        self.pending = [False] * vectors
        self.reset()
        function.on_reset.append(self.reset)
        #: Where messages go: ``deliver(address, data)``; the host connects it.
        self.deliver: Callable[[int, int], None] = lambda address, data: None
        self._was = self._control()
        function.on_config_write.append(self._control_written)

    def reset(self) -> None:
        """Function reset: every entry cleared and masked, nothing pending (6.8.2.9)."""
        self.table[:] = bytes(len(self.table))
        for i in range(self.vectors):
            self.table[i * ENTRY_SIZE + 12] = VECTOR_MASKED
        self.pending = [False] * self.vectors

    def save(self) -> MsixState:
        return MsixState(1, bytes(self.table), list(self.pending))

    def restore(self, state: MsixState) -> None:
        """After the function's configuration space (MSI-X Enable and Function Mask)."""
        if state.version != 1 or len(state.table) != len(self.table) or \
                len(state.pending) != self.vectors:
            raise ValueError(f"{self.function.name}: incompatible MSI-X state")
        self.table[:] = state.table
        self.pending = [bool(p) for p in state.pending]
        self._was = self._control()

    def _control(self) -> int:
        return int.from_bytes(self.function.space[self.cap + 2:self.cap + 4], "little")

    @property
    def enabled(self) -> bool:
        return bool(self._control() & MSIX_ENABLE)

    def _masked(self, vector: int) -> bool:
        return bool(self._control() & MSIX_FUNCTION_MASK
                    or self.table[vector * ENTRY_SIZE + 12] & VECTOR_MASKED)

    def _control_written(self) -> None:
        was, self._was = self._was, self._control()
        if was != self._was:
            self._flush_pending()

    def notify(self, vector: int) -> None:
        """Signal ``vector`` (ignored when out of range or MSI-X is off)."""
        if not self.enabled or not 0 <= vector < self.vectors:
            return
        if self._masked(vector):
            self.pending[vector] = True
            return
        self._send(vector)

    def _send(self, vector: int) -> None:
        if not self.function.command & 0x4:    # Bus Master Enable: no DMA, no message
            return
        entry = self.table[vector * ENTRY_SIZE:(vector + 1) * ENTRY_SIZE]
        address = int.from_bytes(entry[0:8], "little")
        self.deliver(address, int.from_bytes(entry[8:12], "little"))

    def _flush_pending(self) -> None:
        if not self.enabled:
            return
        for vector, pending in enumerate(self.pending):
            if pending and not self._masked(vector):
                self.pending[vector] = False
                self._send(vector)

    # -- the table and PBA in the BAR ----------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size:
            return 0
        relative = offset - self.table_offset
        if 0 <= relative <= len(self.table) - size:
            return int.from_bytes(self.table[relative:relative + size], "little")
        relative = offset - self.pba_offset
        if 0 <= relative < (self.vectors + 63) // 64 * 8:
            bits = sum(1 << i for i, p in enumerate(self.pending) if p)
            return (bits >> (8 * relative)) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        relative = offset - self.table_offset
        if size not in (4, 8) or offset % size or not 0 <= relative <= len(self.table) - size:
            return      # the PBA is read-only
        self.table[relative:relative + size] = value.to_bytes(size, "little")
        self._flush_pending()
