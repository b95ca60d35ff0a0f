"""QMP commands over the Python API (kemu.api.Machine): one table, one place."""

from __future__ import annotations

import logging
import threading
import time
from importlib.metadata import version as package_version
from typing import Any, Callable

from kemu.errors import KemuError
from kemu.qmp import introspect
from kemu.qmp.protocol import QmpError

log = logging.getLogger(__name__)

#: The QEMU version kemu's QMP dialect follows (commands and events as in 7.2).
QEMU_VERSION = (7, 2, 0)


def package() -> str:
    try:
        return f"kemu {package_version('kemu')}"
    except Exception:  # pragma: no cover - not installed
        return "kemu"


def _expect_args(args: dict, spec: dict[str, type] | None) -> None:
    """Check arguments against a command's spec (None: kemu.options checks them)."""
    if spec is None:
        return
    for key, value in args.items():
        if key not in spec:
            raise QmpError(f"Parameter '{key}' is unexpected")
        if not isinstance(value, spec[key]) or (spec[key] is int and isinstance(value, bool)):
            kind = {str: "string", int: "int", bool: "boolean"}.get(spec[key], "value")
            raise QmpError(f"Invalid parameter type for '{key}', expected: {kind}")


class Commands:
    """The command table for one machine."""

    def __init__(self, vm, on_quit: Callable[[], None] | None = None) -> None:
        self.vm = vm
        self.on_quit = on_quit or vm.stop
        self._hmp = None
        #: Descriptors that came over the socket (SCM_RIGHTS), for the next getfd.
        self._received_fds: list[int] = []
        self._fd_lock = threading.Lock()
        #: The last (or current) dump-guest-memory, as query-dump reports it.
        self._dump: dict = {}
        self.table: dict[str, tuple[Callable[[dict], Any], dict[str, type]]] = {
            "query-version": (self.query_version, {}),
            "query-status": (self.query_status, {}),
            "query-commands": (self.query_commands, {}),
            "query-name": (self.query_name, {}),
            "query-cpus-fast": (self.query_cpus_fast, {}),
            "query-block": (self.query_block, {}),
            "stop": (self.stop, {}),
            "cont": (self.cont, {}),
            "system_reset": (self.system_reset, {}),
            "system_powerdown": (self.system_powerdown, {}),
            "quit": (self.quit, {}),
            "human-monitor-command": (self.hmp, {"command-line": str, "cpu-index": int}),
            # migration (kemu.migration)
            "migrate": (self.migrate, {"uri": str, "blk": bool, "inc": bool, "detach": bool,
                                       "resume": bool}),
            "migrate-incoming": (self.migrate_incoming, {"uri": str}),
            "migrate_cancel": (self.migrate_cancel, {}),
            "query-migrate": (self.query_migrate, {}),
            "migrate-set-capabilities": (self.migrate_set_capabilities,
                                         {"capabilities": list}),
            "query-migrate-capabilities": (self.query_migrate_capabilities, {}),
            "migrate-set-parameters": (self.migrate_set_parameters,
                                       {"downtime-limit": int, "max-bandwidth": int}),
            "query-migrate-parameters": (self.query_migrate_parameters, {}),
            "getfd": (self.getfd, {"fdname": str}),
            "closefd": (self.closefd, {"fdname": str}),
            "send-key": (self.send_key, {"keys": list, "hold-time": int}),
            "dump-guest-memory": (self.dump_guest_memory,
                                  {"paging": bool, "protocol": str, "detach": bool,
                                   "begin": int, "length": int, "format": str}),
            "query-dump": (self.query_dump, {}),
            "block_resize": (self.block_resize, {"device": str, "node-name": str, "size": int}),
        }
        self.table.update(self._introspection())
        self.table.update(self._parts())
        from kemu.qmp.jobs import snapshot_commands
        self.table.update(snapshot_commands(vm))
        from kemu.qmp.display import display_commands
        self.table.update(display_commands(vm))

    def _introspection(self) -> dict:
        """What kemu is and can do (kemu.qmp.introspect), for management tools' probes."""
        from kemu.qmp import introspect as i
        config = self.vm.config
        return {
            "query-qmp-schema": (lambda a: i.qmp_schema(self.table), {}),
            "query-target": (lambda a: {"arch": i.target(config)}, {}),
            # kemu's aarch64 board runs on TCG; microvm on KVM: KVM is present in the
            # x86-64 emulator, enabled when this machine runs on it.
            "query-kvm": (lambda a: {"enabled": config.accel == "kvm",
                                     "present": "kvm" in i.accelerators(config)}, {}),
            "query-machines": (lambda a: i.query_machines(config), {"compat-props": bool}),
            "query-cpu-definitions": (lambda a: i.query_cpu_definitions(config), {}),
            "qom-list-types": (lambda a: [t for t in i.qom_types(config)
                                          if _type_matches(t, a)],
                               {"implements": str, "abstract": bool}),
            "device-list-properties": (lambda a: i.device_list_properties(
                _required(a, "typename")), {"typename": str}),
            "qom-list-properties": (lambda a: i.qom_list_properties(
                config, _required(a, "typename")), {"typename": str}),
            "query-command-line-options": (lambda a: i.command_line_options(a.get("option")),
                                           {"option": str}),
            "query-gic-capabilities": (lambda a: [{"version": v, "emulated": True,
                                                   "kernel": False} for v in (2, 3)]
                                       if i.target(config) == "aarch64" else [], {}),
            "query-tpm-models": (lambda a: [], {}),
            "query-tpm-types": (lambda a: [], {}),
            "query-iothreads": (lambda a: [], {}),
        }

    def _parts(self) -> dict:
        """The machine's chardevs, disks, block nodes, peripherals (kemu.qmp.machine_info)."""
        from kemu.qmp import machine_info as m
        config = self.vm.config
        return {
            "query-chardev": (lambda a: m.query_chardev(config), {}),
            "query-named-block-nodes": (lambda a: m.query_named_block_nodes(config),
                                        {"flat": bool}),
            "query-blockstats": (lambda a: m.query_blockstats(self.vm), {"query-nodes": bool}),
            "qom-list": (lambda a: m.qom_list(config, _required(a, "path")), {"path": str}),
            "device_add": (lambda a: m.device_add(config, a), None),
            "device_del": (lambda a: m.device_del(config, a), {"id": str}),
            "object-add": (lambda a: m.object_add(config, a), None),
            "object-del": (lambda a: m.object_del(config, a), {"id": str}),
            "blockdev-add": (lambda a: m.blockdev_add(config, a), None),
            "blockdev-del": (lambda a: m.blockdev_del(config, a), {"node-name": str}),
        }

    def names(self) -> set[str]:
        return set(self.table) | {"qmp_capabilities"}

    def __call__(self, name: str, args: dict) -> Any:
        handler, spec = self.table[name]
        _expect_args(args, spec)
        try:
            return handler(args)
        except KemuError as e:
            # A failure of the machine (not started, shut down, a vCPU that does
            # not stop) is the command's error, never a dropped connection.
            raise QmpError(str(e)) from None
        except QmpError:
            raise
        except Exception as e:
            # A bug in kemu: report it (with its traceback on stderr) to the
            # client that hit it; the machine and the other clients go on.
            log.exception("QMP command %s failed", name)
            raise QmpError(f"internal error in {name}: {type(e).__name__}: {e}") from None

    def query_version(self, _args: dict) -> dict:
        major, minor, micro = QEMU_VERSION
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": package()}

    def query_status(self, _args: dict) -> dict:
        state = self.vm.state
        if state == "created" or (state == "paused" and not self.vm.has_run):
            state = "prelaunch"        # -S and never continued, as QEMU says
        elif state == "paused" and getattr(self.vm, "io_error", False):
            state = "io-error"         # a disk's werror/rerror policy paused it
        elif state == "paused" and getattr(self.vm, "_postmigrate", False):
            state = "postmigrate"      # the machine went to a migration destination
        elif state == "paused" and getattr(self.vm, "guest_shut_down", False):
            state = "shutdown"         # the guest powered off under -no-shutdown
        return {"running": state == "running", "singlestep": False, "status": state}

    def query_commands(self, _args: dict) -> list:
        return [{"name": n} for n in sorted(self.names())]

    def query_name(self, _args: dict) -> dict:
        return {"name": self.vm.config.name} if self.vm.config.name else {}

    def query_cpus_fast(self, _args: dict) -> list:
        ids = self.vm.vcpu_thread_ids() or [threading.get_native_id()]
        return [{"cpu-index": i, "qom-path": f"/machine/unattached/device[{i}]",
                 "thread-id": tid,
                 "target": introspect.target(self.vm.config),
                 "props": {"core-id": i, "thread-id": 0, "socket-id": 0}}
                for i, tid in enumerate(ids)]

    def query_block(self, _args: dict) -> list:
        from kemu.qmp.machine_info import query_block
        return query_block(self.vm.config)

    def stop(self, _args: dict) -> None:
        if self.vm.state == "running":
            self.vm.pause()

    def cont(self, _args: dict) -> None:
        for _ in range(100):               # a client may be faster than start-up
            if self.vm.state != "created":
                break
            time.sleep(0.05)
        if self.vm.state == "paused":
            self.vm.resume()
        elif self.vm.state == "shutdown":
            raise QmpError("the machine has shut down")

    def system_reset(self, _args: dict) -> None:
        self.vm.reset()

    def system_powerdown(self, _args: dict) -> None:
        self.vm.powerdown()

    def quit(self, _args: dict) -> None:
        self.on_quit()

    # -- migration ------------------------------------------------------------------------------
    def migrate(self, args: dict) -> None:
        if "uri" not in args:
            raise QmpError("Parameter 'uri' is missing")
        if args.get("blk") or args.get("inc"):
            raise QmpError("migrate: block migration (blk, inc) is not supported by kemu; "
                           "copy the disks or use shared storage")
        if args.get("resume"):
            raise QmpError("migrate: resume is for postcopy, which kemu does not do")
        self.vm.migrate(args["uri"])

    def migrate_incoming(self, args: dict) -> None:
        if "uri" not in args:
            raise QmpError("Parameter 'uri' is missing")
        self.vm.incoming(args["uri"])

    def migrate_cancel(self, _args: dict) -> None:
        self.vm.migration.cancel()

    def query_migrate(self, _args: dict) -> dict:
        return self.vm.migration.info()

    def migrate_set_capabilities(self, args: dict) -> None:
        if "capabilities" not in args:
            raise QmpError("Parameter 'capabilities' is missing")
        self.vm.migration.set_capabilities(args["capabilities"])

    def query_migrate_capabilities(self, _args: dict) -> list:
        return self.vm.migration.query_capabilities()

    def migrate_set_parameters(self, args: dict) -> None:
        self.vm.migration.set_parameters(args)

    def query_migrate_parameters(self, _args: dict) -> dict:
        return self.vm.migration.query_parameters()

    def receive_fds(self, fds: list[int]) -> None:
        """Descriptors passed with a message (the server calls this before the command runs)."""
        with self._fd_lock:
            self._received_fds.extend(fds)

    def getfd(self, args: dict) -> None:
        """QEMU's getfd: name the descriptor passed with this command (for ``migrate fd:NAME``)."""
        import os
        name = args.get("fdname")
        if name is None:
            raise QmpError("Parameter 'fdname' is missing")
        if name[:1].isdigit():
            raise QmpError("File descriptor names must not begin with a digit")
        with self._fd_lock:
            if not self._received_fds:
                raise QmpError("No file descriptor supplied via SCM_RIGHTS")
            fd = self._received_fds.pop()
            extra, self._received_fds = self._received_fds, []
        for other in extra:
            os.close(other)
        old = self.vm.migration.fds.pop(name, None)
        if old is not None:
            os.close(old)
        self.vm.migration.fds[name] = fd

    def closefd(self, args: dict) -> None:
        import os
        fd = self.vm.migration.fds.pop(args.get("fdname", ""), None)
        if fd is None:
            raise QmpError("File descriptor named '%s' not found" % args.get("fdname", ""))
        os.close(fd)

    def send_key(self, args: dict) -> None:
        """QEMU's send-key: KeyValues (``qcode`` names, or ``number``: XT scancodes with 0x80
        for the E0 prefix, as libvirt's ``send-key`` sends them) pressed together on the
        virtio keyboards, released after ``hold-time`` ms (QEMU's default 100)."""
        from kemu.display.keymap import QCODES, xt_to_key
        keys = _required(args, "keys")
        hold = args.get("hold-time", 100)
        if hold < 0:
            raise QmpError("Parameter 'hold-time' expects a non-negative integer")
        if not keys:
            raise QmpError("Parameter 'keys' expects a non-empty list of KeyValue")
        codes = []
        for i, key in enumerate(keys):
            kind = key.get("type") if isinstance(key, dict) else None
            data = key.get("data") if isinstance(key, dict) else None
            if kind == "qcode" and isinstance(data, str):
                code = QCODES.get(data)
            elif kind == "number" and isinstance(data, int) and not isinstance(data, bool):
                code = xt_to_key(data)
            else:
                raise QmpError(f"Invalid parameter type for 'keys[{i}]', expected: KeyValue "
                               "({'type': 'qcode'|'number', 'data': ...})")
            if code is None:
                raise QmpError(f"Parameter 'keys[{i}].data' does not accept value {data!r}"
                               " (no such key in kemu's keymap)")
            codes.append(code)
        self.vm.press_keys(codes, hold)

    def block_resize(self, args: dict) -> None:
        """QEMU's block_resize: the disk named by ``device`` (the drive's id) or ``node-name``
        grows (raw: also shrinks) to ``size`` bytes; its virtio-blk device tells the guest."""
        from kemu.qmp.machine_info import disks
        size = _required(args, "size")
        device, node = args.get("device"), args.get("node-name")
        if (device is None) == (node is None):
            raise QmpError("block_resize: give exactly one of 'device' and 'node-name'")
        if size < 0:
            raise QmpError("Parameter 'size' expects a >0 size")
        found = [d for d in disks(self.vm.config)
                 if (device is not None and device in (d.device, d.drive.id))
                 or (node is not None and node in (d.node_name, _storage_node(self.vm.config, d.drive)))]
        if not found:
            raise QmpError(f"Cannot find device='{device or ''}' nor node-name='{node or ''}'")
        blk = {getattr(dev, "name", ""): dev for dev in self.vm.virtio_devices()}.get(
            found[0].name)
        if blk is None or not hasattr(blk, "resize"):
            raise QmpError(f"block_resize: no virtio-blk device uses '{device or node}'")
        blk.resize(size)

    def dump_guest_memory(self, args: dict) -> None:
        """QEMU's dump-guest-memory, as ``virsh dump --memory-only`` asks: paging=false,
        format elf, to ``file:PATH`` or ``fd:NAME``; with detach (libvirt's way) the
        command returns at once and DUMP_COMPLETED tells the end."""
        from kemu.dump import open_target
        if _required(args, "paging"):
            raise QmpError("dump-guest-memory: paging=true (a dump through the guest's page "
                           "tables) is not supported by kemu")
        protocol = _required(args, "protocol")
        if args.get("format", "elf") != "elf":
            raise QmpError(f"dump-guest-memory: format '{args['format']}' is not supported "
                           "by kemu (have: elf)")
        if "begin" in args or "length" in args:
            raise QmpError("dump-guest-memory: begin/length need paging, which kemu does "
                           "not do")
        if self._dump.get("status") == "active":
            raise QmpError("There's a dump in process")
        if self.vm.config.machine != "virt":
            raise QmpError(f"dump-guest-memory: kemu writes aarch64 cores only, not for the "
                           f"{self.vm.config.machine} board")
        out = open_target(protocol, self.vm.migration.fds)
        total = sum(size for _base, size, kind in self.vm.memory_map() if kind == "ram")
        self._dump = {"status": "active", "completed": 0, "total": total}

        def run() -> str | None:
            try:
                with out:
                    self.vm.dump_guest_memory(out)
                return None
            except (OSError, KemuError) as e:
                why = getattr(e, "strerror", None) or e
                return f"dump-guest-memory: writing the dump failed: {why}"

        def finish(error: str | None) -> None:
            self._dump = {"status": "failed" if error else "completed",
                          "completed": 0 if error else total, "total": total}
            if args.get("detach"):
                from kemu.api import DumpCompleted
                self.vm._emit(DumpCompleted(data={"result": dict(self._dump),
                                                  **({"error": error} if error else {})}))

        if args.get("detach"):
            threading.Thread(target=lambda: finish(run()), name="dump-guest-memory",
                             daemon=True).start()
            return
        error = run()
        finish(error)
        if error:
            raise QmpError(error)

    def query_dump(self, _args: dict) -> dict:
        return dict(self._dump) or {"status": "none", "completed": 0, "total": 0}

    def hmp(self, args: dict) -> str:
        """``human-monitor-command``: one line of the human monitor (kemu.monitor.hmp).

        As in QEMU, what the monitor prints is the result, errors included.
        """
        if "command-line" not in args:
            raise QmpError("Parameter 'command-line' is missing")
        if self._hmp is None:
            from kemu.monitor.hmp import Hmp
            self._hmp = Hmp(self)
        return self._hmp.execute(args["command-line"])


def _required(args: dict, key: str):
    if key not in args:
        raise QmpError(f"Parameter '{key}' is missing")
    return args[key]


def _storage_node(config, drive) -> str | None:
    """The protocol node under a -blockdev format node (libvirt names both)."""
    top = config.blockdevs.get(drive.node_name) if drive.node_name else None
    return top.file if top is not None else None


def _type_matches(entry: dict, args: dict) -> bool:
    """qom-list-types' ``implements`` filter: the type itself or its direct parent."""
    want = args.get("implements")
    return want is None or want in (entry["name"], entry["parent"])
