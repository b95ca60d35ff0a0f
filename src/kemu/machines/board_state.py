"""What every board's saved state has in common: its virtio-mmio slots.

Both boards (``virt`` on TCG, ``microvm`` on KVM) keep a list of slots whose
``device`` is a virtio-mmio transport with its virtio device behind it; the
snapshot fingerprint names the devices in their slots, and the saved state
has each transport's and each device's plain state (:mod:`kemu.state`).
"""

from __future__ import annotations

from kemu.state import StateError, restore_plain, save_plain


def slots_fingerprint(slots) -> list:
    """The device id and transport version of each slot, in slot order."""
    return [[getattr(slot.device.device, "device_id", 0), slot.device.legacy] for slot in slots]


def save_slots(slots) -> list[dict]:
    return [{"transport": save_plain(slot.device),
             "device": save_plain(slot.device.device) if slot.device.device is not None
             else None}
            for slot in slots]


def check_slots(slots, saved: object) -> None:
    """Refuse (one :class:`StateError` line) saved slots that do not fit ``slots``:
    what a board checks before it changes anything."""
    if not isinstance(saved, list) or len(saved) != len(slots):
        raise StateError("saved state does not match the machine's virtio devices")
    for state in saved:
        if not isinstance(state, dict) or "transport" not in state or "device" not in state:
            raise StateError("saved state: corrupted virtio slot")


def restore_slots(slots, saved: list) -> None:
    """Restore each slot's transport and device (under the machine lock, the
    interrupt controller restored first), then let devices take what their
    queues held."""
    check_slots(slots, saved)
    for slot, state in zip(slots, saved):
        restore_plain(slot.device, state["transport"])
        if slot.device.device is not None and state["device"] is not None:
            restore_plain(slot.device.device, state["device"])
    for slot in slots:
        slot.device.kick_ready_queues()
