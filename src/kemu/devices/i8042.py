"""The PC's i8042 keyboard controller, as much as Linux and a reset need.

Ports (IBM PC/AT Technical Reference, "Keyboard Controller"; Linux's
drivers/input/serio/i8042.h): data at 0x60 (offset 0 here), status (read)
and command (write) at 0x64 (offset 4).  :meth:`I8042.data_port` and
:meth:`I8042.command_port` give one-port views for mapping each port on
its own.

What is modelled:

* Controller commands Linux's i8042 probe sends: 0x20 read CTR, 0x60 write
  CTR, 0xA7/0xA8 disable/enable AUX, 0xA9 AUX interface test (answers 0x02,
  "clock line stuck": no mouse, so Linux gives up on the AUX port at once),
  0xAA controller self-test (0x55), 0xAB keyboard interface test (0x00),
  0xAD/0xAE disable/enable keyboard, 0xD0/0xD1 read/write output port,
  0xD2/0xD3 write keyboard/AUX output buffer.
* Reset: command 0xFE (pulse output line 0, the CPU reset; any 0xF0-0xFF
  pulse with bit 0 clear) or 0xD1 with bit 0 clear calls ``reset()``:
  the board turns it into the "reset" system event.
* A keyboard that answers its commands (0xFF reset: ACK, 0xAA; 0xF2
  identify: ACK, 0xAB 0x83; the rest: ACK) but never types, so atkbd's probe
  succeeds without timeouts.
* The keyboard interrupt (IRQ 1) follows "output buffer full with keyboard
  data and CTR.KBDINT" as a level; the AUX interrupt is never raised.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kemu.devices.base import IrqLine

DATA = 0
STATUS = 4      # read
COMMAND = 4     # write

# -- status register ---------------------------------------------------------------------
STR_OBF = 0x01          # output buffer full
STR_IBF = 0x02          # input buffer full (never: writes are taken at once)
STR_SYS = 0x04          # system flag (self-test passed)
STR_CMDDAT = 0x08       # last write was a command
STR_KEYLOCK = 0x10      # keyboard not inhibited
STR_AUXDATA = 0x20      # output buffer holds AUX data

# -- controller configuration byte (CTR) ---------------------------------------------
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYSFLAG = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
CTR_RESET = CTR_KBDINT | CTR_SYSFLAG | CTR_XLATE

# -- controller commands -------------------------------------------------------------------
CMD_CTL_RCTR = 0x20
CMD_CTL_WCTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_CTL_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPORT = 0xD0
CMD_WRITE_OUTPORT = 0xD1
CMD_KBD_LOOP = 0xD2
CMD_AUX_LOOP = 0xD3
CMD_AUX_SEND = 0xD4
CMD_PULSE_RESET = 0xFE

CTL_TEST_OK = 0x55
AUX_TEST_CLOCK_STUCK = 0x02
OUTPORT_RESET = 0x01    # output port bit 0: the CPU reset line (active low)
OUTPORT_A20 = 0x02
OUTPORT_DEFAULT = OUTPORT_RESET | OUTPORT_A20

# -- keyboard (device) commands and answers -----------------------------------------------
KBD_ACK = 0xFA
KBD_BAT_OK = 0xAA
KBD_ID = (0xAB, 0x83)
KBD_CMD_SETLEDS = 0xED
KBD_CMD_ECHO = 0xEE
KBD_CMD_SSCANSET = 0xF0
KBD_CMD_GETID = 0xF2
KBD_CMD_SETREP = 0xF3
KBD_CMD_RESET = 0xFF
_KBD_WITH_PARAM = (KBD_CMD_SETLEDS, KBD_CMD_SSCANSET, KBD_CMD_SETREP)

OUTPUT_LIMIT = 16       # bytes queued for the guest at most


@dataclass
class I8042State:
    version: int
    output: tuple[tuple[int, bool], ...]
    ctr: int
    outport: int
    status_cmd: bool
    pending_cmd: int | None
    kbd_pending: int | None


class _Port:
    """One port of the controller, mapped on its own (0x60 or 0x64)."""

    def __init__(self, ctl: I8042, offset: int, name: str) -> None:
        self.ctl = ctl
        self.offset = offset
        self.name = name

    def read(self, offset: int, size: int) -> int:
        return self.ctl.read(self.offset + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.ctl.write(self.offset + offset, size, value)


class I8042:
    """The controller, its keyboard, an IRQ 1 line and a reset callback."""

    def __init__(self, reset: Callable[[], None], kbd_irq: IrqLine | None = None,
                 name: str = "i8042") -> None:
        self.name = name
        self.request_reset = reset
        self.kbd_irq = kbd_irq or IrqLine(name="i8042.kbd")
        self.reset()

    def data_port(self) -> _Port:
        return _Port(self, DATA, f"{self.name}-data")

    def command_port(self) -> _Port:
        return _Port(self, COMMAND, f"{self.name}-cmd")

    def reset(self) -> None:
        self.output: deque[tuple[int, bool]] = deque()   # (byte, from AUX)
        self.ctr = CTR_RESET
        self.outport = OUTPORT_DEFAULT
        self.status_cmd = False
        self.pending_cmd: int | None = None     # controller command waiting for its data
        self.kbd_pending: int | None = None     # keyboard command waiting for its parameter
        self._update()

    # -- output buffer ------------------------------------------------------------------
    def _push(self, *data: int, aux: bool = False) -> None:
        for b in data:
            if len(self.output) < OUTPUT_LIMIT:
                self.output.append((b & 0xFF, aux))
        self._update()

    def _update(self) -> None:
        head = self.output[0] if self.output else None
        self.kbd_irq.set(head is not None and not head[1] and bool(self.ctr & CTR_KBDINT))

    def status(self) -> int:
        st = STR_KEYLOCK
        if self.ctr & CTR_SYSFLAG:
            st |= STR_SYS
        if self.status_cmd:
            st |= STR_CMDDAT
        if self.output:
            st |= STR_OBF
            if self.output[0][1]:
                st |= STR_AUXDATA
        return st

    # -- guest side -----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == STATUS:
            return self.status()
        if offset == DATA:
            if not self.output:
                return 0
            value, _aux = self.output.popleft()
            self._update()
            return value
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == COMMAND:
            self.status_cmd = True
            self._command(value)
        elif offset == DATA:
            self.status_cmd = False
            cmd, self.pending_cmd = self.pending_cmd, None
            if cmd is None:
                self._keyboard(value)
            elif cmd == CMD_CTL_WCTR:
                self.ctr = value
                self._update()
            elif cmd == CMD_WRITE_OUTPORT:
                self.outport = value
                if not value & OUTPORT_RESET:
                    self.request_reset()
            elif cmd == CMD_KBD_LOOP:
                self._push(value)
            elif cmd == CMD_AUX_LOOP:
                self._push(value, aux=True)
            # CMD_AUX_SEND: there is no mouse; the byte is dropped.

    def _command(self, cmd: int) -> None:
        self.pending_cmd = None
        if cmd == CMD_CTL_RCTR:
            self._push(self.ctr)
        elif cmd in (CMD_CTL_WCTR, CMD_WRITE_OUTPORT, CMD_KBD_LOOP, CMD_AUX_LOOP,
                     CMD_AUX_SEND):
            self.pending_cmd = cmd
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUXDIS
        elif cmd == CMD_AUX_TEST:
            self._push(AUX_TEST_CLOCK_STUCK)
        elif cmd == CMD_CTL_TEST:
            self.ctr |= CTR_SYSFLAG
            self._push(CTL_TEST_OK)
        elif cmd == CMD_KBD_TEST:
            self._push(0x00)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBDDIS
        elif cmd == CMD_READ_OUTPORT:
            self._push(self.outport)
        elif cmd >= 0xF0 and not cmd & OUTPORT_RESET:
            # 0xF0-0xFF pulse the output port lines whose bits are clear; bit 0 is reset.
            self.request_reset()

    def _keyboard(self, value: int) -> None:
        """A byte for the keyboard itself (what atkbd sends through 0x60)."""
        pending, self.kbd_pending = self.kbd_pending, None
        if pending is not None:
            self._push(KBD_ACK)
            if pending == KBD_CMD_SSCANSET and value == 0:
                self._push(0x02)          # "which set": set 2
            return
        if value == KBD_CMD_RESET:
            self._push(KBD_ACK, KBD_BAT_OK)
        elif value == KBD_CMD_GETID:
            self._push(KBD_ACK, *KBD_ID)
        elif value == KBD_CMD_ECHO:
            self._push(KBD_CMD_ECHO)
        elif value in _KBD_WITH_PARAM:
            self.kbd_pending = value
            self._push(KBD_ACK)
        else:
            self._push(KBD_ACK)

    # -- state ----------------------------------------------------------------------------------
    def save(self) -> I8042State:
        return I8042State(1, tuple(self.output), self.ctr, self.outport, self.status_cmd,
                          self.pending_cmd, self.kbd_pending)

    def restore(self, state: I8042State) -> None:
        from kemu.state import check_version
        check_version(self.name, state.version)
        self.output = deque(state.output[:OUTPUT_LIMIT])
        self.ctr, self.outport = state.ctr, state.outport
        self.status_cmd, self.pending_cmd = state.status_cmd, state.pending_cmd
        self.kbd_pending = state.kbd_pending
        self._update()
