"""virtio-mmio version 1, the legacy interface (VIRTIO 1.2, 4.2.4 "Legacy interface").

A legacy driver does not write the three queue addresses: it writes
GuestPageSize once, then per queue QueueNum, QueueAlign and QueuePFN, and the
queue lies in contiguous guest pages from ``QueuePFN * GuestPageSize``
laid out as 2.7.2 "Legacy Interfaces: A Note on Virtqueue Layout" says:
the descriptor table (16 bytes per entry), the available ring right after it
(``flags, idx, ring[QueueNum], used_event``: 6 + 2 * QueueNum bytes), then
the used ring at the next multiple of QueueAlign.  Writing 0 to QueuePFN
stops using the queue.  Such a driver never sets FEATURES_OK, sees only
feature bits 0-31, and Version reads 1.

Only the device types that existed before VIRTIO 1.0 have a legacy
interface (the "Legacy Interface" parts of chapter 5): network, block,
console, entropy, balloon, SCSI host and 9P.  Later ones (input, socket,
GPU, ...) stay on version 2 whatever ``force-legacy`` says.
"""

from __future__ import annotations

from dataclasses import dataclass

GUEST_PAGE_SIZE = 0x028
QUEUE_ALIGN = 0x03C
QUEUE_PFN = 0x040
LEGACY_VERSION = 1
#: QEMU's and Linux's default ring alignment (VIRTIO_PCI_VRING_ALIGN).
DEFAULT_QUEUE_ALIGN = 4096
#: Device IDs that have a legacy interface (5.1 net, 5.2 block, 5.3 console,
#: 5.4 entropy, 5.5 balloon, 5.6 SCSI host, 9P transport).
LEGACY_DEVICE_IDS = frozenset({1, 2, 3, 4, 5, 8, 9})
#: A bound on GuestPageSize and QueueAlign from the guest (64 KiB pages are the largest).
MAX_PAGE = 1 << 16


def has_legacy_interface(device_id: int | None) -> bool:
    """True for an empty slot and for device types older than VIRTIO 1.0."""
    return device_id is None or device_id in LEGACY_DEVICE_IDS


def valid_power_of_two(value: int) -> bool:
    return 0 < value <= MAX_PAGE and value & (value - 1) == 0


@dataclass(frozen=True)
class LegacyRing:
    """The three areas of a legacy queue (2.7.2)."""

    desc: int
    avail: int
    used: int

    @classmethod
    def at(cls, pfn: int, page_size: int, align: int, num: int) -> "LegacyRing":
        desc = pfn * page_size
        avail = desc + 16 * num
        used = (avail + 6 + 2 * num + align - 1) & ~(align - 1)
        return cls(desc, avail, used)
