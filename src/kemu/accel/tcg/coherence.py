"""The vCPUs of one machine as one inner-shareable domain: broadcast TLB and
instruction-cache maintenance between separate engine instances.

Each vCPU is its own Unicorn instance on its own host thread over the same
guest RAM, so each has its own TLB and its own cache of translated code.  On
real hardware the ``...IS`` ("Inner Shareable") TLB maintenance instructions
and the instruction-cache maintenance to the Point of Unification reach every
PE in the domain (Arm ARM DDI 0487, D5.10.2 "TLB maintenance instructions",
D4.4.4 "Cache maintenance instructions"; B2.2.5 on concurrent modification
of instructions).  Here the executing vCPU's hook posts the same maintenance
to every other vCPU, which carries it out on its own thread before it runs
guest code again:

* ``TLBI VMALLE1IS, VAE1IS, ASIDE1IS, VAAE1IS, VALE1IS, VAALE1IS``: every
  other vCPU flushes its whole TLB (a superset of any of them).  The issuer
  does not go on until no other vCPU may still use a stale translation (QEMU's
  ``tlb_flush_*_all_cpus_synced``): it stops each vCPU that is inside guest
  code and waits until that vCPU has left it; a vCPU that is not running
  flushes on entry.  A vCPU waiting for others serves the requests addressed
  to itself while it waits, so two vCPUs broadcasting at once do not wait for
  each other forever.
* ``IC IVAU, Xt``: the page holding the line (translated with the issuer's
  MMU) is dropped from every vCPU's translations, the issuer's included (the
  code may have been written by another vCPU, which the issuer's engine did
  not see); ``IC IALLUIS`` drops all of them, ``IC IALLU`` all of the
  issuer's.  vCPUs running guest code are stopped, so they pick the
  invalidation up at their next block (the issuer's ISB ends its block), but
  the issuer does not wait for the others: the architecture only promises
  new instructions after the other PE's own context synchronization.

Lock order: the domain's condition, then a vCPU's own lock (to stop it);
never the other way round.
"""

from __future__ import annotations

import threading
from typing import Protocol

# (op0, op1, CRn, CRm, op2) of the broadcast maintenance instructions (SYS space).
TLBI_VMALLE1IS = (1, 0, 8, 3, 0)
TLBI_VAE1IS = (1, 0, 8, 3, 1)
TLBI_ASIDE1IS = (1, 0, 8, 3, 2)
TLBI_VAAE1IS = (1, 0, 8, 3, 3)
TLBI_VALE1IS = (1, 0, 8, 3, 5)
TLBI_VAALE1IS = (1, 0, 8, 3, 7)
TLBI_IS = (TLBI_VMALLE1IS, TLBI_VAE1IS, TLBI_ASIDE1IS, TLBI_VAAE1IS, TLBI_VALE1IS,
           TLBI_VAALE1IS)
IC_IALLUIS = (1, 0, 7, 1, 0)
IC_IALLU = (1, 0, 7, 5, 0)
IC_IVAU = (1, 3, 7, 5, 1)

PAGE = 4096
ALL_CODE = None  # an invalidation of every translation (IC IALLUIS)


class Member(Protocol):
    """What the domain needs from a vCPU (all called with the domain's lock held)."""

    index: int

    def stop_for_maintenance(self) -> None:
        """Stop running guest code at the next block start (any thread)."""

    def flush_tlb(self) -> None:
        """Flush this vCPU's TLB (its own thread only)."""

    def invalidate_code(self, pages: set[int] | None) -> None:
        """Drop translations of the guest physical ``pages`` (None: all); own thread."""


class _State:
    __slots__ = ("member", "executing", "tlb_stale", "code_stale", "all_code_stale", "entries")

    def __init__(self, member: Member) -> None:
        self.member = member
        self.executing = False        # inside emu_start
        self.tlb_stale = False
        self.code_stale: set[int] = set()
        self.all_code_stale = False
        self.entries = 0              # times it entered guest code


class CoherenceDomain:
    """The vCPUs sharing guest RAM, and the maintenance each still owes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._states: dict[int, _State] = {}
        # issuer -> (page, entries of the others, the issuer's entries) at its last IC IVAU
        self._last_ivau: dict[int, tuple[int, int, int]] = {}
        #: Broadcasts made, for tests and diagnostics.
        self.tlb_broadcasts = 0
        self.code_broadcasts = 0

    def join(self, member: Member) -> None:
        with self._cond:
            self._states[member.index] = _State(member)
            self._last_ivau.pop(member.index, None)

    def __len__(self) -> int:
        return len(self._states)

    # -- the vCPU's own thread, around guest code -------------------------------------
    def enter(self, member: Member) -> None:
        """Before guest code runs: carry out the maintenance owed, then count as running."""
        with self._cond:
            st = self._states[member.index]
            self._settle(st)
            st.executing = True
            st.entries += 1

    def leave(self, member: Member) -> None:
        with self._cond:
            self._states[member.index].executing = False
            self._cond.notify_all()

    def _settle(self, st: _State) -> None:
        if st.tlb_stale:
            st.tlb_stale = False
            st.member.flush_tlb()
        if st.all_code_stale:
            st.all_code_stale = False
            st.code_stale.clear()
            st.member.invalidate_code(ALL_CODE)
        elif st.code_stale:
            pages, st.code_stale = st.code_stale, set()
            st.member.invalidate_code(pages)

    # -- broadcasts, from the issuing vCPU's hook ------------------------------------------
    def broadcast_tlb_flush(self, issuer: Member) -> None:
        """TLBI ...IS: flush every other vCPU's TLB before the issuer goes on."""
        with self._cond:
            self.tlb_broadcasts += 1
            others = [s for i, s in self._states.items() if i != issuer.index]
            for st in others:
                st.tlb_stale = True
                if st.executing:
                    st.member.stop_for_maintenance()
            me = self._states[issuer.index]
            while any(st.tlb_stale and st.executing for st in others):
                if self._settle_tlb_only(me):
                    self._cond.notify_all()     # another vCPU may be waiting for this one
                self._cond.wait(0.05)
                for st in others:          # a stop may have landed before the block began
                    if st.tlb_stale and st.executing:
                        st.member.stop_for_maintenance()
            if self._settle_tlb_only(me):
                self._cond.notify_all()

    @staticmethod
    def _settle_tlb_only(st: _State) -> bool:
        """A waiting vCPU serves the TLB flush asked of it (safe inside its hook:
        the TLBI helpers flush from there too); True if there was one."""
        if not st.tlb_stale:
            return False
        st.tlb_stale = False
        st.member.flush_tlb()
        return True

    def broadcast_code_invalidation(self, issuer: Member, page: int | None,
                                    local: bool = False) -> None:
        """IC IVAU (the guest physical ``page``), IC IALLUIS (``None``), or with
        ``local`` IC IALLU (the issuer only).

        The issuer drops its own translations too: the code may have been
        written by another vCPU, whose stores the issuer's instance did not
        see.  It stops at its next block start for that (the ISB that must
        follow ends the block), every other vCPU running guest code likewise.
        """
        with self._cond:
            targets = [s for i, s in self._states.items() if i == issuer.index or not local]
            if page is not None:
                # Linux cleans a range line by line: for the next line of the
                # same page nothing more is needed while the other vCPUs have
                # not run since the page was posted to them, and the issuer has
                # run only again after the stop this posting gave it.
                mine = self._states[issuer.index].entries
                others = sum(st.entries for st in targets) - mine
                last = self._last_ivau.get(issuer.index)
                if last is not None and last[:2] == (page, others) and mine <= last[2] + 1:
                    return
                self._last_ivau[issuer.index] = (page, others, mine)
            else:
                self._last_ivau.pop(issuer.index, None)
            self.code_broadcasts += 1
            for st in targets:
                if page is None:
                    st.all_code_stale = True
                else:
                    st.code_stale.add(page)
                if st.executing:
                    st.member.stop_for_maintenance()
