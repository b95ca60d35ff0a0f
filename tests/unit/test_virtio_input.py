import struct

from kemu.devices.virtio.input import (CFG_EV_BITS, CFG_ID_NAME, EV_KEY, KEY_POWER,
                                       VirtioPowerButton)


def test_config_space_describes_a_power_key():
    dev = VirtioPowerButton()
    dev.config_write(0, bytes([CFG_ID_NAME, 0]))
    cfg = dev.config_space()
    assert len(cfg) == 136 and cfg[2] == len(b"kemu power button")
    assert cfg[8:8 + cfg[2]] == b"kemu power button"
    dev.config_write(0, bytes([CFG_EV_BITS, EV_KEY]))
    cfg = dev.config_space()
    bitmap = cfg[8:8 + cfg[2]]
    assert bitmap[KEY_POWER // 8] & (1 << (KEY_POWER % 8))
    assert sum(bin(b).count("1") for b in bitmap) == 1
    dev.config_write(0, bytes([CFG_EV_BITS, 2]))        # EV_REL: nothing
    assert dev.config_space()[2] == 0


def test_press_without_a_driver_reports_it():
    assert VirtioPowerButton().press() is False
    assert struct.calcsize("<HHI") == 8
