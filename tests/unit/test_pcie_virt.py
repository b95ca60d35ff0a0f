"""The virt board's PCI Express: the device tree node against QEMU's, -device *-pci wiring."""

from __future__ import annotations

import subprocess

import pytest
from test_fdt_virt import _dts, _node, fake_kernel

from kemu.backends.serial import SerialBackend
from kemu.devices.pci import config as c
from kemu.errors import ConfigError
from kemu.machines.arm64_virt import PCIE_ECAM, VirtMachine
from kemu.machines.config import DeviceConfig, MachineConfig


def _cells(line: str) -> list[int]:
    return [int(x, 16) for x in line.split("<", 1)[1].rstrip(">;").split()]


def _comparable(lines: list[str], gic_phandle: int, v2m_phandle: int) -> list[str]:
    """The node's lines, the GIC's and the GICv2m frame's phandles made symbolic."""
    out = []
    for line in lines:
        if line.startswith("msi-map ="):
            cells = _cells(line)
            assert cells[1] == v2m_phandle
            line = f"msi-map = {[cells[0], -2, *cells[2:]]}"
        if line.startswith("interrupt-map ="):
            cells = _cells(line)
            assert len(cells) % 10 == 0
            for i in range(4, len(cells), 10):
                assert cells[i] == gic_phandle
                cells[i] = -1
            line = f"interrupt-map = {cells}"
        out.append(line)
    return out


def _phandle(dts: str, node: str) -> int:
    for line in _node(dts, node):
        if line.startswith("phandle = "):
            return _cells(line)[0]
    raise AssertionError(f"{node} has no phandle")


def _v2m(dts: str) -> list[str]:
    start = dts.index("\t\tv2m@8020000 {")
    return sorted(line.strip() for line in dts[start:dts.index("\n\t\t};", start)].splitlines())


def test_pcie_and_gicv2m_nodes_are_qemus(tmp_path, need):
    dtc = need("dtc")
    qemu = need("qemu-system-aarch64")
    subprocess.run([qemu, "-M", f"virt,dumpdtb={tmp_path / 'qemu.dtb'}", "-cpu", "cortex-a57",
                    "-m", "1024", "-nographic"], capture_output=True, check=True)
    cfg = MachineConfig(kernel=fake_kernel(tmp_path / "Image"), memory=1024 << 20,
                        cpu="cortex-a57")
    (tmp_path / "kemu.dtb").write_bytes(
        VirtMachine(cfg, SerialBackend(lambda b: None)).device_tree())
    kemu, qemu_dts = _dts(dtc, tmp_path / "kemu.dtb"), _dts(dtc, tmp_path / "qemu.dtb")
    name = "pcie@10000000"
    def v2m_phandle(dts):
        return next(_cells(line)[0] for line in _v2m(dts) if line.startswith("phandle"))

    assert _comparable(_node(kemu, name), _phandle(kemu, "intc@8000000"), v2m_phandle(kemu)) == \
        _comparable(_node(qemu_dts, name), _phandle(qemu_dts, "intc@8000000"),
                    v2m_phandle(qemu_dts))
    assert [line for line in _v2m(kemu) if "phandle" not in line] == \
        [line for line in _v2m(qemu_dts) if "phandle" not in line]
    gic = [line for line in _node(kemu, "intc@8000000") if "-cells" in line]
    assert "#address-cells = <0x02>;" in gic


def _machine(tmp_path, devices, drives=()):
    cfg = MachineConfig(kernel=fake_kernel(tmp_path / "Image"), memory=256 << 20,
                        devices=[DeviceConfig(d, p) for d, p in devices], drives=list(drives))
    return VirtMachine(cfg, SerialBackend(lambda b: None))


def _ecam_read(machine, device, reg, size=4):
    return machine.mmio.read(PCIE_ECAM[0] + (device << 15) + reg, size)


def test_pci_devices_are_on_pcie0_at_their_addresses(tmp_path):
    m = _machine(tmp_path, [("virtio-rng-pci", {"addr": "0x5"}), ("virtio-rng", {}),
                            ("virtio-rng-device", {}),
                            ("vhost-vsock-pci", {"guest-cid": "3", "bus": "pcie.0",
                                                 "addr": "a.0", "disable-legacy": "on"})])
    try:
        ids = {d: _ecam_read(m, d, 0) for d in range(32) if _ecam_read(m, d, 0) != 0xFFFFFFFF}
        assert ids == {0: 0x0008_1B36, 1: 0x1044_1AF4, 5: 0x1044_1AF4, 10: 0x1053_1AF4}
        assert _ecam_read(m, 5, c.INTERRUPT_PIN, 1) == 1
        # The -device virtio-rng-device stays on virtio-mmio (with the power button).
        assert len(m.virtio_slots) == 2
    finally:
        m.close()


@pytest.mark.parametrize("props, message", [
    ({"bus": "pcie.1"}, "Bus 'pcie.1' not found"),
    ({"addr": "0"}, "in use by gpex-root"),
    ({"addr": "20"}, "slot 0-1f"),
    ({"addr": "x"}, "expected SLOT"),
    ({"addr": "3.1"}, "function 0 only"),
    ({"disable-legacy": "off"}, "modern only"),
    ({"disable-modern": "on"}, "no legacy"),
])
def test_bad_pci_placement_is_one_line(tmp_path, props, message):
    with pytest.raises(ConfigError, match=message):
        _machine(tmp_path, [("virtio-rng-pci", props)])


def test_two_devices_in_one_slot_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="slot 3 function 0 not available"):
        _machine(tmp_path, [("virtio-rng-pci", {"addr": "3"}), ("virtio-rng-pci", {"addr": "3"})])


def test_pci_functions_are_part_of_the_state_fingerprint(tmp_path):
    """A saved state names the PCI functions it holds (devfn, vendor and device ID):
    another arrangement is refused at restore; a machine without PCI devices keeps
    the fingerprint it had (its older snapshots still load)."""
    m = _machine(tmp_path, [("virtio-rng-pci", {"addr": "3"})])
    try:
        assert m.state_fingerprint()["pci"] == [[0, 0x0008_1B36], [3 << 3, 0x1044_1AF4]]
    finally:
        m.close()
    m = _machine(tmp_path, [])
    try:
        assert "pci" not in m.state_fingerprint()
    finally:
        m.close()


def test_gicv3_board_has_pcie_with_intx_only(tmp_path, need):
    dtc = need("dtc")
    cfg = MachineConfig(kernel=fake_kernel(tmp_path / "Image"), memory=256 << 20,
                        gic_version=3)
    m = VirtMachine(cfg, SerialBackend(lambda b: None))
    (tmp_path / "v3.dtb").write_bytes(m.device_tree())
    lines = _node(_dts(dtc, tmp_path / "v3.dtb"), "pcie@10000000")
    assert 'compatible = "pci-host-ecam-generic";' in lines
    assert not any(line.startswith("msi-map") for line in lines)
    assert not hasattr(m, "v2m")
    m.close()
