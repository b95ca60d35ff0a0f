"""PCI Express on the virt board: config space, the ECAM host bridge, INTx.

:mod:`.config` is one function's configuration space (a type 0 header,
BARs, the capability list) as a state machine over register accesses;
:mod:`.host` is the generic ECAM host bridge (QEMU's ``gpex``,
``pci-host-ecam-generic`` in the device tree) that routes configuration
accesses to functions, maps their BARs into the board's MMIO bus while
decoding is enabled, and swizzles their INTx pins onto the board's four
interrupt lines.
"""
