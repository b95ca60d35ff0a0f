"""The vCPUs' broadcast maintenance protocol (kemu.accel.tcg.coherence), with
stand-in vCPUs: who flushes when, who waits for whom."""

import threading

from kemu.accel.tcg.coherence import ALL_CODE, CoherenceDomain


class FakeCpu:
    def __init__(self, index, domain):
        self.index = index
        self.flushes = 0
        self.invalidated = []
        self.stop = threading.Event()
        self.domain = domain
        domain.join(self)

    def stop_for_maintenance(self):
        self.stop.set()

    def flush_tlb(self):
        self.flushes += 1

    def invalidate_code(self, pages):
        self.invalidated.append(pages if pages is ALL_CODE else sorted(pages))


def test_issuer_waits_for_a_running_vcpu_and_an_idle_one_flushes_on_entry():
    d = CoherenceDomain()
    a, b, c = FakeCpu(0, d), FakeCpu(1, d), FakeCpu(2, d)
    d.enter(a)
    d.enter(b)                                   # b runs guest code; c does not
    done = threading.Event()

    def tlbi():
        d.broadcast_tlb_flush(a)
        done.set()

    t = threading.Thread(target=tlbi)
    t.start()
    assert b.stop.wait(5)                        # b is told to stop ...
    assert not done.wait(0.05)                   # ... and a waits for it
    d.leave(b)                                   # b has left guest code
    assert done.wait(5)
    t.join()
    assert (a.flushes, b.flushes, c.flushes) == (0, 0, 0)
    d.enter(b)
    d.enter(c)                                   # each flushes before it runs again
    assert (b.flushes, c.flushes) == (1, 1)


def test_two_vcpus_broadcasting_at_once_do_not_wait_for_each_other_forever():
    d = CoherenceDomain()
    a, b = FakeCpu(0, d), FakeCpu(1, d)
    d.enter(a)
    d.enter(b)
    barrier = threading.Barrier(2)
    finished = []

    def hook(cpu):                               # both inside guest code, in their hooks
        barrier.wait()
        d.broadcast_tlb_flush(cpu)
        finished.append(cpu.index)

    threads = [threading.Thread(target=hook, args=(cpu,)) for cpu in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(finished) == [0, 1]
    assert (a.flushes, b.flushes) == (1, 1)      # each served the other's request


def test_code_invalidation_reaches_the_others_once_per_page_until_they_run():
    d = CoherenceDomain()
    a, b = FakeCpu(0, d), FakeCpu(1, d)
    d.broadcast_code_invalidation(a, 0x40001000)
    d.broadcast_code_invalidation(a, 0x40001000)  # the next line of the same page
    assert d.code_broadcasts == 1
    d.enter(b)
    assert b.invalidated == [[0x40001000]]
    d.leave(b)
    d.broadcast_code_invalidation(a, 0x40001000)  # b may have translated it again
    d.broadcast_code_invalidation(a, ALL_CODE)
    d.enter(b)
    assert b.invalidated == [[0x40001000], ALL_CODE]
    d.enter(a)                                    # the issuer drops its own too
    assert a.invalidated == [ALL_CODE]


def test_ic_iallu_is_the_issuers_only():
    d = CoherenceDomain()
    a, b = FakeCpu(0, d), FakeCpu(1, d)
    d.enter(a)
    d.enter(b)
    d.broadcast_code_invalidation(a, ALL_CODE, local=True)
    assert a.stop.is_set() and not b.stop.is_set()
    d.leave(a)
    d.enter(a)
    assert a.invalidated == [ALL_CODE] and b.invalidated == []
