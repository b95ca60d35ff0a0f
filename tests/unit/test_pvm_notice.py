"""KVM on a PVM host (issue 17, item 1): one line saying what will happen, the
guest's early output switched on, and never a silent screen."""

import io
import threading

from kemu.cli import choose_default_guest
from kemu.machines.config import MachineConfig
from kemu.pvm_notice import EARLY_OUTPUT, SilenceReporter, prepare_for_pvm


def kvm_config(append: str = "console=ttyS0", **extra) -> MachineConfig:
    config = MachineConfig(machine="microvm", accel="kvm", append=append)
    config.extra.update(extra)
    return config


def test_on_pvm_one_line_says_what_will_happen_and_early_output_is_on():
    config = kvm_config()
    note = prepare_for_pvm(config, pvm=True)
    assert note.startswith("kemu: warning: /dev/kvm is PVM") and "\n" not in note
    assert "software emulation" in note and "slower than TCG" in note and "minutes" in note
    assert config.append == f"console=ttyS0 {EARLY_OUTPUT}"
    assert "override" not in note


def test_an_early_console_the_user_chose_is_kept():
    for append in ("console=ttyS0 earlycon=uart,io,0x3f8", "earlyprintk=ttyS0 quiet"):
        config = kvm_config(append)
        assert prepare_for_pvm(config, pvm=True) is not None
        assert config.append == append
    config = kvm_config(serial="none")
    assert EARLY_OUTPUT not in prepare_for_pvm(config, pvm=True)
    assert config.append == "console=ttyS0"


def test_nothing_changes_off_pvm_or_on_tcg():
    for config, pvm in ((kvm_config(), False), (MachineConfig(accel="tcg", append="x"), True)):
        before = config.append
        assert prepare_for_pvm(config, pvm=pvm) is None
        assert config.append == before


def test_the_default_guest_note_on_pvm_suggests_no_kvm_override(monkeypatch):
    import kemu.accel.kvm as kvm
    monkeypatch.setattr(kvm, "kvm_is_hardware_backed", lambda path=None: False)
    monkeypatch.setattr(kvm, "is_pvm", lambda: True)
    arch, accel, note = choose_default_guest(None, None)
    assert (arch, accel) == ("aarch64", "tcg")
    assert "PVM" in note and "--accel kvm" not in note and "override" not in note


class Lines(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.wrote = threading.Event()

    def write(self, text: str) -> int:
        n = super().write(text)
        self.wrote.set()
        return n


def test_a_silent_guest_is_reported_until_it_prints():
    stream, got = Lines(), []
    reporter = SilenceReporter(got.append, every=0.05, stream=stream)
    reporter.start()
    assert stream.wrote.wait(30)
    assert "nothing from the guest yet" in stream.getvalue()
    reporter.write(b"Linux version")
    reporter._thread.join(30)
    assert not reporter._thread.is_alive()
    assert got == [b"Linux version"]
