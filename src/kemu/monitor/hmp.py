"""QEMU's human monitor commands, as one table over the QMP commands.

As in QEMU, HMP is a presentation of QMP: ``info status`` formats
``query-status``, ``stop`` runs ``stop``.  :meth:`Hmp.execute` takes one
command line and returns what the monitor prints (lines end in ``\\r\\n``, as
QEMU's monitor ends them); errors are printed, never raised, as QEMU prints
them (``unknown command: 'foo'``, ``Error: ...``).  Every front end (QMP's
``human-monitor-command``, the terminal and socket monitors) calls this one
table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from kemu.errors import KemuError
from kemu.qmp.protocol import QmpError

if TYPE_CHECKING:
    from kemu.qmp.commands import Commands

#: QEMU's text for a feature kemu does not have (its QERR_FEATURE_DISABLED).
FEATURE_DISABLED = "The feature '{}' is not enabled"


@dataclass(frozen=True)
class HmpCommand:
    name: str                       # "cont|c": the name and its short form
    args: str                       # the argument synopsis, as in QEMU's help
    help: str
    handler: Callable[[list[str]], str]

    def help_line(self, prefix: str = "") -> str:
        return f"{prefix}{self.name} {self.args} -- {self.help}\r\n"

    def matches(self, word: str) -> bool:
        return word in self.name.split("|")


class Hmp:
    """The HMP command table for one machine (over its QMP :class:`Commands`)."""

    def __init__(self, qmp: "Commands") -> None:
        self.qmp = qmp
        self.vm = qmp.vm
        c = HmpCommand
        self.commands = [
            c("cont|c", "", "resume emulation", self._qmp_call("cont")),
            c("delvm", "tag", "delete a VM snapshot from its tag", self.delvm),
            c("help|?", "[cmd]", "show the help", self.help),
            c("info", "[subcommand]", "show various information about the system state",
              self.info),
            c("loadvm", "tag", "restore a VM snapshot from its tag", self.loadvm),
            c("migrate", "[-d] [-b] [-i] [-r] uri",
              "migrate to URI (using -d to not wait for completion)", self.migrate),
            c("migrate_cancel", "", "cancel the current VM migration",
              self._qmp_call("migrate_cancel")),
            c("migrate_incoming", "uri", "Continue an incoming migration from an -incoming defer",
              self.migrate_incoming),
            c("migrate_set_capability", "capability state",
              "Enable/Disable the usage of a capability for migration",
              self.migrate_set_capability),
            c("migrate_set_parameter", "parameter value",
              "Set the parameter for migration", self.migrate_set_parameter),
            c("quit|q", "", "quit the emulator", self._qmp_call("quit")),
            c("savevm", "tag", "save a VM snapshot. If no tag is provided, a new snapshot "
              "is created", self.savevm),
            c("sendkey", "keys [hold_ms]",
              "send keys to the VM (e.g. 'sendkey ctrl-alt-f1', default hold time=100 ms)",
              self.sendkey),
            c("stop|s", "", "stop emulation", self._qmp_call("stop")),
            c("system_powerdown", "", "send system power down event",
              self._qmp_call("system_powerdown")),
            c("system_reset", "", "reset the system", self._qmp_call("system_reset")),
        ]
        self.info_commands = [
            c("block", "[-n] [-v] [device]", "show info of one block device or all block "
              "devices", self.info_block),
            c("chardev", "", "show the character devices", self.info_chardev),
            c("cpus", "", "show infos for each CPU", self.info_cpus),
            c("migrate", "", "show migration status", self.info_migrate),
            c("migrate_capabilities", "", "show current migration capabilities",
              self.info_migrate_capabilities),
            c("migrate_parameters", "", "show current migration parameters",
              self.info_migrate_parameters),
            c("mtree", "", "show memory tree", self.info_mtree),
            c("name", "", "show the current VM name", self.info_name),
            c("network", "", "show the network state", self.info_network),
            c("qtree", "", "show device tree", self.info_qtree),
            c("registers", "", "show the cpu registers", self.info_registers),
            c("snapshots", "", "show the currently saved VM snapshots", self.info_snapshots),
            c("status", "", "show the current VM status (running|paused)", self.info_status),
            c("version", "", "show the version of QEMU", self.info_version),
            c("vnc", "", "show the vnc server status", self.info_vnc),
        ]

    # -- dispatch ---------------------------------------------------------------------------
    def execute(self, line: str) -> str:
        """Run one command line; what the monitor prints in answer."""
        words = line.split()
        if not words:
            return ""
        command = self._find(self.commands, words[0])
        if command is None:
            return f"unknown command: '{words[0]}'\r\n"
        if command.name == "info" and len(words) > 1 and \
                self._find(self.info_commands, words[1]) is None:
            return f"unknown command: 'info {words[1]}'\r\n"
        try:
            return command.handler(words[1:])
        except (QmpError, KemuError) as e:
            return f"Error: {e}\r\n"

    @staticmethod
    def _find(table: list[HmpCommand], word: str) -> HmpCommand | None:
        return next((cmd for cmd in table if cmd.matches(word)), None)

    def _qmp_call(self, name: str) -> Callable[[list[str]], str]:
        def call(_args: list[str]) -> str:
            self.qmp(name, {})
            return ""
        return call

    # -- commands ---------------------------------------------------------------------------
    def help(self, args: list[str]) -> str:
        if args and args[0] == "info":
            return self.info([])
        if args:
            command = self._find(self.commands, args[0])
            if command is None:
                return f"unknown command: '{args[0]}'\r\n"
            return command.help_line()
        return "".join(cmd.help_line() for cmd in self.commands)

    def info(self, args: list[str]) -> str:
        if not args:
            return "".join(cmd.help_line("info ") for cmd in self.info_commands)
        return self._find(self.info_commands, args[0]).handler(args[1:])

    def sendkey(self, args: list[str]) -> str:
        if not args:
            return "Error: Parameter 'keys' is missing\r\n"
        send_keys = getattr(self.vm, "send_keys", None)
        if send_keys is None:
            return f"Error: the {self.vm.config.machine} board has no keyboard\r\n"
        send_keys(args[0].split("-"))
        return ""

    # -- info -------------------------------------------------------------------------------
    def info_status(self, _args: list[str]) -> str:
        status = self.qmp("query-status", {})
        text = "running" if status["running"] else "paused"
        if not status["running"] and status["status"] != "paused":
            text += f" ({status['status']})"
        return f"VM status: {text}\r\n"

    def info_version(self, _args: list[str]) -> str:
        v = self.qmp("query-version", {})
        q = v["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']} ({v['package']})\r\n"

    def info_name(self, _args: list[str]) -> str:
        name = self.qmp("query-name", {}).get("name")
        return f"{name}\r\n" if name else ""

    def info_cpus(self, _args: list[str]) -> str:
        return "".join(f"{'*' if cpu['cpu-index'] == 0 else ' '} CPU #{cpu['cpu-index']}: "
                       f"thread_id={cpu['thread-id']}\r\n"
                       for cpu in self.qmp("query-cpus-fast", {}))

    def info_block(self, _args: list[str]) -> str:
        out = []
        for i, (block, drive) in enumerate(zip(self.qmp("query-block", {}),
                                               self.vm.config.drives)):
            inserted = block["inserted"]
            ro = ", read-only" if inserted["ro"] else ""
            out.append(f"{block['device']} (#block{100 + i}): {inserted['file']} "
                       f"({inserted['drv']}{ro})\r\n"
                       f"    Cache mode:       {drive.cache}\r\n")
        return "\r\n".join(out)

    def info_network(self, _args: list[str]) -> str:
        config = self.vm.config
        nics = {d.props.get("netdev"): d for d in config.devices
                if d.driver.startswith("virtio-net")}
        out = []
        for index, netdev in enumerate(config.netdevs):
            nic = nics.get(netdev.id)
            if nic is not None:
                mac = nic.props.get("mac", f"52:54:00:12:34:{0x56 + index:02x}")
                out.append(f"{nic.driver}.{index}: index=0,type=nic,model={nic.driver},"
                           f"macaddr={mac}\r\n \\ ")
            detail = (",net=10.0.2.0,restrict=off" if netdev.type == "user"
                      else f",ifname={netdev.props.get('ifname', '')}")
            out.append(f"{netdev.id}: index=0,type={netdev.type}{detail}\r\n")
        return "".join(out)

    def info_chardev(self, _args: list[str]) -> str:
        extra = self.vm.config.extra
        out = []
        serial = extra.get("serial", "none")
        if serial not in ("none", "null"):
            out.append(f"serial0: filename={serial.removeprefix('mon:')}\r\n")
        for i, monitor in enumerate(extra.get("monitors", [])):
            out.append(f"compat_monitor{i}: filename={monitor}\r\n")
        for i, address in enumerate(extra.get("qmp", [])):
            out.append(f"qmp{i}: filename={address.describe()}\r\n")
        return "".join(out)

    def info_registers(self, _args: list[str]) -> str:
        regs = self.vm.registers()
        rows = [f"{k.upper():>6}={v:016x}" for k, v in regs.items()]
        return "\r\n".join("  ".join(rows[i:i + 4]) for i in range(0, len(rows), 4)) + "\r\n"

    def info_mtree(self, _args: list[str]) -> str:
        rows = ["address-space: memory\r\n",
                "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\r\n"]
        for base, size, name in sorted(self.vm.memory_map()):
            kind = "ram" if name == "ram" else "i/o"
            rows.append(f"    {base:016x}-{base + size - 1:016x} (prio 0, {kind}): {name}\r\n")
        return "".join(rows)

    def info_qtree(self, _args: list[str]) -> str:
        rows = ["bus: main-system-bus\r\n", "  type System\r\n"]
        for base, size, name in sorted(self.vm.memory_map()):
            if name != "ram":
                rows.append(f"  dev: {name}, id \"\"\r\n"
                            f"    mmio {base:016x}/{size:016x}\r\n")
        return "".join(rows)

    # -- migration (QEMU's HMP spellings over the QMP commands) ------------------------------------
    def migrate(self, args: list[str]) -> str:
        detach = "-d" in args
        if any(a in ("-b", "-i", "-r") for a in args):
            return ("Error: migrate: block migration (-b, -i) and postcopy resume (-r) are "
                    "not supported by kemu\r\n")
        rest = [a for a in args if a != "-d"]
        if len(rest) != 1:
            return "Error: usage: migrate [-d] uri\r\n"
        self.qmp("migrate", {"uri": rest[0]})
        if not detach:               # as QEMU: the monitor waits for the end
            import time
            while self.qmp("query-migrate", {}).get("status") in ("setup", "active", "device"):
                time.sleep(0.05)
            info = self.qmp("query-migrate", {})
            if info.get("status") == "failed":
                return f"Error: {info.get('error-desc', 'migration failed')}\r\n"
        return ""

    def migrate_incoming(self, args: list[str]) -> str:
        if len(args) != 1:
            return "Error: usage: migrate_incoming uri\r\n"
        self.qmp("migrate-incoming", {"uri": args[0]})
        return ""

    def migrate_set_capability(self, args: list[str]) -> str:
        if len(args) != 2 or args[1] not in ("on", "off"):
            return "Error: usage: migrate_set_capability capability on|off\r\n"
        self.qmp("migrate-set-capabilities",
                 {"capabilities": [{"capability": args[0], "state": args[1] == "on"}]})
        return ""

    def migrate_set_parameter(self, args: list[str]) -> str:
        if len(args) != 2:
            return "Error: usage: migrate_set_parameter parameter value\r\n"
        try:
            value = int(args[1])
        except ValueError:
            return f"Error: Parameter '{args[0]}' expects an integer\r\n"
        self.qmp("migrate-set-parameters", {args[0]: value})
        return ""

    def info_migrate(self, _args: list[str]) -> str:
        info = self.qmp("query-migrate", {})
        if not info:
            return ""
        rows = [f"Migration status: {info['status']}"]
        if "error-desc" in info:
            rows.append(f"error description: {info['error-desc']}")
        rows.append(f"total time: {info.get('total-time', 0)} ms")
        if "downtime" in info:
            rows.append(f"downtime: {info['downtime']} ms")
        ram = info.get("ram", {})
        if ram:
            rows += [f"transferred ram: {ram['transferred'] >> 10} kbytes",
                     f"remaining ram: {ram['remaining'] >> 10} kbytes",
                     f"total ram: {ram['total'] >> 10} kbytes",
                     f"duplicate: {ram['duplicate']} pages",
                     f"normal: {ram['normal']} pages",
                     f"dirty sync count: {ram['dirty-sync-count']}"]
        return "".join(r + "\r\n" for r in rows)

    def info_migrate_capabilities(self, _args: list[str]) -> str:
        return "".join(f"{c['capability']}: {'on' if c['state'] else 'off'}\r\n"
                       for c in self.qmp("query-migrate-capabilities", {}))

    def info_migrate_parameters(self, _args: list[str]) -> str:
        return "".join(f"{k}: {v}{' ms' if k == 'downtime-limit' else ' bytes/second'}\r\n"
                       for k, v in self.qmp("query-migrate-parameters", {}).items())

    # -- internal snapshots (kemu.savevm; QEMU's HMP commands, errors printed) ----------------
    @staticmethod
    def _string(args: list[str]) -> str | None:
        """An HMP string argument: a word, or a double-quoted string with backslash
        escapes (libvirt sends ``savevm "NAME"``)."""
        if not args:
            return None
        text = " ".join(args)
        if not text.startswith('"'):
            return args[0]
        out, i = [], 1
        while i < len(text) and text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
                out.append({"n": "\n", "r": "\r"}.get(text[i], text[i]))
            else:
                out.append(text[i])
            i += 1
        if i >= len(text):
            raise QmpError("unterminated string")
        return "".join(out)

    def savevm(self, args: list[str]) -> str:
        self.vm.savevm(self._string(args))
        return ""

    def loadvm(self, args: list[str]) -> str:
        return self._with_tag("loadvm", args, self.vm.loadvm)

    def delvm(self, args: list[str]) -> str:
        return self._with_tag("delvm", args, self.vm.delvm)

    def _with_tag(self, command: str, args: list[str], action: Callable[[str], None]) -> str:
        name = self._string(args)
        if name is None:
            return (f'{command}: string expected\r\nTry "help {command}" for more '
                    'information\r\n')
        action(name)
        return ""

    def info_snapshots(self, _args: list[str]) -> str:
        from kemu.savevm import info_snapshots
        return info_snapshots(self.vm)

    def info_vnc(self, _args: list[str]) -> str:
        info = self.qmp("query-vnc", {})
        if not info.get("enabled"):
            return f"Error: {FEATURE_DISABLED.format('vnc')}\r\n"
        out = ["default:", f"  Server: {info['host']}:{info['service']} ({info['family']})",
               f"    Auth: {info['auth']} (Sub: none)"]
        for c in info["clients"]:
            out += [f"  Client: {c['host']}:{c['service']} ({c['family']})",
                    "    x509_dname: none", "    sasl_username: none"]
        return "\r\n".join(out) + "\r\n"
