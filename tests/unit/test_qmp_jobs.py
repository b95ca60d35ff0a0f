"""QEMU's job state machine for the snapshot jobs (kemu.qmp.jobs): statuses, events,
query-jobs entries and the verbs each status accepts, with QEMU's messages."""

import threading

import pytest

from kemu.errors import KemuError
from kemu.qmp.jobs import Jobs
from kemu.qmp.protocol import QmpError


def make():
    events = []
    done = threading.Condition()

    def emit(job_id, status):
        with done:
            events.append((job_id, status))
            done.notify_all()
    return Jobs(emit), events, done


def wait_concluded(jobs, events, done, job_id):
    with done:
        assert done.wait_for(lambda: (job_id, "concluded") in events, 10)


def test_a_job_that_works_and_one_that_fails():
    jobs, events, done = make()
    release = threading.Event()
    jobs.start("ok", "snapshot-save", lambda: release.wait(10))
    assert jobs.query() == [{"current-progress": 0, "status": "running", "total-progress": 1,
                             "type": "snapshot-save", "id": "ok"}]
    with pytest.raises(QmpError, match="Job 'ok' in state 'running' cannot accept command "
                                       "verb 'dismiss'"):
        jobs.dismiss("ok")
    release.set()
    wait_concluded(jobs, events, done, "ok")

    def fail():
        raise KemuError("Snapshot 'x' does not exist in one or more devices")
    jobs.start("bad", "snapshot-load", fail)
    wait_concluded(jobs, events, done, "bad")
    assert [s for j, s in events if j == "ok"] == ["created", "running", "waiting", "pending",
                                                   "concluded"]
    assert [s for j, s in events if j == "bad"] == ["created", "running", "aborting",
                                                    "concluded"]
    listed = jobs.query()
    assert [j["id"] for j in listed] == ["bad", "ok"]              # newest first
    assert listed[0]["error"] == "Snapshot 'x' does not exist in one or more devices"
    assert listed[1]["current-progress"] == 1 and "error" not in listed[1]
    for verb in ("cancel", "finalize"):
        with pytest.raises(QmpError, match=f"Job 'ok' in state 'concluded' cannot accept "
                                           f"command verb '{verb}'"):
            getattr(jobs, verb)("ok")
    jobs.dismiss("ok")
    assert events[-1] == ("ok", "null") and [j["id"] for j in jobs.query()] == ["bad"]
    with pytest.raises(QmpError, match="^Job not found$"):
        jobs.dismiss("ok")


def test_job_ids_are_checked_as_qemu_checks_them():
    jobs, _, _ = make()
    for bad in ("1x", "", "a b", "-x"):
        with pytest.raises(QmpError, match="Invalid job ID"):
            jobs.start(bad, "snapshot-save", lambda: None)
    release = threading.Event()
    jobs.start("a.b-c_d", "snapshot-save", lambda: release.wait(10))
    with pytest.raises(QmpError, match="^Job ID 'a.b-c_d' already in use$"):
        jobs.start("a.b-c_d", "snapshot-save", lambda: None)
    release.set()


def test_a_bug_in_the_work_fails_the_job_not_the_machine():
    jobs, events, done = make()
    jobs.start("j", "snapshot-delete", lambda: 1 / 0)
    wait_concluded(jobs, events, done, "j")
    assert jobs.query()[0]["error"].startswith("internal error: ZeroDivisionError")


def test_hmp_string_arguments_take_quotes_as_qemu():
    from kemu.monitor.hmp import Hmp
    assert Hmp._string(["s1"]) == "s1"
    assert Hmp._string(['"s1"']) == "s1"                      # libvirt: savevm "NAME"
    assert Hmp._string(['"with', 'space\\"q"']) == 'with space"q'
    assert Hmp._string([]) is None
    with pytest.raises(QmpError, match="unterminated"):
        Hmp._string(['"open'])
