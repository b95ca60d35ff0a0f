"""Creating an empty qcow2 image (qcow2 spec, "Header", "Host cluster
management").

Layout of a new image, all metadata at the start of the file:
header cluster (header, extensions, backing file name), refcount table,
refcount blocks covering every metadata cluster, then the L1 table (left
sparse: all zero entries).
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

from kemu.backends.block import ImageError
from kemu.backends.qcow2.header import (
    DEFAULT_CLUSTER_BITS, EXT_BACKING_FORMAT, MAX_BACKING_NAME, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MIN_CLUSTER_BITS, V2_HEADER_LENGTH, V3_HEADER_LENGTH, Header, encode_header,
    extension, feature_table_extension, l1_entries_needed)
from kemu.backends.qcow2.refcount import RefcountBlock, be_bytes


def _layout(size: int, cluster_bits: int, refcount_order: int) -> tuple[int, int, int, int]:
    """(l1 entries, refcount table clusters, refcount blocks, L1 clusters)."""
    cs = 1 << cluster_bits
    l1_size = l1_entries_needed(size, cluster_bits)
    if l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(f"image size {size} is too large for cluster size {cs}")
    l1_clusters = -(-l1_size * 8 // cs)
    per_block = (cs * 8) >> refcount_order
    tc, nb = 1, 1
    while True:
        total = 1 + tc + nb + l1_clusters
        new_nb = -(-total // per_block)
        new_tc = -(-new_nb * 8 // cs)
        if (new_nb, new_tc) == (nb, tc):
            return l1_size, tc, nb, l1_clusters
        nb, tc = new_nb, new_tc


def create_qcow2(path: str | Path, size: int, *, cluster_size: int = 1 << DEFAULT_CLUSTER_BITS,
                 version: int = 3, refcount_bits: int = 16, backing_file: str | None = None,
                 backing_format: str | None = None) -> None:
    """Write a new, empty qcow2 image of ``size`` virtual bytes at ``path``
    (replacing any file there)."""
    path = Path(path)
    if size < 0:
        raise ImageError(f"invalid image size {size}")
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(f"cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} "
                         f"and {1 << MAX_CLUSTER_BITS} bytes")
    if version not in (2, 3):
        raise ImageError(f"unsupported qcow2 version {version}")
    refcount_order = refcount_bits.bit_length() - 1
    if refcount_bits != 1 << refcount_order or refcount_order > 6:
        raise ImageError("refcount bits must be a power of two up to 64")
    if version == 2 and refcount_bits != 16:
        raise ImageError("version 2 images (compat=0.10) only support 16 refcount bits")
    name = os.fsencode(backing_file) if backing_file is not None else b""
    if backing_file is not None and not 0 < len(name) <= MAX_BACKING_NAME:
        raise ImageError(f"backing file name must be 1..{MAX_BACKING_NAME} bytes")
    cs = cluster_size
    l1_size, tc, nb, l1_clusters = _layout(size, cluster_bits, refcount_order)
    table_at, blocks_at, l1_at = 1, 1 + tc, 1 + tc + nb
    total = l1_at + l1_clusters

    h = Header(version=version, backing_file_offset=0, backing_file_size=0,
               cluster_bits=cluster_bits, size=size, crypt_method=0, l1_size=l1_size,
               l1_table_offset=l1_at * cs, refcount_table_offset=table_at * cs,
               refcount_table_clusters=tc, nb_snapshots=0, snapshots_offset=0,
               refcount_order=refcount_order,
               header_length=V3_HEADER_LENGTH if version == 3 else V2_HEADER_LENGTH)
    exts = b""
    if backing_format:
        exts += extension(EXT_BACKING_FORMAT, backing_format.encode())
    head_len = len(encode_header(h, exts))
    if version == 3 and head_len + len(feature_table_extension()) + len(name) <= cs:
        exts += feature_table_extension()
    if name:
        h.backing_file_offset = len(encode_header(h, exts))
        h.backing_file_size = len(name)
    header = encode_header(h, exts) + name
    if len(header) > cs:
        raise ImageError("header, extensions and backing file name do not fit in one cluster")

    per_block = (cs * 8) >> refcount_order
    table = array("Q", [0]) * (tc * cs // 8)
    blocks = []
    for b in range(nb):
        block = RefcountBlock(refcount_order, bytes(cs))
        for k in range(b * per_block, min(total, (b + 1) * per_block)):
            block.set(k - b * per_block, 1)
        blocks.append(block.to_bytes())
        table[b] = (blocks_at + b) * cs
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ImageError(f"could not create {path}: {e.strerror}") from None
    try:
        os.pwrite(fd, header, 0)
        os.pwrite(fd, be_bytes(table), table_at * cs)
        os.pwrite(fd, b"".join(blocks), blocks_at * cs)
        os.ftruncate(fd, total * cs)
        os.fsync(fd)
    except OSError as e:
        raise ImageError(f"could not write {path}: {e.strerror}") from None
    finally:
        os.close(fd)
