"""Debian's arm64 kernel on the virt board with -smp N under the tcg accelerator."""

import json
import re
import socket
import time

import pytest


def _schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(seconds on a host CPU, seconds runnable but waiting for one) of a thread."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        on_cpu, waiting, _slices = f.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def sh(c, command: str, timeout: float = 60.0) -> str:
    """Run ``command`` and wait for the next prompt, so that the next command is
    not typed ahead (the console would echo it twice)."""
    out = c.run(command, timeout)
    c.expect(rb"# ")
    return out


@pytest.mark.parametrize("smp", [2, 4])
def test_linux_sees_every_cpu_and_ipis_flow(guest, console_factory, smp):
    c = console_factory("run", "-smp", str(smp))
    c.expect(rb"# ", timeout=120)
    assert sh(c, "nproc").strip() == str(smp)
    assert sh(c, "cat /sys/devices/system/cpu/online").strip() == f"0-{smp - 1}"
    interrupts = sh(c, "cat /proc/interrupts")
    ipi = [line.split() for line in interrupts.splitlines() if line.strip().startswith("IPI0:")]
    assert ipi and len(ipi[0]) >= smp + 1
    assert sum(int(n) for n in ipi[0][1:smp + 1]) > 0       # rescheduling IPIs were taken
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


@pytest.mark.parametrize("smp", [2, 4, 17])
def test_linux_on_gicv3(guest, console_factory, smp):
    """-M virt,gic-version=3: the kernel finds the system-register CPU interface and
    a redistributor per CPU, brings every CPU up, and timers and IPIs arrive;
    17 CPUs is more than GICv2 can have, and more than one cluster (Aff1)."""
    c = console_factory("run", "-M", "virt,gic-version=3", "-smp", str(smp))
    c.expect(rb"# ", timeout=120)
    assert sh(c, "nproc").strip() == str(smp)
    log = sh(c, "dmesg")
    assert "detected: GIC system register CPU interface" in log
    for cpu in range(1, smp):   # the redistributor by MPIDR: clusters of 16 CPUs
        mpidr = (cpu // 16) << 8 | cpu % 16
        assert f"GICv3: CPU{cpu}: found redistributor {mpidr:x} region 0:" in log
    interrupts = sh(c, "cat /proc/interrupts")
    timer = [line.split() for line in interrupts.splitlines() if "arch_timer" in line]
    assert timer and timer[0][smp + 1] == "GICv3" and timer[0][smp + 2] == "27"
    assert all(int(n) > 0 for n in timer[0][1:smp + 1])      # every CPU's timer PPI
    ipi = [line.split() for line in interrupts.splitlines() if line.strip().startswith("IPI1:")]
    assert ipi and sum(int(n) for n in ipi[0][1:smp + 1]) > 0  # function-call SGIs
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


def test_linux_on_gicv3_reboots(guest, console_factory):
    """A guest reset (PSCI SYSTEM_RESET) puts the GICv3 back to its reset state
    (redistributors asleep, routing to CPU 0): the kernel boots again on both CPUs."""
    c = console_factory("run", "-M", "virt,gic-version=3", "-smp", "2")
    c.expect(rb"# ", timeout=120)
    c.send("reboot -f\n")
    c.expect(rb"reboot: Restarting system", timeout=60)
    c.expect(rb"kemu guest ready", timeout=120)
    c.expect(rb"# ", timeout=120)
    assert sh(c, "nproc").strip() == "2"
    assert "GICv3" in sh(c, "cat /proc/interrupts")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


def test_cpu_offline_online_and_a_parallel_job(guest, console_factory):
    c = console_factory("run", "-smp", "2")
    c.expect(rb"# ", timeout=120)
    sh(c, "echo 0 > /sys/devices/system/cpu/cpu1/online")      # PSCI CPU_OFF
    assert sh(c, "cat /sys/devices/system/cpu/online").strip() == "0"
    assert sh(c, "nproc").strip() == "1"
    sh(c, "echo 1 > /sys/devices/system/cpu/cpu1/online")      # PSCI CPU_ON
    assert sh(c, "cat /sys/devices/system/cpu/online").strip() == "0-1"
    out = sh(c, "dd if=/dev/zero bs=1M count=64 2>/dev/null | md5sum > /tmp/a & "
                "dd if=/dev/zero bs=1M count=64 2>/dev/null | md5sum > /tmp/b; wait; "
                "cat /tmp/a /tmp/b", timeout=300)
    sums = re.findall(r"^([0-9a-f]{32})  -$", out, re.M)
    assert sums == ["7f614da9329cd3aebf59b91aadc30bf0"] * 2    # md5 of 64 MiB of zeros
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


def test_parallel_guest_job_uses_more_than_one_host_core(guest, tmp_path, console_factory):
    """Two CPU-bound guest processes keep both vCPU threads (QMP's query-cpus-fast
    names them) wanting a host core for the whole job: each is on a host CPU, or
    runnable and waiting for one, most of the time, so nothing in kemu runs
    them one at a time.  Whether they get two cores is the host's choice (this
    machine is shared): the test says how many they got."""
    sock = tmp_path / "qmp.sock"
    c = console_factory("run", "-smp", "2", "-qmp", f"unix:{sock},server=on,wait=off")
    c.expect(rb"# ", timeout=120)
    qmp = socket.socket(socket.AF_UNIX)
    qmp.connect(str(sock))
    f = qmp.makefile("rw")
    json.loads(f.readline())
    for cmd in ({"execute": "qmp_capabilities"}, {"execute": "query-cpus-fast"}):
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        reply = json.loads(f.readline())
    qmp.close()
    cpus = reply["return"]
    assert [cpu["cpu-index"] for cpu in cpus] == [0, 1]
    tids = [cpu["thread-id"] for cpu in cpus]
    pid = c.proc.pid
    sh(c, "dd if=/dev/zero of=/tmp/f bs=1M count=32 2>/dev/null")
    before = [_schedstat(pid, tid) for tid in tids]
    t0 = time.monotonic()
    sh(c, "for i in 1 2 3; do md5sum /tmp/f; done > /dev/null & "
          "for i in 1 2 3; do md5sum /tmp/f; done > /dev/null; wait", timeout=300)
    wall = time.monotonic() - t0
    after = [_schedstat(pid, tid) for tid in tids]
    c.send("poweroff -f\n")
    assert c.wait(60) == 0
    on_cpu = [a[0] - b[0] for a, b in zip(after, before)]
    wanting = [a[0] + a[1] - b[0] - b[1] for a, b in zip(after, before)]
    print(f"job {wall:.2f} s: vCPU threads on a host CPU {on_cpu} s "
          f"({sum(on_cpu) / wall:.2f} cores), wanting one {wanting} s")
    # (one loop starts or ends a little before the other: most of the job, not all)
    assert min(wanting) > 0.6 * wall, (wanting, wall)
    # Each thread did a fair share of the work (how much CPU they got in all is the
    # host's choice: at a load of 10 on 2 cores it is a fraction of one core).
    assert min(on_cpu) > 0.3 * sum(on_cpu), on_cpu
