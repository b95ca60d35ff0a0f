"""``kemu img``: create, inspect, check and convert disk images, with the
command lines, output and exit statuses of ``qemu-img``.

    kemu img create [-f FMT] [-b BACKING [-F BACKING_FMT]] [-o OPTS] FILE [SIZE]
    kemu img info [-f FMT] [--output=human|json] FILE
    kemu img check [-f FMT] [--output=human|json] FILE
    kemu img convert [-f FMT] [-O FMT] [-o OPTS] [-c] [-p] SRC DST
    kemu img snapshot [-U] [-l | -c SNAPSHOT | -a SNAPSHOT | -d SNAPSHOT] FILE

Errors are one line on stderr, ``kemu img: ...``, and exit status 2
(``check`` exits 2 for corruptions and 3 for leaks, as qemu-img does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, TextIO

from kemu.backends.block import ImageError, RawFile, detect_format, open_image
from kemu.backends.locking import image_permissions
from kemu.errors import KemuError

PROG = "kemu img"
FORMATS = ("raw", "qcow2")
_SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


class _UsageError(KemuError):
    """A command line argparse refused."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``1.5G``, ``4096`` -> bytes (binary suffixes
    k, M, G, T, P, E as qemu-img takes them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtpeBKMGTPE]?)\s*", text)
    if not m:
        raise ImageError(f"invalid size {text!r} (use e.g. 512, 64M, 1G)")
    number, suffix = m.groups()
    shift = _SUFFIXES[suffix.lower()]
    if "." in number:
        whole, frac = number.split(".")
        value = (int(whole + frac) << shift) // 10 ** len(frac)
        if (int(whole + frac) << shift) % 10 ** len(frac):
            raise ImageError(f"size {text!r} is not a whole number of bytes")
    else:
        value = int(number) << shift
    if value >= 1 << 63:
        raise ImageError(f"size {text!r} is too large")
    return value


def size_to_str(value: int) -> str:
    """Human size as qemu-img prints it: three significant digits,
    binary units (``64 MiB``, ``192 KiB``, ``1.5 GiB``)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    i = 0
    while i + 1 < len(units) and value >= 1000 * (1 << (10 * i)):
        i += 1
    return f"{value / (1 << (10 * i)):0.3g} {units[i]}"


def _parse_options(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ImageError(f"invalid option {item!r} (expected key=value)")
        out[key.strip()] = value.strip()
    return out


def _qcow2_options(opts: dict[str, str]) -> dict:
    known = {"cluster_size", "compat", "refcount_bits", "lazy_refcounts", "preallocation",
             "backing_file", "backing_fmt", "size"}
    for key in opts:
        if key not in known:
            raise ImageError(f"invalid parameter {key!r} for format qcow2")
    kw: dict = {}
    if "cluster_size" in opts:
        kw["cluster_size"] = parse_size(opts["cluster_size"])
    if "compat" in opts:
        versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
        if opts["compat"] not in versions:
            raise ImageError(f"invalid compat level {opts['compat']!r} (0.10 or 1.1)")
        kw["version"] = versions[opts["compat"]]
    if "refcount_bits" in opts:
        try:
            kw["refcount_bits"] = int(opts["refcount_bits"])
        except ValueError:
            raise ImageError(f"invalid refcount_bits {opts['refcount_bits']!r}") from None
    if opts.get("lazy_refcounts", "off") not in ("off", "false"):
        raise ImageError("lazy_refcounts is not supported")
    if opts.get("preallocation", "off") != "off":
        raise ImageError("preallocation is not supported")
    return kw


def _create(path: Path, fmt: str, size: int, opts: dict[str, str], *,
            backing: str | None = None, backing_fmt: str | None = None) -> None:
    if fmt == "raw":
        if backing:
            raise ImageError("raw images cannot have a backing file")
        if set(opts) - {"size", "preallocation"} or opts.get("preallocation", "off") != "off":
            raise ImageError(f"invalid options for format raw: {', '.join(opts)}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as e:
            raise ImageError(f"could not create {path}: {e.strerror}") from None
        return
    from kemu.backends.qcow2 import create_qcow2
    if size % 512:
        raise ImageError("image size must be a multiple of 512 bytes")
    create_qcow2(path, size, backing_file=backing, backing_format=backing_fmt,
                 **_qcow2_options(opts))


def _check_format(fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise ImageError(f"unknown image format {fmt!r} (known: {', '.join(FORMATS)})")


# -- subcommands -------------------------------------------------------------------------


def _force_share_option(parser) -> None:
    parser.add_argument("-U", "--force-share", dest="U", action="store_true",
                        help="open the image read-only even if another process has it "
                             "open for writing (as qemu-img -U)")


def cmd_create(args, out: TextIO, err: TextIO) -> int:
    _check_format(args.f)
    fmt = args.f or "raw"
    opts = _parse_options(args.o)
    backing = args.b or opts.pop("backing_file", None)
    backing_fmt = args.F or opts.pop("backing_fmt", None)
    _check_format(backing_fmt)
    size_text = args.size or opts.pop("size", None)
    size = parse_size(size_text) if size_text is not None else None
    if backing:
        from kemu.backends.qcow2.image import resolve_backing
        where = resolve_backing(Path(args.file), backing)
        if backing_fmt is None:
            backing_fmt = detect_format(where)
            print(f"{PROG}: warning: backing format not specified, probed {backing_fmt}; "
                  f"use -F to set it", file=err)
        base = open_image(where, backing_fmt, read_only=True)   # it must open
        try:
            if size is None:
                size = base.size
        finally:
            base.close()
    if size is None:
        raise ImageError("image size must be specified")
    if not args.q:
        extra = f" backing_file={backing} backing_fmt={backing_fmt}" if backing else ""
        print(f"Formatting '{args.file}', fmt={fmt}{extra} size={size}", file=out)
    _create(Path(args.file), fmt, size, opts, backing=backing, backing_fmt=backing_fmt)
    return 0


def image_info(path: Path, fmt: str | None, force_share: bool = False) -> dict:
    """An image's facts in QEMU's ImageInfo shape (qemu-img info, QMP's query-block)."""
    _check_format(fmt)
    fmt = fmt or detect_format(path)
    try:
        actual = os.stat(path).st_blocks * 512
    except OSError as e:
        raise ImageError(f"could not open {path}: {e.strerror}") from None
    info: dict = {}      # keys in qemu-img's order
    if fmt == "raw":
        # as qemu-img info: a raw image has no metadata, writers are tolerated
        disk = RawFile(path, read_only=True, lock=image_permissions("raw", True, force_share=True))
        info.update({"virtual-size": disk.size, "filename": str(path), "format": "raw",
                     "actual-size": actual})
        disk.close()
        info["dirty-flag"] = False
        return info
    from kemu.backends.qcow2 import Qcow2Image
    from kemu.backends.qcow2.header import COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY
    from kemu.backends.qcow2.image import resolve_backing
    image = Qcow2Image.open(path, read_only=True, backing=False,
                            lock=image_permissions("qcow2", True, force_share=force_share))
    try:
        h = image.header
        from kemu.backends.qcow2.internal import snapshots
        listed = snapshots(image)
        if listed:
            info["snapshots"] = [_snapshot_info(sn) for sn in listed]
        if h.backing_file is not None and h.backing_format:
            info["backing-filename-format"] = h.backing_format
        info.update({"virtual-size": h.size, "filename": str(path),
                     "cluster-size": h.cluster_size, "format": "qcow2", "actual-size": actual})
        data: dict = {"compat": "1.1" if h.version == 3 else "0.10"}
        data["compression-type"] = "zlib"
        if h.version == 3:
            data.update({"lazy-refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
                         "refcount-bits": h.refcount_bits,
                         "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
                         "extended-l2": False})
        else:
            data["refcount-bits"] = 16
        info["format-specific"] = {"type": "qcow2", "data": data}
        if h.backing_file is not None:
            info["full-backing-filename"] = str(resolve_backing(path, h.backing_file))
            info["backing-filename"] = h.backing_file
        info["dirty-flag"] = bool(h.incompatible_features & INCOMPAT_DIRTY)
    finally:
        image.close()
    return info


def _snapshot_info(sn) -> dict:
    """One internal snapshot as qemu-img info's JSON has it (SnapshotInfo)."""
    out: dict = {}
    if sn.icount is not None:
        out["icount"] = sn.icount
    out.update({"vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000, "name": sn.name,
                "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
                "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000, "id": sn.id,
                "vm-state-size": sn.vm_state_size})
    return out


def cmd_info(args, out: TextIO, err: TextIO) -> int:
    info = image_info(Path(args.file), args.f, args.U)
    if args.output == "json":
        print(json.dumps(info, indent=4), file=out)
        return 0
    lines = [f"image: {info['filename']}",
             f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {size_to_str(info['actual-size'])}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        from kemu.backends.qcow2.snapshots import HEADER_ROW, format_row
        lines += ["Snapshot list:", HEADER_ROW]
        lines += [format_row(sn["id"], sn["name"], sn["vm-state-size"], sn["date-sec"],
                             sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"],
                             sn.get("icount")) for sn in info["snapshots"]]
    if "format-specific" in info:
        lines.append("Format specific information:")
        for key, value in info["format-specific"]["data"].items():
            if isinstance(value, bool):
                value = str(value).lower()
            lines.append(f"    {key.replace('-', ' ')}: {value}")
    print("\n".join(lines), file=out)
    return 0


def cmd_check(args, out: TextIO, err: TextIO) -> int:
    _check_format(args.f)
    path = Path(args.file)
    fmt = args.f or detect_format(path)
    if fmt != "qcow2":
        print(f"{PROG}: this image format ({fmt}) does not support checks", file=err)
        return 63
    from kemu.backends.qcow2 import check_qcow2
    result = check_qcow2(path, lock=image_permissions("qcow2", True, force_share=args.U))
    if args.output == "json":
        print(json.dumps(result.to_json(), indent=4), file=out)
    elif not args.q:
        print(result.format_human(), end="", file=out)
    return result.exit_status


def cmd_convert(args, out: TextIO, err: TextIO) -> int:
    _check_format(args.f)
    _check_format(args.O)
    src_path, dst_path = Path(args.src), Path(args.dst)
    fmt = args.O or "raw"
    if args.c and fmt != "qcow2":
        raise ImageError("compression (-c) needs the qcow2 output format")
    if dst_path.exists() and src_path.exists() and os.path.samefile(src_path, dst_path):
        raise ImageError("source and destination are the same file")
    src = open_image(src_path, args.f, read_only=True, force_share=args.U)
    try:
        size = src.size
        if fmt == "qcow2" and size % 512:
            size += -size % 512      # qcow2 sizes are whole sectors
        _create(dst_path, fmt, size, _parse_options(args.o))
        dst = open_image(dst_path, fmt, read_only=False)
        try:
            _copy(src, dst, progress=args.p, compress=args.c, err=err)
            dst.flush()
        finally:
            dst.close()
    finally:
        src.close()
    return 0


def _copy(src, dst, *, progress: bool, compress: bool, err: TextIO) -> None:
    """Copy every non-zero cluster of ``src`` into the fresh ``dst`` (which
    reads as zeros everywhere, so zero runs are skipped: sparse output)."""
    from tqdm import tqdm
    unit = getattr(dst, "cluster_size", 64 << 10)
    chunk = max(unit, 2 << 20)
    zeros = bytes(unit)
    size = src.size
    write_compressed: Callable | None = getattr(dst, "write_compressed", None) if compress else None
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
              file=err, desc="converting", leave=True) as bar:
        for base in range(0, size, chunk):
            n = min(chunk, size - base)
            data = memoryview(src.read(base, n))
            run = -1
            for o in range(0, n + unit, unit):
                piece = data[o:o + unit] if o < n else None
                nonzero = piece is not None and piece != zeros[:len(piece)]
                if nonzero and write_compressed is not None:
                    write_compressed(base + o, bytes(piece))
                    continue
                if nonzero and run < 0:
                    run = o
                elif not nonzero and run >= 0:
                    dst.write(base + run, data[run:min(o, n)])
                    run = -1
            bar.update(n)


# -- entry point -----------------------------------------------------------------------------


def cmd_snapshot(args, out: TextIO, err: TextIO) -> int:
    """``kemu img snapshot -l|-c|-a|-d``: list, create, apply or delete the internal
    snapshots of a qcow2 image, as qemu-img does (its messages and exit statuses)."""
    _check_format(args.f)
    path = Path(args.file)
    actions = [(flag, value) for flag, value in (("l", args.l or None), ("c", args.c),
                                                  ("a", args.a), ("d", args.d))
               if value is not None]
    if len(actions) > 1:
        print(f"{PROG}: Cannot mix '-l', '-a', '-c', '-d'", file=err)
        return 1
    if not actions:
        return 0
    action, name = actions[0]
    fmt = args.f or detect_format(path)
    if fmt != "qcow2":
        if action == "l":
            return 0                 # qemu-img: a raw image has no snapshots to list
        verb = {"c": "create", "a": "apply", "d": "delete"}[action]
        print(f"{PROG}: Could not {verb} snapshot '{name}': -95 (Operation not supported)",
              file=err)
        return 1
    if action == "l":
        from kemu.backends.qcow2.snapshots import HEADER_ROW, list_snapshots
        snapshots = list_snapshots(path, lock=image_permissions("qcow2", True,
                                                                force_share=args.U))
        if snapshots:
            print("Snapshot list:", file=out)
            print(HEADER_ROW, file=out)
            for sn in snapshots:
                print(sn.row(), file=out)
        return 0
    from kemu.backends.qcow2 import Qcow2Image
    from kemu.backends.qcow2 import internal
    image = Qcow2Image.open(path, lock=image_permissions("qcow2", False))
    try:
        if action == "c":
            try:
                internal.create(image, name, icount=0)
            except ImageError as e:
                print(f"{PROG}: Could not create snapshot '{name}': {e}", file=err)
                return 1
        elif action == "a":
            try:
                internal.apply(image, name)
            except ImageError as e:
                why = "No such file or directory" if internal.find_snapshot(image, name) < 0 \
                    else str(e)
                print(f"{PROG}: Could not apply snapshot '{name}': Failed to load snapshot: "
                      f"{why}", file=err)
                return 1
        else:
            if internal.find_snapshot(image, name) < 0:
                print(f"{PROG}: Could not delete snapshot '{name}': snapshot not found",
                      file=err)
                return 1
            internal.delete(image, name)
    finally:
        image.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Create, inspect, check and convert disk images.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("create", help="create a new image")
    c.add_argument("-f", metavar="FMT", help="image format: raw (default) or qcow2")
    c.add_argument("-b", metavar="BACKING", help="backing file (qcow2)")
    c.add_argument("-F", metavar="BACKING_FMT", help="format of the backing file")
    c.add_argument("-o", metavar="OPTIONS", help="cluster_size=, compat=, refcount_bits=")
    c.add_argument("-q", action="store_true", help="quiet")
    c.add_argument("file")
    c.add_argument("size", nargs="?")
    c.set_defaults(run=cmd_create)
    i = sub.add_parser("info", help="show information about an image")
    _force_share_option(i)
    i.add_argument("-f", metavar="FMT")
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("file")
    i.set_defaults(run=cmd_info)
    k = sub.add_parser("check", help="check a qcow2 image for consistency")
    _force_share_option(k)
    k.add_argument("-f", metavar="FMT")
    k.add_argument("--output", choices=("human", "json"), default="human")
    k.add_argument("-q", action="store_true", help="quiet")
    k.add_argument("file")
    k.set_defaults(run=cmd_check)
    v = sub.add_parser("convert", help="copy an image into a new one, maybe another format")
    _force_share_option(v)
    v.add_argument("-f", metavar="FMT", help="source format (probed if omitted)")
    v.add_argument("-O", metavar="FMT", help="output format: raw (default) or qcow2")
    v.add_argument("-o", metavar="OPTIONS", help="output format options")
    v.add_argument("-c", action="store_true", help="compress the output (qcow2)")
    v.add_argument("-p", action="store_true", help="show a progress bar")
    v.add_argument("src")
    v.add_argument("dst")
    v.set_defaults(run=cmd_convert)
    n = sub.add_parser("snapshot", help="list, create, apply or delete the internal "
                       "snapshots of a qcow2 image")
    _force_share_option(n)
    n.add_argument("-f", metavar="FMT")
    n.add_argument("-q", action="store_true", help="quiet")
    n.add_argument("-l", action="store_true", help="list the snapshots")
    n.add_argument("-c", metavar="SNAPSHOT", help="create a snapshot")
    n.add_argument("-a", metavar="SNAPSHOT", help="apply a snapshot (revert the disk to it)")
    n.add_argument("-d", metavar="SNAPSHOT", help="delete a snapshot")
    n.add_argument("file")
    n.set_defaults(run=cmd_snapshot)
    return p


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run ``kemu img`` with ``argv`` (without the ``img`` word); returns
    the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        return args.run(args, out, err)
    except SystemExit as e:          # --help
        return e.code if isinstance(e.code, int) else 0
    except KemuError as e:
        print(f"{PROG}: {e}", file=err)
        return e.exit_status
    except OSError as e:
        print(f"{PROG}: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=err)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
