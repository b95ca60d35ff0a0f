"""kemu.testing.nested.run_on_real_kvm boots L1 again, once, when L1's own kernel
panicked (an L0 fault, not the VMM under test), and not for any other failure."""
import pytest

from kemu.errors import GuestBuildError
from kemu.testing import nested

PANIC = "==NESTED-BEGIN==\n[ 325.5] Kernel panic - not syncing: corrupted stack end\n"
DONE = "==NESTED-BEGIN==\nhello\n==NESTED-END== status=0\n"


class FakeHarness:
    def __init__(self, consoles):
        self.consoles = list(consoles)
        self.runs = 0

    def __call__(self):            # stands in for the NestedHarness class
        return self

    def run(self, script, timeout, env):
        self.runs += 1
        console = self.consoles.pop(0)
        ok = console.endswith("status=0\n")
        return nested.NestedResult(0 if ok else None, "hello\n" if ok else "", console, 1.0)


@pytest.fixture
def harness(monkeypatch):
    import kemu.accel.kvm
    monkeypatch.setattr(kemu.accel.kvm, "kvm_is_hardware_backed", lambda: False)
    monkeypatch.setattr(nested, "nested_unavailable_reason", lambda: None)

    def install(*consoles):
        fake = FakeHarness(consoles)
        monkeypatch.setattr(nested, "NestedHarness", fake)
        return fake
    return install


def test_an_l1_panic_is_run_again_once_and_said(harness):
    fake = harness(PANIC, DONE)
    output = nested.run_on_real_kvm("echo hello", 60)
    assert fake.runs == 2
    assert output.endswith("hello\n")
    assert "L1's kernel panicked, ran again" in output


def test_two_panics_fail(harness):
    fake = harness(PANIC, PANIC)
    with pytest.raises(GuestBuildError, match="L1 did not finish"):
        nested.run_on_real_kvm("echo hello", 60)
    assert fake.runs == 2


def test_a_timeout_is_not_retried(harness):
    fake = harness("==NESTED-BEGIN==\n[nested: L1 timed out after 60 s]", DONE)
    with pytest.raises(GuestBuildError, match="timed out"):
        nested.run_on_real_kvm("echo hello", 60)
    assert fake.runs == 1
