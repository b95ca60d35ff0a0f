"""The MC146818 RTC through ports 0x70/0x71 with a fixed host clock."""

import calendar

from kemu.devices.cmos_rtc import CmosRtc, from_bcd, to_bcd

# Sunday 2024-03-10 13:45:30 UTC
T0 = calendar.timegm((2024, 3, 10, 13, 45, 30, 0, 0, 0))


def make(t=T0):
    clock = [t]
    return CmosRtc(now=lambda: clock[0]), clock


def rd(rtc, reg):
    rtc.write(0, 1, reg)
    return rtc.read(1, 1)


def wr(rtc, reg, value):
    rtc.write(0, 1, reg)
    rtc.write(1, 1, value)


def test_bcd_helpers():
    assert to_bcd(59) == 0x59 and from_bcd(0x59) == 59


def test_time_in_bcd_24h():
    rtc, _ = make()
    assert rd(rtc, 0x0B) & 0x06 == 0x02        # BCD, 24-hour
    assert [rd(rtc, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == \
        [0x30, 0x45, 0x13, 0x01, 0x10, 0x03, 0x24, 0x20]


def test_binary_and_12h_modes():
    rtc, _ = make()
    wr(rtc, 0x0B, 0x04)                        # binary, 12-hour
    assert rd(rtc, 0) == 30 and rd(rtc, 9) == 24
    assert rd(rtc, 4) == 0x80 | 1               # 1 PM
    wr(rtc, 0x0B, 0x06)
    assert rd(rtc, 4) == 13


def test_clock_follows_the_host():
    rtc, clock = make()
    clock[0] += 61
    assert rd(rtc, 0) == 0x31 and rd(rtc, 2) == 0x46


def test_status_registers():
    rtc, _ = make()
    assert not rd(rtc, 0x0A) & 0x80            # never in an update
    assert rd(rtc, 0x0D) == 0x80               # valid RAM and time
    assert rd(rtc, 0x0C) == 0


def test_guest_sets_the_time_without_moving_the_host():
    rtc, clock = make()
    wr(rtc, 0x0B, 0x82)                        # SET
    wr(rtc, 9, 0x30)                           # 2030
    wr(rtc, 8, 0x12)
    wr(rtc, 7, 0x25)
    wr(rtc, 4, 0x08)
    wr(rtc, 2, 0x00)
    wr(rtc, 0, 0x00)
    wr(rtc, 0x0B, 0x02)
    assert rtc.guest_time() == calendar.timegm((2030, 12, 25, 8, 0, 0, 0, 0, 0))
    clock[0] += 5
    assert rd(rtc, 0) == 0x05
    assert rd(rtc, 6) == 0x04                  # Wednesday


def test_nvram_and_nmi_bit():
    rtc, _ = make()
    rtc.write(0, 1, 0x80 | 0x20)
    assert rtc.nmi_disabled and rtc.index == 0x20
    rtc.write(1, 1, 0x77)
    assert rd(rtc, 0x20) == 0x77
    assert not rtc.nmi_disabled


def test_save_restore():
    rtc, _ = make()
    wr(rtc, 0x40, 9)
    wr(rtc, 9, 0x25)
    other, _ = make()
    other.restore(rtc.save())
    assert rd(other, 0x40) == 9 and rd(other, 9) == 0x25
