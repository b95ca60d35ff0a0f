"""The qcow2 header and header extensions (qcow2 spec, "Header" and
"Header extensions"), parsed and validated without doing any I/O.

Every field is checked against the limits the spec (and QEMU's reading of
it) sets and against the size of the host file, so a hostile header is
refused here with one :class:`ImageError`, before any table is read or any
buffer is sized from it.

All integers in the format are big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kemu.backends.block import QCOW2_MAGIC, ImageError

# -- limits --------------------------------------------------------------------

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_BITS = 16
#: Upper bounds QEMU applies to the active L1 table and the refcount table.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
#: Bits 9-55 of L1/L2/refcount-table entries hold a host offset.
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00

# -- feature bits (spec: "incompatible_features", "compatible_features",
#    "autoclear_features") ------------------------------------------------------

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

#: Incompatible features this implementation understands (the dirty and
#: corrupt bits only restrict opening read-write; a compression type other
#: than zlib is refused separately).
SUPPORTED_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION

#: The names kemu writes into the feature name table: (type, bit) -> name;
#: type 0 = incompatible, 1 = compatible, 2 = autoclear.
FEATURE_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}

# -- header extension types (spec: "Header extensions") ------------------------

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

#: Version 2 header: magic .. snapshots_offset (bytes 0-71).
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
#: Version 3 additions: incompatible, compatible, autoclear, refcount_order,
#: header_length (bytes 72-103).
V3_FIELDS = struct.Struct(">QQQII")
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
#: The header kemu writes: 104 bytes, compression_type, 7 bytes padding.
V3_HEADER_LENGTH = 112

# byte offsets of fields kemu rewrites in place
OFF_SIZE = 24                # size (u64): the virtual disk's size in bytes
OFF_REFCOUNT_TABLE = 48      # refcount_table_offset (u64) + refcount_table_clusters (u32)
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88


@dataclass
class Header:
    """A parsed qcow2 header plus what its extensions say."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    #: (type, data) of extensions kemu does not interpret, in file order.
    other_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def feature_name(self, kind: int, bit: int) -> str:
        return self.feature_names.get((kind, bit)) or FEATURE_NAMES.get((kind, bit)) \
            or f"unknown feature bit {bit}"


def header_probe_length(prefix: bytes) -> int:
    """How many leading bytes of the file :func:`parse_header` needs: the
    whole first cluster (header, extensions and backing file name live
    there).  ``prefix`` is at least the first 24 bytes."""
    if len(prefix) < 24 or prefix[:4] != QCOW2_MAGIC:
        raise ImageError("not a qcow2 image (bad magic)")
    cluster_bits = struct.unpack_from(">I", prefix, 20)[0]
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(f"unsupported cluster size: 2^{cluster_bits} bytes "
                         f"(cluster_bits must be {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
    return 1 << cluster_bits


def l1_entries_needed(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map ``size`` bytes (spec: "Cluster mapping")."""
    per_l1 = 1 << (cluster_bits + cluster_bits - 3)
    return -(-size // per_l1)


def _check_region(name: str, offset: int, length: int, cluster_size: int,
                  file_size: int) -> None:
    if offset % cluster_size:
        raise ImageError(f"{name} offset {offset:#x} is not cluster aligned")
    if offset + length > file_size:
        raise ImageError(f"{name} at {offset:#x} (+{length} bytes) lies beyond the end "
                         f"of the file ({file_size} bytes)")


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[1] > 0 and b[1] > 0 and a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def parse_header(data: bytes, file_size: int) -> Header:
    """Parse and validate the header in ``data`` (the first cluster of the
    file, or the whole file if it is shorter) of a file of ``file_size``
    bytes."""
    if len(data) < V2_HEADER.size:
        raise ImageError("file too short for a qcow2 header")
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
     crypt_method, l1_size, l1_table_offset, refcount_table_offset,
     refcount_table_clusters, nb_snapshots, snapshots_offset) = V2_HEADER.unpack_from(data)
    if magic != QCOW2_MAGIC:
        raise ImageError("not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise ImageError(f"unsupported qcow2 version {version}")
    cluster_size = header_probe_length(data)
    h = Header(version, backing_file_offset, backing_file_size, cluster_bits, size,
               crypt_method, l1_size, l1_table_offset, refcount_table_offset,
               refcount_table_clusters, nb_snapshots, snapshots_offset)
    if version == 3:
        if len(data) < V3_MIN_HEADER_LENGTH:
            raise ImageError("file too short for a version 3 qcow2 header")
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = V3_FIELDS.unpack_from(data, 72)
        if h.header_length < V3_MIN_HEADER_LENGTH:
            raise ImageError(f"header_length {h.header_length} is below the minimum of "
                             f"{V3_MIN_HEADER_LENGTH} bytes")
        if h.header_length > cluster_size or h.header_length > len(data):
            raise ImageError(f"header_length {h.header_length} exceeds the first cluster "
                             f"or the file")
        if h.header_length > 104:
            h.compression_type = data[104]
        if h.refcount_order > 6:
            raise ImageError(f"refcount_order {h.refcount_order} is out of range (0..6)")
    _check_features(h)
    if crypt_method != 0:
        raise ImageError("encrypted qcow2 images are not supported")
    if size >= 1 << 63:
        raise ImageError(f"virtual size {size} is too large")
    # L1 table (spec: "Cluster mapping")
    if l1_size > MAX_L1_BYTES // 8:
        raise ImageError(f"L1 table too large ({l1_size} entries)")
    if l1_size < l1_entries_needed(size, cluster_bits):
        raise ImageError(f"L1 table ({l1_size} entries) is too small for the virtual "
                         f"size {size}")
    if l1_size:
        _check_region("L1 table", l1_table_offset, l1_size * 8, cluster_size, file_size)
    # refcount table (spec: "Host cluster management")
    if refcount_table_clusters == 0:
        raise ImageError("image has no refcount table")
    if refcount_table_clusters > MAX_REFTABLE_BYTES // cluster_size:
        raise ImageError(f"refcount table too large ({refcount_table_clusters} clusters)")
    _check_region("refcount table", refcount_table_offset,
                  refcount_table_clusters * cluster_size, cluster_size, file_size)
    if refcount_table_offset == 0:
        raise ImageError("refcount table overlaps the header")
    # snapshots (spec: "Snapshots")
    if nb_snapshots > MAX_SNAPSHOTS:
        raise ImageError(f"too many snapshots ({nb_snapshots})")
    if nb_snapshots:
        _check_region("snapshot table", snapshots_offset, 1, cluster_size, file_size)
    # metadata must not overlap
    regions = [("header", (0, cluster_size)),
               ("L1 table", (l1_table_offset, l1_size * 8)),
               ("refcount table", (refcount_table_offset, refcount_table_clusters * cluster_size))]
    for i in range(len(regions)):
        for j in range(i + 1, len(regions)):
            if _overlaps(regions[i][1], regions[j][1]):
                raise ImageError(f"{regions[i][0]} and {regions[j][0]} overlap")
    _parse_extensions(h, data, file_size)
    return h


def _check_features(h: Header) -> None:
    if h.version == 2:
        h.refcount_order = 4
        return
    if h.incompatible_features & INCOMPAT_COMPRESSION:
        if h.header_length <= 104:
            raise ImageError("compression type bit set but header has no compression_type")
        if h.compression_type != 0:
            raise ImageError(f"compression type {h.compression_type} (zstd) is not supported")
    elif h.compression_type != 0:
        raise ImageError("compression_type is set but the compression type bit is clear")


def _parse_extensions(h: Header, data: bytes, file_size: int) -> None:
    """Walk the header extensions (spec: "Header extensions"): they follow the
    header and end before the backing file name or the end of the first
    cluster."""
    cluster_size = h.cluster_size
    if h.backing_file_offset:
        if h.backing_file_size == 0 or h.backing_file_size > MAX_BACKING_NAME:
            raise ImageError(f"backing file name length {h.backing_file_size} is invalid")
        end = h.backing_file_offset + h.backing_file_size
        if h.backing_file_offset < h.header_length or end > cluster_size or end > len(data):
            raise ImageError("backing file name lies outside the first cluster or the file")
        raw = data[h.backing_file_offset:end]
        if b"\0" in raw:
            raise ImageError("backing file name contains a NUL byte")
        h.backing_file = raw.decode("utf-8", "surrogateescape")
        ext_end = h.backing_file_offset
    else:
        ext_end = min(cluster_size, len(data))
    off = h.header_length
    while off + 8 <= ext_end:
        etype, elen = struct.unpack_from(">II", data, off)
        off += 8
        if etype == EXT_END:
            break
        if off + elen > ext_end:
            raise ImageError(f"header extension {etype:#010x} ({elen} bytes) runs past "
                             f"the end of the header area")
        payload = data[off:off + elen]
        off += (elen + 7) & ~7
        if etype == EXT_BACKING_FORMAT:
            if b"\0" in payload:
                payload = payload[:payload.index(b"\0")]
            h.backing_format = payload.decode("ascii", "replace")
        elif etype == EXT_FEATURE_TABLE:
            for i in range(0, elen - elen % 48, 48):
                kind, bit = payload[i], payload[i + 1]
                name = payload[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                h.feature_names[(kind, bit)] = name
        elif etype == EXT_DATA_FILE:
            raise ImageError("qcow2 images with an external data file are not supported")
        else:
            h.other_extensions.append((etype, payload))
    unknown = h.incompatible_features & ~SUPPORTED_INCOMPAT
    if unknown:
        names = [h.feature_name(0, b) for b in range(64) if unknown >> b & 1]
        raise ImageError("unsupported qcow2 feature(s): " + ", ".join(names))


def feature_table_extension() -> bytes:
    """The feature name table kemu writes (spec: "Feature name table")."""
    body = b"".join(struct.pack(">BB46s", kind, bit, name.encode())
                    for (kind, bit), name in FEATURE_NAMES.items())
    return struct.pack(">II", EXT_FEATURE_TABLE, len(body)) + body


def encode_header(h: Header, extensions: bytes = b"") -> bytes:
    """The header bytes (including ``extensions``, already encoded, and the
    end marker) for a new image; the backing file name is not included."""
    out = V2_HEADER.pack(QCOW2_MAGIC, h.version, h.backing_file_offset, h.backing_file_size,
                         h.cluster_bits, h.size, h.crypt_method, h.l1_size, h.l1_table_offset,
                         h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots,
                         h.snapshots_offset)
    if h.version == 3:
        out += V3_FIELDS.pack(h.incompatible_features, h.compatible_features,
                              h.autoclear_features, h.refcount_order, h.header_length)
        out += bytes([h.compression_type]) + bytes(h.header_length - 105)
    return out + extensions + struct.pack(">II", EXT_END, 0)


def extension(etype: int, payload: bytes) -> bytes:
    """One header extension, padded to a multiple of 8 bytes."""
    return struct.pack(">II", etype, len(payload)) + payload + bytes(-len(payload) % 8)
