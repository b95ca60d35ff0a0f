"""A private libvirtd for tests: its own configuration and state in a scratch directory.

CI runs as root without systemd, so the daemon is started by hand.  As root,
libvirtd's QEMU driver reads ``/etc/libvirt/qemu.conf`` and keeps its state
in ``/run/libvirt`` and ``/var/lib/libvirt`` whatever its command line says;
the daemon therefore runs in its own mount namespace (``unshare -m``) where
those directories are the scratch directory's, with its pidfile among them
(so that it runs beside the host's own libvirtd, if any).  Clients outside reach it at
``qemu:///system?socket=SCRATCH/run/libvirt-sock``.

The configuration: guests run as root with no security driver, no cgroups
and no per-domain mount namespace (none of which a container has), and the
emulator's stdout/stderr go to a log file (``stdio_handler = "file"``), so
that no virtlogd is needed.

    python -m kemu.testing.libvirtd SCRATCH   run one in the foreground (Ctrl-C ends it)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

#: The directories the daemon sees, each replaced by one under the scratch directory.
PRIVATE_DIRS = {"/etc/libvirt": "etc", "/run/libvirt": "run", "/var/lib/libvirt": "lib",
                "/var/cache/libvirt": "cache", "/var/log/libvirt": "log"}

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

LIBVIRTD_CONF = """\
listen_tls = 0
listen_tcp = 0
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "{level}:file:{log}"
log_filters = "{filters}"
"""


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, however it dies
    (Linux's PR_SET_PDEATHSIG; it survives the exec of unshare, sh and libvirtd)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def missing_tools() -> str | None:
    """Why a private libvirtd cannot run here, or None."""
    for tool in ("libvirtd", "virsh", "unshare", "mount"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (scripts/bootstrap.sh --test installs libvirt)"
    if os.geteuid() != 0:
        return "the private libvirtd runs as root (in its own mount namespace)"
    return None


class PrivateLibvirtd:
    """One libvirtd with everything under ``scratch``; :meth:`start`, :meth:`stop`."""

    def __init__(self, scratch: Path, debug_monitor: bool = False) -> None:
        self.scratch = Path(scratch)
        self.debug_monitor = debug_monitor
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.scratch / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.scratch / "log" / "libvirtd.log"

    def domain_log(self, name: str) -> Path:
        """The emulator's stderr and command line for domain ``name``."""
        return self.scratch / "log" / "qemu" / f"{name}.log"

    def _configure(self) -> None:
        for sub in PRIVATE_DIRS.values():
            (self.scratch / sub).mkdir(parents=True, exist_ok=True)
        etc = self.scratch / "etc"
        (etc / "qemu.conf").write_text(QEMU_CONF)
        filters = ("1:qemu.qemu_monitor 1:qemu.qemu_process 3:*" if self.debug_monitor
                   else "3:*")
        # Inside the namespace the log directory is /var/log/libvirt.
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(
            level=1 if self.debug_monitor else 3, log="/var/log/libvirt/libvirtd.log",
            filters=filters))
        for name in ("libvirt.conf", "virtlogd.conf"):
            (etc / name).write_text("")

    def start(self, timeout: float = 30.0) -> None:
        self._configure()
        mounts = " && ".join(f"mkdir -p {target} && mount --bind {self.scratch / sub} {target}"
                             for target, sub in PRIVATE_DIRS.items())
        script = f"mount --make-rprivate / && {mounts} && exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid"
        self.proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.scratch / "libvirtd.stderr", "wb"),
                                     start_new_session=True, preexec_fn=_end_with_parent)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                log = self.log.read_text()[-500:] if self.log.exists() else ""
                raise RuntimeError("libvirtd exited: " + (
                    (self.scratch / "libvirtd.stderr").read_text()[-500:] + log).strip())
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirtd made no socket within {timeout:g} s")
            time.sleep(0.05)

    def virsh(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """Destroy the domains still running (libvirtd leaves them running when it
        ends), then end the daemon (SIGTERM, SIGKILL after 15 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            names = self.virsh("list", "--name", timeout=30).stdout.split()
            for name in names:
                self.virsh("destroy", name, timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def wait_for_state(dom, state: int, timeout: float = 60.0) -> None:
    """Until libvirt reports ``state`` for domain ``dom`` (a libvirt.virDomain; libvirt
    learns of it from the emulator's events); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while dom.state()[0] != state:
        assert time.monotonic() < deadline, f"domain state {dom.state()} never became {state}"
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    daemon = PrivateLibvirtd(Path(argv[0]), debug_monitor="--debug" in argv)
    daemon.start()
    print(f"libvirtd is up: virsh -c '{daemon.uri}'", flush=True)
    try:
        daemon.proc.wait()
    except KeyboardInterrupt:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
