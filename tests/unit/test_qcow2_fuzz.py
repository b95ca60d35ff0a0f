"""Hostile qcow2 images: mutated headers, tables and lengths.

Whatever the file says, opening, reading, writing, flushing and checking it
either works or raises :class:`ImageError` -- no other exception, no hang
(a hypothesis deadline), no allocation sized from the file's claims.
"""

from __future__ import annotations

import io
import random
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemu import img as kemu_img
from kemu.backends.block import ImageError, open_image
from kemu.backends.qcow2 import Qcow2Image, check_qcow2, create_qcow2

CS = 512


def _base_image() -> bytes:
    """A small image with every kind of cluster: data, compressed, zero."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.qcow2"
        create_qcow2(path, 256 * 1024, cluster_size=CS)
        rnd = random.Random(1)
        with Qcow2Image.open(path) as image:
            for i in range(12):
                image.write(rnd.randrange(0, 200_000), rnd.randbytes(rnd.randrange(1, 3000)))
            image.write_compressed(450 * CS, b"z" * CS)
            image.write_compressed(451 * CS, b"y" * 100 + bytes(CS - 100))
            image.write_zeroes(20 * CS, 4 * CS)
        return path.read_bytes()


BASE = _base_image()

#: (offset, struct format) of every header field.
FIELDS = [(4, ">I"), (8, ">Q"), (16, ">I"), (20, ">I"), (24, ">Q"), (32, ">I"), (36, ">I"),
          (40, ">Q"), (48, ">Q"), (56, ">I"), (60, ">I"), (64, ">Q"), (72, ">Q"), (80, ">Q"),
          (88, ">Q"), (96, ">I"), (100, ">I"), (104, ">B")]


def _interesting(bits: int) -> st.SearchStrategy[int]:
    top = (1 << bits) - 1
    picks = [0, 1, 2, 3, 8, 9, 16, 21, 22, 64, 72, 104, 112, 511, 512, CS * 3, CS * 4,
             len(BASE), len(BASE) - CS, len(BASE) + CS, 1 << 20, 1 << 31, 1 << 32, 1 << 40,
             1 << 55, 1 << 62, 1 << 63, top, top - 1]
    return st.one_of(st.sampled_from([p & top for p in picks]), st.integers(0, top))


@st.composite
def header_mutation(draw) -> bytes:
    data = bytearray(BASE)
    for _ in range(draw(st.integers(1, 3))):
        offset, fmt = draw(st.sampled_from(FIELDS))
        value = draw(_interesting(struct.calcsize(fmt) * 8))
        struct.pack_into(fmt, data, offset, value)
    return bytes(data)


def _entry_values() -> st.SearchStrategy[int]:
    aligned = st.integers(0, len(BASE) // CS + 4).map(lambda c: c * CS)
    flags = st.sampled_from([0, 1, 1 << 62, 1 << 63, (1 << 63) | 1, 0x7F00_0000_0000_0000])
    return st.one_of(
        st.builds(lambda o, f: o | f, aligned, flags),
        st.integers(0, (1 << 64) - 1),
        st.sampled_from([0, 1, CS, CS + 1, 1 << 56, (1 << 64) - 1]))


@st.composite
def table_mutation(draw) -> bytes:
    """Overwrite 64-bit entries in the metadata clusters (L1, L2 tables,
    refcount table and blocks all live in the first clusters)."""
    data = bytearray(BASE)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(CS // 8, len(BASE) // 8 - 1)) * 8
        struct.pack_into(">Q", data, pos, draw(_entry_values()))
    return bytes(data)


@st.composite
def byte_mutation(draw) -> bytes:
    data = bytearray(BASE)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data[:cut]) if cut is not None else bytes(data)


def _exercise(data: bytes, tmp: Path) -> None:
    path = tmp / "fuzz.qcow2"
    path.write_bytes(data)
    rnd = random.Random(len(data))
    try:
        with Qcow2Image.open(path, read_only=True) as image:
            for _ in range(4):
                off = rnd.randrange(max(1, image.size))
                image.read(off, min(image.size - off, 20_000))
    except ImageError:
        pass
    try:
        check_qcow2(path)
    except ImageError:
        pass
    try:
        image = open_image(path)
    except ImageError:
        pass
    else:
        try:
            for _ in range(3):
                off = rnd.randrange(max(1, image.size))
                n = min(image.size - off, 3000)
                image.write(off, b"\xee" * n)
                assert image.read(off, n) == b"\xee" * n
            if image.size:
                image.discard(0, min(image.size, 8 * CS))
                image.write_zeroes(0, min(image.size, 5 * CS + 7))
            image.flush()
        except ImageError:
            pass
        finally:
            try:
                image.close()
            except ImageError:
                pass
    out, err = io.StringIO(), io.StringIO()
    for argv in (["info", str(path)], ["check", str(path)], ["info", "--output=json", str(path)]):
        status = kemu_img.main(argv, stdout=out, stderr=err)
        assert isinstance(status, int)
        assert "Traceback" not in err.getvalue()


FUZZ = settings(max_examples=120, deadline=timedelta(seconds=3),
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qcow2fuzz")


def test_base_image_is_clean(tmp):
    path = tmp / "base.qcow2"
    path.write_bytes(BASE)
    result = check_qcow2(path)
    assert (result.corruptions, result.leaks, result.compressed_clusters) == (0, 0, 2)


@FUZZ
@given(header_mutation())
def test_mutated_header(tmp, data):
    _exercise(data, tmp)


@FUZZ
@given(table_mutation())
def test_mutated_tables(tmp, data):
    _exercise(data, tmp)


@FUZZ
@given(byte_mutation())
def test_mutated_bytes_and_truncation(tmp, data):
    _exercise(data, tmp)


@pytest.mark.parametrize("field,value,message", [
    (20, 30, "cluster"),                       # cluster_bits
    (36, 1 << 30, "L1 table too large"),       # l1_size
    (36, 0, "too small"),                      # l1_size below the virtual size
    (40, 12345, "not cluster aligned"),        # l1_table_offset
    (40, 1 << 40, "beyond the end"),
    (56, 1 << 30, "refcount table too large"),
    (48, 0, "overlaps the header"),
    (100, 1 << 20, "header_length"),
    (96, 7, "refcount_order"),
    (4, 4, "version"),
])
def test_hostile_header_fields_have_clear_errors(tmp, field, value, message):
    data = bytearray(BASE)
    fmt = dict(FIELDS)[field]
    struct.pack_into(fmt, data, field, value)
    path = tmp / "bad.qcow2"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=message):
        Qcow2Image.open(path, read_only=True)
