"""The PL031 RTC model (ARM DDI 0224 3.2) and the -rtc clock it counts from."""

import pytest

from kemu.devices.base import IrqLine
from kemu.devices.pl031 import (RTCCR, RTCDR, RTCICR, RTCIMSC, RTCLR, RTCMIS, RTCMR, RTCRIS,
                                Pl031)
from kemu.errors import ConfigError
from kemu.machines.rtc import RtcClock, RtcConfig
from kemu.options.rtc import parse_rtc_option


class Clock:
    def __init__(self, t: float = 1000.25) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(start=1_700_000_000, t=1000.25):
    clock = Clock(t)
    alarms = []
    irq = IrqLine(name="rtc")
    rtc = Pl031(irq, clock, start, set_alarm=alarms.append)
    return rtc, clock, irq, alarms


def test_data_register_counts_seconds_from_the_start_time():
    rtc, clock, _, _ = make()
    assert rtc.read(RTCDR, 4) == 1_700_000_000
    clock.t += 0.74
    assert rtc.read(RTCDR, 4) == 1_700_000_000          # not yet a whole second
    clock.t += 0.02
    assert rtc.read(RTCDR, 4) == 1_700_000_001
    rtc.write(RTCDR, 4, 5)                               # read-only
    assert rtc.read(RTCDR, 4) == 1_700_000_001


def test_load_register_sets_the_count_and_reads_back():
    rtc, clock, _, _ = make()
    rtc.write(RTCLR, 4, 42)
    assert rtc.read(RTCLR, 4) == 42 and rtc.read(RTCDR, 4) == 42
    clock.t += 10
    assert rtc.read(RTCDR, 4) == 52
    rtc.write(RTCLR, 4, 0xFFFFFFFF)
    clock.t += 1
    assert rtc.read(RTCDR, 4) == 0                       # wraps at 32 bits


def test_control_register_always_reads_started():
    rtc, _, _, _ = make()
    assert rtc.read(RTCCR, 4) == 1
    rtc.write(RTCCR, 4, 0)
    assert rtc.read(RTCCR, 4) == 1


def test_match_arms_a_timer_for_the_remaining_time_and_raises_the_interrupt():
    rtc, clock, irq, alarms = make()
    rtc.write(RTCMR, 4, 1_700_000_010)
    assert rtc.read(RTCMR, 4) == 1_700_000_010
    assert alarms[-1] == pytest.approx(9.75)             # 10 ticks, a quarter second in
    assert rtc.read(RTCRIS, 4) == 0 and not irq.level
    rtc.alarm()                                          # the board's timer expired
    assert rtc.read(RTCRIS, 4) == 1
    assert rtc.read(RTCMIS, 4) == 0 and not irq.level    # masked
    rtc.write(RTCIMSC, 4, 0xFF)
    assert rtc.read(RTCIMSC, 4) == 1
    assert rtc.read(RTCMIS, 4) == 1 and irq.level
    rtc.write(RTCICR, 4, 1)
    assert rtc.read(RTCRIS, 4) == 0 and rtc.read(RTCMIS, 4) == 0 and not irq.level
    assert rtc.read(RTCICR, 4) == 0                      # write-only


def test_match_equal_to_the_count_fires_at_once():
    rtc, _, irq, alarms = make()
    rtc.write(RTCIMSC, 4, 1)
    rtc.write(RTCMR, 4, rtc.read(RTCDR, 4))
    assert alarms[-1] is None and irq.level


def test_interrupt_mask_clear_lowers_the_line():
    rtc, _, irq, _ = make()
    rtc.write(RTCIMSC, 4, 1)
    rtc.alarm()
    assert irq.level
    rtc.write(RTCIMSC, 4, 0)
    assert not irq.level and rtc.read(RTCRIS, 4) == 1


def test_primecell_identification():
    rtc, _, _, _ = make()
    ids = [rtc.read(0xFE0 + 4 * i, 4) for i in range(8)]
    assert ids == [0x31, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]
    periph = ids[0] | ids[1] << 8 | ids[2] << 16 | ids[3] << 24
    assert periph & 0x000FFFFF == 0x00041031             # Linux's rtc-pl031 amba id


def test_save_restore_and_reset_keep_the_time():
    rtc, clock, irq, _ = make()
    rtc.write(RTCLR, 4, 500)
    rtc.write(RTCIMSC, 4, 1)
    state = rtc.save()
    other, _, _, _ = make()
    other.clock = clock
    other.restore(state)
    assert other.read(RTCDR, 4) == 500 and other.read(RTCIMSC, 4) == 1
    rtc.reset()
    assert rtc.read(RTCDR, 4) == 500 and rtc.read(RTCIMSC, 4) == 0


# -- -rtc -------------------------------------------------------------------------------------
def test_rtc_option_parsing():
    assert parse_rtc_option("base=utc") == RtcConfig()
    assert parse_rtc_option("base=localtime,clock=vm") == RtcConfig("localtime", "vm")
    assert parse_rtc_option("clock=rt,driftfix=slew").clock == "rt"
    assert parse_rtc_option("base=2006-06-17T16:01:21").base == "2006-06-17T16:01:21"
    assert parse_rtc_option("base=2006-06-17").base == "2006-06-17"
    for bad in ("base=yesterday", "clock=tsc", "driftfix=fast", "speed=2", "utc"):
        with pytest.raises(ConfigError) as e:
            parse_rtc_option(bad)
        assert "\n" not in str(e.value)


def test_rtc_clock_bases():
    wall, mono = Clock(1_700_000_000.5), Clock(50.0)
    assert RtcClock(RtcConfig(), wall=wall, monotonic=mono).time() == 1_700_000_000.5
    local = RtcClock(RtcConfig("localtime"), wall=wall, monotonic=mono,
                     utc_offset=lambda t: 3600)
    assert local.time() == 1_700_003_600.5
    dated = RtcClock(RtcConfig("2006-06-17T16:01:21", "rt"), wall=wall, monotonic=mono)
    assert dated.time() == 1150560081
    mono.t += 5
    assert dated.time() == 1150560086


def test_vm_clock_stops_while_paused_and_others_do_not():
    wall, mono = Clock(1_700_000_000.0), Clock(50.0)
    clocks = {c: RtcClock(RtcConfig(clock=c), wall=wall, monotonic=mono)
              for c in ("host", "rt", "vm")}
    for c in clocks.values():
        c.pause()
    wall.t += 30
    mono.t += 30
    for c in clocks.values():
        c.resume()
    assert clocks["host"].time() == 1_700_000_030.0
    assert clocks["rt"].time() == 1_700_000_030.0
    assert clocks["vm"].time() == 1_700_000_000.0
    mono.t += 2
    assert clocks["vm"].time() == 1_700_000_002.0


def test_microvm_cmos_rtc_shows_the_rtc_clock():
    """-rtc base=DATE on microvm: the CMOS RTC reads that date (BCD), and clock=vm
    stops it while paused."""
    from kemu.devices.cmos_rtc import CmosRtc, RTC_YEAR, RTC_MONTH, RTC_SECONDS
    mono = Clock(10.0)
    clock = RtcClock(RtcConfig("2006-06-17T16:01:21", "vm"), monotonic=mono)
    cmos = CmosRtc(now=clock.time)

    def reg(index):
        cmos.write(0, 1, index)
        return cmos.read(1, 1)
    assert (reg(RTC_YEAR), reg(RTC_MONTH), reg(RTC_SECONDS)) == (0x06, 0x06, 0x21)
    clock.pause()
    mono.t += 5
    clock.resume()
    assert reg(RTC_SECONDS) == 0x21
    mono.t += 5
    assert reg(RTC_SECONDS) == 0x26
