"""pcie.0: a board's PCI Express root bus and the virtio-pci devices on it.

Both boards that have PCI (``virt`` always, ``microvm`` with ``pcie=on``)
build one :class:`PcieRootBus`: the generic host bridge (ECAM, BAR windows,
four INTx lines; :mod:`kemu.devices.pci.host`) and the virtio-pci transports
plugged into it.  It is what the board resets, names in a snapshot's
fingerprint, saves and restores, in one place for both boards.
"""

from __future__ import annotations

from kemu.bus import Bus
from kemu.devices.pci.host import PciHost, Window
from kemu.devices.base import IrqLine
from kemu.state import StateError, restore_plain, save_plain


class PcieRootBus:
    """The host bridge behind ``ecam`` (base, size) in ``mmio`` and its transports."""

    def __init__(self, mmio: Bus, ecam: tuple[int, int], windows: list[Window],
                 intx: list[IrqLine]) -> None:
        self.host = PciHost(mmio, windows, intx)
        mmio.map(*ecam, self.host.ecam)
        #: virtio-pci transports, in the order they were plugged
        self.transports: list = []

    def add(self, transport, slot: int | None = None) -> int:
        """Plug a virtio-pci transport's function in (the next free slot if None);
        its device number."""
        device = self.host.add(transport.function, slot)
        self.transports.append(transport)
        return device

    def devices(self) -> list:
        """The virtio devices behind the transports."""
        return [t.device for t in self.transports]

    def reset(self) -> None:
        """Every transport and the bridge (under the machine lock)."""
        for transport in self.transports:
            transport.reset()
        self.host.reset()

    # -- snapshots (kemu.state's convention) ----------------------------------------------
    def fingerprint(self) -> list:
        """Each function by devfn and its vendor and device ID, for a snapshot header."""
        return [[devfn, fn.config_read(0, 4)] for devfn, fn in sorted(self.host.functions.items())]

    def save(self) -> dict:
        return {"host": save_plain(self.host),
                "transports": [{"transport": save_plain(t), "device": save_plain(t.device)}
                               for t in self.transports]}

    def restore(self, saved: object) -> None:
        """:meth:`save`'s data back (under the machine lock, the interrupt controller
        restored first); then the devices take what their queues held."""
        if not isinstance(saved, dict) or not isinstance(saved.get("transports"), list) or \
                len(saved["transports"]) != len(self.transports) or "host" not in saved:
            raise StateError("saved state does not match the machine's PCI devices")
        for state in saved["transports"]:
            if not isinstance(state, dict) or "transport" not in state or "device" not in state:
                raise StateError("saved state: corrupted PCI device")
        restore_plain(self.host, saved["host"])
        for t, state in zip(self.transports, saved["transports"]):
            restore_plain(t, state["transport"])
            restore_plain(t.device, state["device"])
        for transport in self.transports:
            transport.kick_ready_queues()
