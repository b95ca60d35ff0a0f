"""A check every board's devices pass: their saved state is plain, versioned data."""

from __future__ import annotations

from kemu import state as st


def check_round_trips(devices: list) -> None:
    """Each device's ``save()`` is plain data with version 1 that goes through the
    stream's encoding and back into the device unchanged; an unknown version is
    refused with a :class:`~kemu.state.StateError`.  Raises AssertionError naming
    the device otherwise."""
    for device in devices:
        plain = st.save_plain(device)
        assert plain["version"] == 1, device
        st.restore_plain(device, st.loads(st.dumps(plain)))
        assert st.save_plain(device) == plain, device
        try:
            st.restore_plain(device, dict(plain, version=99))
        except st.StateError:
            continue
        raise AssertionError(f"{device}: restored a state of version 99")
