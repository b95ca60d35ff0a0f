"""The x86-64 microvm domain through libvirt, run where KVM is real (the nested
harness's L1, or a host with hardware KVM) by tests/integration/test_libvirt_microvm.py.

One private libvirtd (kemu.testing.libvirtd); for each ``NAME=EMULATOR`` given, the
same domain XML with that ``<emulator>``: define, start, the guest's shell prompt on
the pty console, what the guest sees of its hardware, a guest write that must reach
the disk image, dominfo and block statistics, suspend and resume, reboot and
shutdown (both through the ACPI power button), start and destroy, undefine.  Then ``virsh domcapabilities`` for the first emulator.  Nothing
is asserted here: each step's observations are printed as one JSON line
(``L1-RESULT {...}``) for the test to check, with the console's and the emulator
log's last lines when a step failed.

    python libvirt_microvm_l1.py SCRATCH KERNEL INITRD APPEND NAME=EMULATOR...
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from xml.etree import ElementTree

import libvirt

from kemu.testing.libvirtd import PrivateLibvirtd, wait_for_state
from kemu.testing.pty_console import PtyConsole

READY = rb"kemu guest ready"
PROMPT = rb"# "
MARK = "L1-RESULT "

#: libvirt adds a USB controller to x86 domains unless told not to, and a USB
#: controller needs PCI, which microvm (QEMU's and kemu's) does not have.
DOMAIN_XML = """\
<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='microvm'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{append}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='host-passthrough'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
      <address type='virtio-mmio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def hardware(console: PtyConsole) -> dict:
    """What the guest sees of its machine."""
    return {
        "arch": console.run("uname -m").strip(),
        "cpus": console.run("grep -c ^processor /proc/cpuinfo").strip(),
        "virtio": console.run("cat /sys/bus/virtio/devices/*/device | sort | tr '\\n' ' '")
        .strip(),
        "disk sectors": console.run("cat /sys/block/vda/size").strip(),
        "serial": console.run("cat /sys/class/tty/ttyS0/type").strip(),
        "hypervisor": console.run("grep -c '^flags.* hypervisor' /proc/cpuinfo").strip(),
    }


def lifecycle(conn, daemon: PrivateLibvirtd, name: str, emulator: str, boot: dict,
              scratch: Path) -> dict:
    out: dict = {"steps": []}
    disk = scratch / f"{name}.img"
    disk.write_bytes(b"\0" * (16 << 20))
    dom = conn.defineXML(DOMAIN_XML.format(name=name, emulator=emulator, disk=disk, **boot))
    out["steps"].append("define")
    console = None
    t0 = time.monotonic()
    try:
        dom.create()
        out["steps"].append("start")
        tty = ElementTree.fromstring(dom.XMLDesc()).find("./devices/console").get("tty")
        console = PtyConsole(tty)
        console.expect(READY, timeout=300)
        console.expect(PROMPT)
        out["boot seconds"] = round(time.monotonic() - t0, 1)
        out["steps"].append("console")
        out["hardware"] = hardware(console)

        # A write in the guest reaches the image in L1.
        console.run(f"printf kemu-libvirt-{name} | dd of=/dev/vda conv=fsync 2>/dev/null")
        out["disk"] = disk.read_bytes()[:32].rstrip(b"\0").decode(errors="replace")
        out["steps"].append("disk")
        state, max_kib, _kib, vcpus, _cpu_time = dom.info()
        out["info"] = {"state": state, "max KiB": max_kib, "vcpus": vcpus}
        try:
            out["write requests"] = dom.blockStats("vda")[2]
        except libvirt.libvirtError as e:
            out["block stats error"] = str(e)

        # suspend: the guest does not answer; resume: it does.
        dom.suspend()
        wait_for_state(dom, libvirt.VIR_DOMAIN_PAUSED)
        out["paused state"] = dom.state()[0]
        console.send("echo after''resume\n")
        try:
            console.expect(rb"afterresume", timeout=3.0)
            out["answered while paused"] = True
        except AssertionError:
            out["answered while paused"] = False
        dom.resume()
        wait_for_state(dom, libvirt.VIR_DOMAIN_RUNNING)
        console.expect(rb"afterresume", timeout=60)
        out["steps"].append("suspend-resume")

        # reboot: the ACPI power button; the guest powers off, the emulator stays up
        # (-no-shutdown) and libvirt resets and continues it.
        dom.reboot()
        console.expect(rb"power button pressed", timeout=120)
        console.expect(READY, timeout=300)
        console.expect(PROMPT)
        out["state after reboot"] = dom.state()[0]
        out["steps"].append("reboot")

        # shutdown: QMP system_powerdown, the ACPI power button, the guest powers off.
        dom.shutdown()
        wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF, timeout=180)
        try:
            console.expect(rb"power button pressed", timeout=5)
            out["power button seen"] = True
        except AssertionError:
            out["power button seen"] = False
        out["steps"].append("shutdown")
        console.close()
        console = None

        # destroy a running machine (SIGTERM, then SIGKILL, from libvirt).
        dom.create()
        wait_for_state(dom, libvirt.VIR_DOMAIN_RUNNING)
        dom.destroy()
        wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF, timeout=60)
        out["steps"].append("destroy")
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-2000:]
        if console is not None:
            out["console"] = console.tail()
    finally:
        if console is not None:
            console.close()
        log = daemon.domain_log(name)
        out["log"] = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            out["steps"].append("undefine")
        except libvirt.libvirtError as e:
            out.setdefault("error", f"undefine: {e}")
        out["listed after undefine"] = name in [d.name() for d in conn.listAllDomains()]
    return out


def domcapabilities(conn, emulator: str) -> dict:
    xml = ElementTree.fromstring(conn.getDomainCapabilities(emulator, "x86_64", "microvm",
                                                            "kvm"))
    return {"domain": xml.findtext("domain"), "machine": xml.findtext("machine"),
            "arch": xml.findtext("arch"), "vcpu max": xml.find("vcpu").get("max"),
            "host-passthrough": xml.find("./cpu/mode[@name='host-passthrough']")
            .get("supported")}


def main(argv: list[str]) -> int:
    scratch, kernel, initrd, append, *emulators = argv
    scratch_dir = Path(scratch)
    boot = {"kernel": kernel, "initrd": initrd, "append": append}
    daemon = PrivateLibvirtd(scratch_dir / "lv")
    results: dict = {}
    try:
        daemon.start(timeout=180)
        conn = libvirt.open(daemon.uri)
        for item in emulators:
            name, emulator = item.split("=", 1)
            results[name] = lifecycle(conn, daemon, f"mv-{name}", emulator, boot, scratch_dir)
        first = emulators[0].split("=", 1)[1]
        try:
            results["domcapabilities"] = domcapabilities(conn, first)
        except libvirt.libvirtError as e:
            results["domcapabilities"] = {"error": str(e)}
        conn.close()
    except Exception as e:
        results["error"] = f"{type(e).__name__}: {e}"
        results["traceback"] = traceback.format_exc()[-2000:]
        if daemon.log.exists():
            results["libvirtd log"] = daemon.log.read_text(errors="replace")[-3000:]
    finally:
        daemon.stop()
    print(MARK + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
