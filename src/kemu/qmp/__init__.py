"""QMP, QEMU's machine protocol (docs/interop/qmp-spec): core, commands, server."""
