"""libvirt manages kemu (issue 13): the same domain XML with ``<emulator>`` = kemu
and = qemu-system-aarch64, through virsh and the libvirt Python binding.

A private libvirtd (kemu.testing.libvirtd) runs for the module.  Each domain
boots the default aarch64 guest by direct kernel boot with a virtio-mmio disk,
user networking and a pty serial console, and goes through define, start,
console, dominfo, domblklist, domblkinfo, domstats, suspend, resume, reset,
reboot, shutdown, start, destroy and undefine; the checks read the guest's
console through the pty and the disk's bytes on the host.  What the guest
sees of its hardware is compared between the two emulators.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

import pytest

from kemu.testing.libvirtd import PrivateLibvirtd, missing_tools, wait_for_state
from kemu.testing.pty_console import PtyConsole

libvirt = pytest.importorskip("libvirt", reason="the libvirt Python binding is not installed "
                              "(scripts/bootstrap.sh --test installs it)")

KEMU = str(Path(sys.executable).parent / "kemu")
QEMU = shutil.which("qemu-system-aarch64")
READY = rb"kemu guest ready"
PROMPT = rb"# "
MAC = "52:54:00:12:34:56"

DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='aarch64' machine='virt'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{append}</cmdline>
  </os>
  <cpu mode='custom' match='exact'><model>cortex-a57</model></cpu>
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
    <interface type='user'>
      <mac address='{mac}'/>
      <model type='virtio'/>
      <address type='virtio-mmio'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    why = missing_tools()
    if why:
        pytest.skip(why)
    # A short scratch path: libvirt puts UNIX socket paths (108 bytes at most) under it.
    scratch = Path(tmp_path_factory.mktemp("lv"))
    d = PrivateLibvirtd(scratch)
    try:
        d.start()
    except RuntimeError as e:
        pytest.skip(f"cannot run a private libvirtd here: {e}")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def conn(daemon):
    c = libvirt.open(daemon.uri)
    yield c
    c.close()


def console_of(dom) -> PtyConsole:
    xml = ElementTree.fromstring(dom.XMLDesc())
    return PtyConsole(xml.find("./devices/console").get("tty"))


def virsh(daemon, *args: str) -> str:
    proc = daemon.virsh(*args)
    assert proc.returncode == 0, f"virsh {' '.join(args)}: {proc.stderr.strip()}"
    return proc.stdout


def hardware(console: PtyConsole) -> dict:
    """What the guest sees of its machine."""
    return {
        "cpus": console.run("grep -c ^processor /proc/cpuinfo").strip(),
        "cpu part": console.run("grep -m1 'CPU part' /proc/cpuinfo").strip(),
        "virtio": console.run("cat /sys/bus/virtio/devices/*/device | sort | tr '\\n' ' '")
        .strip(),
        "disk sectors": console.run("cat /sys/block/vda/size").strip(),
        "mac": console.run("cat /sys/class/net/eth0/address").strip(),
        "serial": console.run("cat /sys/class/tty/ttyAMA0/type").strip(),
    }


SEEN: dict[str, dict] = {}
#: virtio-input (device id 18, 0x0012 in sysfs): kemu's virt board has its power button there; QEMU's
#: virt has it on a PL061 GPIO line.
POWER_BUTTON = "0x0012"

EMULATORS = [pytest.param("kemu", id="kemu"),
             pytest.param("qemu", id="qemu-system-aarch64",
                          marks=pytest.mark.skipif(QEMU is None,
                                                   reason="qemu-system-aarch64 is not installed"))]


@pytest.mark.parametrize("which", EMULATORS)
def test_domain_lifecycle(which, daemon, conn, guest, tmp_path):
    emulator = KEMU if which == "kemu" else QEMU
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (16 << 20))
    name = f"lv-{which}"
    xml = DOMAIN_XML.format(name=name, kernel=guest.kernel, initrd=guest.initrd,
                            append=guest.append, emulator=emulator, disk=disk, mac=MAC)
    dom = conn.defineXML(xml)
    try:
        dom.create()
        console = console_of(dom)
        console.expect(READY)
        console.expect(PROMPT)
        SEEN[which] = hardware(console)

        # The disk: a write in the guest reaches the image on the host.
        console.run(f"printf kemu-libvirt-{which} | dd of=/dev/vda conv=fsync 2>/dev/null")
        assert disk.read_bytes()[:32].startswith(f"kemu-libvirt-{which}".encode())

        info = virsh(daemon, "dominfo", name)
        assert re.search(r"State:\s+running", info) and re.search(r"CPU\(s\):\s+1", info)
        assert re.search(r"Max memory:\s+262144 KiB", info)
        assert re.search(rf"vda\s+{re.escape(str(disk))}", virsh(daemon, "domblklist", name))
        stats = virsh(daemon, "domstats", name)
        assert f"block.0.path={disk}" in stats and "block.0.capacity=16777216" in stats
        if which == "kemu":
            assert int(re.search(r"block\.0\.wr\.reqs=(\d+)", stats).group(1)) >= 1
            assert int(re.search(r"block\.0\.rd\.bytes=(\d+)", stats).group(1)) > 0
        try:
            capacity, _allocation, physical = dom.blockInfo("vda")
            assert capacity == physical == 16 << 20
        except libvirt.libvirtError as e:
            # libvirt 9.0 looks for a virtio disk's statistics under
            # /machine/peripheral/ID/virtio-backend, where QEMU's virtio-mmio has none.
            assert which == "qemu" and "cannot find statistics" in str(e), e

        # suspend / resume: the guest stops answering, then answers again.
        dom.suspend()
        wait_for_state(dom, libvirt.VIR_DOMAIN_PAUSED)
        console.send("echo after''resume\n")
        with pytest.raises(AssertionError):
            console.expect(rb"after" + rb"resume", timeout=1.0)
        dom.resume()
        wait_for_state(dom, libvirt.VIR_DOMAIN_RUNNING)
        console.expect(rb"afterresume", timeout=30)

        # reset (system_reset): the guest boots again.
        dom.reset()
        console.expect(READY)
        console.expect(PROMPT)

        if POWER_BUTTON in SEEN[which]["virtio"].split():
            # reboot: the power button, then libvirt's system_reset and cont
            # (-no-shutdown kept the emulator up); shutdown: the power button,
            # then libvirt ends the emulator.
            dom.reboot()
            console.expect(rb"powering off")
            console.expect(READY)
            console.expect(PROMPT)
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            dom.shutdown()
            wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF)
        else:
            # QEMU's virt has its power button on a PL061 GPIO line; the default
            # guest loads no driver for it, so it cannot be asked to power off.
            assert which == "qemu"
            dom.destroy()
        console.close()

        # destroy a booting machine: SIGTERM (then SIGKILL) from libvirt.
        dom.create()
        wait_for_state(dom, libvirt.VIR_DOMAIN_RUNNING)
        dom.destroy()
        wait_for_state(dom, libvirt.VIR_DOMAIN_SHUTOFF, timeout=30)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    assert name not in [d.name() for d in conn.listAllDomains()]


def test_the_guest_sees_the_same_hardware_under_kemu_and_qemu():
    if "qemu" not in SEEN or "kemu" not in SEEN:
        pytest.skip("needs both lifecycle runs")
    kemu, qemu = dict(SEEN["kemu"]), dict(SEEN["qemu"])
    # The one difference by design: kemu's power button is a virtio-input device.
    kemu_virtio = kemu.pop("virtio").split()
    kemu_virtio.remove(POWER_BUTTON)
    assert kemu_virtio == qemu.pop("virtio").split()
    assert kemu == qemu


def test_domcapabilities_show_kemu_as_it_is(daemon):
    from kemu.accel.tcg.aarch64 import CPU_MODELS
    xml = ElementTree.fromstring(virsh(daemon, "domcapabilities", "--emulatorbin", KEMU,
                                       "--arch", "aarch64", "--machine", "virt",
                                       "--virttype", "qemu"))
    assert xml.findtext("machine") == "virt-7.2"
    assert xml.find("vcpu").get("max") == "123"        # with GICv3
    models = [m.text for m in xml.findall("./cpu/mode[@name='custom']/model")]
    assert sorted(models) == sorted(CPU_MODELS)
    assert [v.text for v in xml.findall("./features/gic/enum/value")] == ["2", "3"]
    assert xml.find("./devices/tpm").get("supported") == "no"
    assert xml.find("./iothreads").get("supported") == "no"


BAD_OBJECT = """\
  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
    <qemu:arg value='-object'/>
    <qemu:arg value='frobnicator,id=x0'/>
  </qemu:commandline>
</domain>
"""


@pytest.mark.parametrize("which", EMULATORS)
def test_an_emulator_error_is_one_line_libvirt_shows(which, daemon, conn, guest, tmp_path):
    """The emulator's one line (an unknown -object type) reaches libvirt's user; kemu's
    line is QEMU's, after the program name."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    xml = DOMAIN_XML.format(name=f"lv-bad-{which}", kernel=guest.kernel, initrd=guest.initrd,
                            append=guest.append, emulator=KEMU if which == "kemu" else QEMU,
                            disk=disk, mac=MAC).replace("</domain>\n", BAD_OBJECT)
    dom = conn.defineXML(xml)
    try:
        with pytest.raises(libvirt.libvirtError) as e:
            dom.create()
        line = re.search(r"(kemu|qemu-system-aarch64): (-object frobnicator,id=x0: .*)",
                         str(e.value))
        assert line, str(e.value)
        assert line.group(2).strip() == ("-object frobnicator,id=x0: Parameter 'qom-type' "
                                         "does not accept value 'frobnicator'")
    finally:
        dom.undefine()


@contextmanager
def booted(conn, guest, name: str, which: str, disk: Path, edit=lambda xml: xml):
    """A domain defined from DOMAIN_XML (after ``edit``), started, its guest at the shell
    prompt: yields (domain, console); destroys and undefines it after."""
    xml = edit(DOMAIN_XML.format(name=name, kernel=guest.kernel, initrd=guest.initrd,
                                 append=guest.append, emulator=KEMU if which == "kemu" else QEMU,
                                 disk=disk, mac=MAC))
    dom = conn.defineXML(xml)
    try:
        dom.create()
        console = console_of(dom)
        console.expect(READY)
        console.expect(PROMPT)
        yield dom, console
    finally:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        if dom.hasManagedSaveImage():
            dom.managedSaveRemove()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


@pytest.mark.parametrize("which", EMULATORS)
def test_save_restore_and_managedsave(which, daemon, conn, guest, tmp_path):
    """virsh save / restore, then managedsave / start: libvirt migrates the machine into a
    file (migrate fd:, after getfd) and starts a new emulator with -incoming defer; the
    restored guest's console answers with its state kept (a shell variable)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (16 << 20))
    name = f"lv-save-{which}"
    saved = tmp_path / "dom.save"
    with booted(conn, guest, name, which, disk) as (dom, console):
        console.run("export KEPT=before''save")
        console.close()

        virsh(daemon, "save", name, str(saved))
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        assert saved.stat().st_size > 0
        virsh(daemon, "restore", str(saved))
        dom = conn.lookupByName(name)
        wait_for_state(dom, libvirt.VIR_DOMAIN_RUNNING)
        console = console_of(dom)
        assert console.run("echo $KEPT").strip() == "beforesave"
        console.run("export KEPT=before''managedsave")
        console.close()

        virsh(daemon, "managedsave", name)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        assert dom.hasManagedSaveImage()
        virsh(daemon, "start", name)
        wait_for_state(dom, libvirt.VIR_DOMAIN_RUNNING)
        assert not dom.hasManagedSaveImage()
        console = console_of(dom)
        assert console.run("echo $KEPT").strip() == "beforemanagedsave"
        console.close()


#: Linux's virtio-input driver needs VIRTIO_F_VERSION_1, which QEMU's virt offers on
#: virtio-mmio only with force-legacy=off.
KEYBOARD = """\
    <input type='keyboard' bus='virtio'><address type='virtio-mmio'/></input>
  </devices>
  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
    <qemu:arg value='-global'/>
    <qemu:arg value='virtio-mmio.force-legacy=off'/>
  </qemu:commandline>"""


@pytest.mark.parametrize("which", EMULATORS)
def test_send_key_reaches_the_virtio_keyboard(which, daemon, conn, guest, tmp_path):
    """virsh send-key DOM KEY_A (libvirt: QMP send-key with XT numbers): the guest's
    evdev node of the virtio keyboard reads a press and a release of KEY_A (30)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    name = f"lv-key-{which}"
    with booted(conn, guest, name, which, disk,
                lambda xml: xml.replace("  </devices>", KEYBOARD)) as (_dom, console):
        node = console.run("for d in /sys/class/input/event*; do grep -qi keyboard "
                           "$d/device/name && basename $d; done; true").split()
        assert len(node) == 1, node
        # The node is open (events queue for it) before send-key.
        console.run(f"exec 3</dev/input/{node[0]}")
        # aarch64 struct input_event: 16 bytes of time, then type, code (u16), value (s32).
        console.run("(dd bs=24 count=4 <&3 2>/dev/null | od -An -v -tu2 -w24 > /tmp/keys; "
                    "echo keys''done) & true")
        virsh(daemon, "send-key", name, "KEY_A")
        console.expect(rb"keysdone", timeout=30)
        events = [tuple(int(x) for x in line.split()[8:11])
                  for line in console.run("cat /tmp/keys").splitlines() if line.strip()]
        assert [e for e in events if e[0] == 1] == [(1, 30, 1), (1, 30, 0)], events
        console.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("which", EMULATORS)
def test_blockresize_grows_the_disk_the_guest_sees(which, fmt, daemon, conn, guest, tmp_path):
    """virsh blockresize (QMP block_resize): the image grows on the host, the virtio-blk
    capacity with it (a config-change interrupt), and the guest reads the new size in
    /sys/block/vda/size and writes past the old end."""
    from kemu.img import image_info, main as kemu_img
    disk = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        disk.write_bytes(b"\0" * (16 << 20))
    else:
        assert kemu_img(["create", "-f", "qcow2", str(disk), "16M"]) == 0
    name = f"lv-resize-{which}-{fmt}"
    with booted(conn, guest, name, which, disk,
                lambda xml: xml.replace("type='raw'", f"type='{fmt}'")) as (dom, console):
        assert console.run("cat /sys/block/vda/size").strip() == str(16 << 11)
        virsh(daemon, "blockresize", name, "vda", "32M")
        assert image_info(disk, fmt, force_share=True)["virtual-size"] == 32 << 20
        # The guest learns of it from the config-change interrupt: poll its view.
        seen = console.run("for i in $(seq 200); do [ $(cat /sys/block/vda/size) = "
                           f"{32 << 11} ] && break; sleep 0.05; done; "
                           "cat /sys/block/vda/size").strip()
        assert seen == str(32 << 11)
        console.run("printf past-the-old-end | dd of=/dev/vda bs=1M seek=24 conv=fsync "
                    "2>/dev/null")
        dom.destroy()
        if fmt == "raw":
            assert disk.read_bytes()[24 << 20:(24 << 20) + 16] == b"past-the-old-end"
        console.close()


def elf_core(path: Path) -> tuple[list[tuple[str, int, int]], list[tuple[str, int]]]:
    """(type, physical address, file size) of each program header and (owner, size) of each
    NT_PRSTATUS note, as binutils' readelf reads the core."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run(["readelf", "-W", "-l", "-n", str(path)], capture_output=True,
                         text=True, check=True).stdout
    headers = [(m.group(1), int(m.group(2), 16), int(m.group(3), 16)) for m in re.finditer(
        r"^\s+(LOAD|NOTE)\s+0x[0-9a-f]+ 0x[0-9a-f]+ (0x[0-9a-f]+) (0x[0-9a-f]+)", out, re.M)]
    notes = [(m.group(1), int(m.group(2), 16)) for m in re.finditer(
        r"^\s+(\S+)\s+(0x[0-9a-f]+)\s+NT_PRSTATUS", out, re.M)]
    return headers, notes


@pytest.mark.parametrize("which", EMULATORS)
def test_dump_memory_only_is_an_elf_core_of_guest_ram(which, daemon, conn, guest, tmp_path):
    """virsh dump --memory-only (getfd, dump-guest-memory paging=false protocol=fd:
    detach=true, DUMP_COMPLETED): an ELF core with RAM's PT_LOAD at its physical address
    and a prstatus note per vCPU; the guest goes on running."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    name = f"lv-dump-{which}"
    core = tmp_path / "core.elf"
    with booted(conn, guest, name, which, disk,
                lambda xml: xml.replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>")) as (_dom, console):
        virsh(daemon, "dump", "--memory-only", name, str(core))
        headers, notes = elf_core(core)
        assert headers == [("NOTE", 0, headers[0][2]), ("LOAD", 0x40000000, 256 << 20)]
        assert notes == [("CORE", 0x188), ("CORE", 0x188)]            # aarch64 prstatus
        assert b"Linux version" in core.read_bytes()
        assert console.run("echo still''running").strip() == "stillrunning"
        console.close()


@pytest.mark.parametrize("which", EMULATORS)
def test_internal_snapshot_create_revert_delete(which, daemon, conn, guest, tmp_path):
    """virsh snapshot-create-as / snapshot-revert / snapshot-delete on a running domain
    with a qcow2 disk (libvirt: HMP savevm "NAME", loadvm, delvm): the reverted guest
    has the shell state it had at the snapshot; qemu-img lists the snapshot meanwhile."""
    from kemu.img import main as kemu_img
    disk = tmp_path / "disk.qcow2"
    assert kemu_img(["create", "-f", "qcow2", str(disk), "16M"]) == 0
    name = f"lv-snap-{which}"
    with booted(conn, guest, name, which, disk,
                lambda xml: xml.replace("type='raw'", "type='qcow2'")) as (dom, console):
        console.run("export KEPT=at''snapshot")
        virsh(daemon, "snapshot-create-as", name, "s1")
        listed = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(disk)],
                                capture_output=True, text=True).stdout
        assert " s1 " in listed, listed
        console.run("export KEPT=after''snapshot")
        console.close()
        virsh(daemon, "snapshot-revert", name, "s1")
        wait_for_state(dom, libvirt.VIR_DOMAIN_RUNNING)
        console = console_of(dom)          # (libvirt may have started a new emulator)
        assert console.run("echo $KEPT").strip().splitlines()[-1] == "atsnapshot"
        assert "s1" in virsh(daemon, "snapshot-list", name, "--name")
        virsh(daemon, "snapshot-delete", name, "s1")
        listed = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(disk)],
                                capture_output=True, text=True).stdout
        assert listed == "", listed
        console.close()
