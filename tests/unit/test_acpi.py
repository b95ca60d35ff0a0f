"""The microvm's ACPI tables: checksums, layout, and (with acpica-tools) iasl's reading."""

import shutil
import struct
import subprocess

import pytest

from kemu.boot import acpi
from kemu.devices.acpi_sleep import AcpiSleep

BASE = 0xE0000


PCIE = acpi.PcieHost(ecam_base=0xE0000000, last_bus=255, mmio_base=0xC0000000,
                     mmio_size=0x10000000, intx_gsis=(20, 21, 22, 23))


def tables(nr_cpus=2, virtio=2, pcie=None):
    cfg = acpi.AcpiConfig(nr_cpus=nr_cpus, sleep_control_port=0x600, sleep_status_port=0x601,
                          ged=(0x608, 12), pcie=pcie, virtio=[acpi.MmioDevice(0xD0000000 + 0x200 * i, 0x200, 5 + i)
                                  for i in range(virtio)])
    rsdp, blob = acpi.build_tables(BASE, cfg)
    return rsdp, blob


def get(blob, addr):
    off = addr - BASE
    length = struct.unpack_from("<I", blob, off + 4)[0]
    return blob[off:off + length]


def walk(blob):
    x = get(blob, struct.unpack_from("<Q", blob, 24)[0])
    out = {b"XSDT": x}
    for addr in struct.unpack_from(f"<{(len(x) - 36) // 8}Q", x, 36):
        t = get(blob, addr)
        out[t[:4]] = t
    out[b"DSDT"] = get(blob, struct.unpack_from("<Q", out[b"FACP"], 140)[0])
    return out


def test_rsdp_and_checksums():
    rsdp, blob = tables()
    assert rsdp == BASE and blob[:8] == b"RSD PTR " and blob[15] == 2
    assert sum(blob[:20]) & 0xFF == 0 and sum(blob[:36]) & 0xFF == 0
    found = walk(blob)
    assert set(found) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    for t in found.values():
        assert sum(t) & 0xFF == 0


def test_fadt_is_hardware_reduced_with_reset_and_sleep_registers():
    fadt = walk(tables()[1])[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & acpi.FADT_F_HW_REDUCED_ACPI and flags & acpi.FADT_F_RESET_REG_SUP
    assert struct.unpack_from("<H", fadt, 109)[0] & acpi.IAPC_8042
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0x64) and fadt[128] == 0xFE
    assert struct.unpack_from("<BBBBQ", fadt, 244)[4] == 0x600
    assert struct.unpack_from("<BBBBQ", fadt, 256)[4] == 0x601


def test_madt_lists_each_cpu():
    madt = walk(tables(nr_cpus=5)[1])[b"APIC"]
    off, cpus = 44, []
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        if kind == 0:
            cpus.append(madt[off + 3])
        elif kind == 1:
            assert struct.unpack_from("<I", madt, off + 4)[0] == 0xFEC00000
        off += length
    assert cpus == [0, 1, 2, 3, 4]


def test_pkg_length_encodings():
    assert acpi.pkg_length(10) == bytes([11])
    two = acpi.pkg_length(100)
    assert len(two) == 2 and (two[0] >> 6) == 1
    assert ((two[1] << 4) | (two[0] & 0xF)) == 102


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_the_dsdt(tmp_path):
    dsdt = walk(tables(virtio=20)[1])[b"DSDT"]
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    proc = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "dsdt.dsl").read_text()
    assert text.count('"LNRO0005"') == 20 and "PNP0501" in text and "Name (_S5, Package" in text
    assert "0xD0002600" in text                 # slot 19: a two-byte PkgLength scope
    # The power button: a GED whose _EVT reads the selector and notifies PNP0C0C.
    assert '"ACPI0013"' in text and '"PNP0C0C"' in text
    assert "OperationRegion (EREG, SystemIO, 0x00000608, 0x04)" in text
    assert "Method (_EVT, 1, Serialized)" in text and "Local0 = ESEL" in text
    assert "Notify (\\_SB.PWRB, 0x80)" in text


def test_ged_selector_reads_and_clears_the_power_button():
    from kemu.devices.acpi_ged import AcpiGed
    from kemu.devices.base import IrqLine
    irq = IrqLine()
    ged = AcpiGed(irq)
    assert ged.read(0, 4) == 0 and not irq.level
    ged.press_power_button()
    assert irq.level                            # level-triggered until _EVT reads it
    assert ged.read(0, 4) == acpi.GED_EVENT_POWER_BUTTON
    assert not irq.level and ged.read(0, 4) == 0
    ged.write(0, 4, 0xFFFFFFFF)                 # read-only
    assert ged.read(0, 4) == 0


def test_sleep_registers_power_off_on_s5_only():
    calls = []
    dev = AcpiSleep(lambda: calls.append("off"))
    dev.write(0, 1, (3 << 2) | 0x20)             # S3: not supported, "woken" at once
    assert calls == [] and dev.read(1, 1) == 0x80
    dev.write(1, 1, 0x80)
    assert dev.read(1, 1) == 0
    dev.write(0, 1, 5 << 2)                      # no SLP_EN
    assert calls == []
    dev.write(0, 1, (5 << 2) | 0x20)
    assert calls == ["off"]


def test_pcie_adds_mcfg_and_allows_msi():
    plain = walk(tables()[1])
    assert struct.unpack_from("<H", plain[b"FACP"], 109)[0] & acpi.IAPC_MSI_NOT_SUPPORTED
    found = walk(tables(pcie=PCIE)[1])
    assert set(found) == {b"XSDT", b"FACP", b"APIC", b"DSDT", b"MCFG"}
    assert not struct.unpack_from("<H", found[b"FACP"], 109)[0] & acpi.IAPC_MSI_NOT_SUPPORTED
    mcfg = found[b"MCFG"]
    assert len(mcfg) == 60 and sum(mcfg) & 0xFF == 0
    assert struct.unpack_from("<QHBB", mcfg, 44) == (0xE0000000, 0, 0, 255)


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_reads_the_pci_root_bridge_and_mcfg(tmp_path):
    found = walk(tables(pcie=PCIE)[1])
    for sig, name in ((b"DSDT", "dsdt"), (b"MCFG", "mcfg")):
        (tmp_path / f"{name}.dat").write_bytes(found[sig])
        proc = subprocess.run(["iasl", "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "dsdt.dsl").read_text()
    assert 'Name (_HID, "PNP0A08"' in text and 'Name (_CID, "PNP0A03"' in text
    assert "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode," in text
    assert "0xC0000000" in text and "0xCFFFFFFF" in text and "0x10000000" in text
    # _PRT: 32 devices x 4 pins; device 1 pin A (0) is swizzled to the second GSI.
    assert text.count("0x0001FFFF") == 4
    # The ECAM reserved as a motherboard resource, as Linux wants before using it.
    res0 = text[text.index("Device (RES0)"):]
    assert '"PNP0C02"' in res0[:200] and "0xE0000000" in res0 and "0x10000000" in res0
    prt = text[text.index("Name (_PRT"):]
    first = prt.index("0x0001FFFF")
    assert "0x15" in prt[first:first + 120]            # GSI 21
    mcfg = (tmp_path / "mcfg.dsl").read_text()
    assert "Base Address : 00000000E0000000" in mcfg and "End Bus Number : FF" in mcfg


@pytest.mark.parametrize("value,expected", [("on", True), ("off", False), ("auto", False)])
def test_microvm_pcie_option(value, expected):
    from kemu.machines.config import MachineConfig
    from kemu.options.argv import parse_qemu_options
    config = parse_qemu_options(["-M", f"microvm,pcie={value}"], MachineConfig())
    assert config.machine == "microvm" and bool(config.extra.get("pcie")) is expected


def test_microvm_pcie_option_refuses_other_values():
    from kemu.errors import ConfigError
    from kemu.machines.config import MachineConfig
    from kemu.options.argv import parse_qemu_options
    with pytest.raises(ConfigError, match="pcie=maybe: invalid value"):
        parse_qemu_options(["-M", "microvm,pcie=maybe"], MachineConfig())
