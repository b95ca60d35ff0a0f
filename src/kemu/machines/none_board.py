"""QEMU's ``-machine none``: no CPU, no RAM, no devices; only the monitors run.

Management tools start the emulator this way to ask it what it can do
(libvirt's capability probe: ``-machine none -qmp ... -daemonize``), so the
board has the run states a QMP client expects (prelaunch under ``-S``,
running, paused after ``stop``) and nothing behind them.
"""

from __future__ import annotations

import threading
from typing import Callable

from kemu.machines.config import MachineConfig
from kemu.machines.runtime import Outcome, RunState


class _Nothing:
    """An empty RAM map and an empty MMIO bus."""

    regions: tuple = ()
    mappings: tuple = ()


class NoneBoard:
    virtio_slots: tuple = ()

    def __init__(self, config: MachineConfig, console) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.memory = self.mmio = _Nothing()
        self.on_state: Callable[[RunState], None] = lambda s: None
        self.state = RunState.CREATED
        self._outcome: Outcome | None = None
        self._ended = threading.Event()

    def _set(self, state: RunState) -> None:
        self.state = state
        self.on_state(state)

    def start(self) -> None:
        self._set(RunState.PAUSED if self.config.start_paused else RunState.RUNNING)

    def pause(self, timeout: float | None = 10.0) -> bool:
        if self.state != RunState.STOPPED:
            self._set(RunState.PAUSED)
        return True

    def resume(self) -> None:
        if self.state != RunState.STOPPED:
            self._set(RunState.RUNNING)

    def stop(self) -> None:
        if self._outcome is None:
            self._outcome = Outcome("quit", 0)
            self._set(RunState.STOPPED)
            self._ended.set()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        return self._outcome if self._ended.wait(timeout) else None

    def powerdown(self) -> None:
        """No guest to tell: as QEMU's none machine, the press goes nowhere."""

    def reset(self) -> None:
        """Nothing to reset."""

    def vcpu_thread_ids(self) -> list[int]:
        return []
