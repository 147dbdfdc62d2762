"""The fast tar header reader (shpc_lite/pull/ustar.py) against Python's tarfile: the same members,
the same offsets, the same errors, on archives of every format and on damaged ones."""

from __future__ import annotations

import io
import tarfile
from typing import Any, List, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shpc_lite.pull.layers import _LayerTarInfo, _Sequential
from shpc_lite.pull.ustar import next_member, parse_header

FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname", "gname",
          "devmajor", "devminor", "offset", "offset_data", "sparse", "pax_headers")


def read_all(data: bytes, fast: bool, seekable: bool = False) -> Tuple[List[Any], int]:
    """Every member's fields (and the error that stopped reading, if any) and how often the fast
    path handed over to tarfile."""
    fileobj = io.BufferedReader(io.BytesIO(data)) if seekable else _Sequential(io.BytesIO(data))
    out: List[Any] = []
    fallbacks = 0
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:", tarinfo=_LayerTarInfo)  # type: ignore[call-overload]
        plain_next = tf.next

        def counted_next():
            nonlocal fallbacks
            fallbacks += 1
            return plain_next()

        tf.next = counted_next  # type: ignore[method-assign]
        while True:
            member = next_member(tf, fileobj) if fast else tf.next()
            if member is None:
                break
            out.append(tuple(getattr(member, f) for f in FIELDS) + (getattr(member, "sparse_data", None), tf.offset))
            tf.members.clear()
    except Exception as exc:  # noqa: BLE001 - the error is what is compared
        out.append(("error", type(exc).__name__, str(exc)))
    return out, fallbacks


def agree(data: bytes) -> int:
    """Assert both readers see ``data`` the same way; return the fast reader's fallbacks."""
    slow, _ = read_all(data, fast=False)
    fast, fallbacks = read_all(data, fast=True)
    assert fast == slow
    assert read_all(data, fast=True, seekable=True)[0] == read_all(data, fast=False, seekable=True)[0]
    return fallbacks


def tar_of(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs) -> Tuple[tarfile.TarInfo, Any]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti, data if kind == tarfile.REGTYPE else None


PLAIN = [
    entry("usr", tarfile.DIRTYPE, mode=0o755),
    entry("usr/bin/tool", data=b"#!/bin/sh\n" * 300, mode=0o4755, uid=1000, gid=100, mtime=1_700_000_000),
    entry("usr/bin/link", tarfile.SYMTYPE, linkname="tool"),
    entry("usr/bin/hard", tarfile.LNKTYPE, linkname="usr/bin/tool"),
    entry("etc/empty", data=b""),
    entry("etc/.wh.gone"),
]


def test_plain_archive_is_read_without_tarfile():
    """The common headers are parsed by the fast path (tarfile only reads the first member and the end)."""
    data = tar_of(PLAIN, tarfile.USTAR_FORMAT)
    assert agree(data) == 2  # the first member (read by tarfile.open) and the end-of-archive block


def test_odd_headers_fall_back_and_agree():
    long = "d/" * 60 + "file"  # over 100 bytes: a ustar prefix, a pax record or a GNU long name
    odd = [
        entry(long, data=b"x"),
        entry("caf\u00e9/na\u00efve", data=b"y"),
        entry("big-uid", uid=8 ** 8, data=b"z"),  # base-256 (GNU) or a pax record
        entry("fifo", tarfile.FIFOTYPE),
        entry("dev", tarfile.CHRTYPE, devmajor=1, devminor=3),
        entry("old-dir/", tarfile.AREGTYPE),  # V7 directory
        entry("link-long", tarfile.SYMTYPE, linkname="t/" * 70),
        entry("cont", tarfile.CONTTYPE, data=b""),
    ]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        entries = odd if fmt != tarfile.USTAR_FORMAT else [e for e in odd if e[0].name not in ("big-uid", "link-long")]
        agree(tar_of(PLAIN + entries + PLAIN, fmt))


def test_global_pax_header_leaves_the_rest_to_tarfile():
    """A global pax header changes every later member: the fast path must not read past it."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"uid": "77"}) as tf:
        for ti, data in PLAIN:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    slow, _ = read_all(raw.getvalue(), fast=False)
    assert all(m[2] == 77 for m in slow)
    agree(raw.getvalue())


def header_of(name: str = "f", size: int = 3) -> bytearray:
    ti = tarfile.TarInfo(name)
    ti.size = size
    return bytearray(ti.tobuf(tarfile.USTAR_FORMAT))


def fix_checksum(block: bytearray, signed: bool = False) -> bytearray:
    block[148:156] = b" " * 8
    total = sum((b - 256 if signed and b > 127 else b) for b in block)
    block[148:156] = b"%06o\0 " % (total & 0o777777)
    return block


def test_parse_header_table():
    """Single headers the fast path must leave to tarfile (None) or read exactly as tarfile does."""
    good = header_of()
    ti = parse_header(bytes(good), tarfile.TarInfo, "utf-8", "surrogateescape")
    assert ti is not None and (ti.name, ti.size) == ("f", 3)
    cases = {
        "bad checksum": bytearray(good[:148]) + b"0000000\0" + good[156:],
        "end block": bytearray(512),
        "short block": good[:300],
        "signed-only checksum": fix_checksum(header_of("caf\u00e9"), signed=True),
        "base-256 size": fix_checksum(bytearray(good[:124]) + b"\x80" + b"\0" * 10 + b"\x03" + good[136:]),
        "0o prefix": fix_checksum(bytearray(good[:124]) + b"0o000000003\0" + good[136:]),
        "underscore": fix_checksum(bytearray(good[:124]) + b"0000000_003\0" + good[136:]),
        "tab": fix_checksum(bytearray(good[:124]) + b"\t0000000003\0" + good[136:]),
        "pax type": fix_checksum(bytearray(good[:156]) + b"x" + good[157:]),
        "GNU long name type": fix_checksum(bytearray(good[:156]) + b"L" + good[157:]),
        "sparse type": fix_checksum(bytearray(good[:156]) + b"S" + good[157:]),
    }
    for label, block in cases.items():
        assert parse_header(bytes(block), tarfile.TarInfo, "utf-8", "surrogateescape") is None, label
        agree(bytes(header_of("first")) + b"abc".ljust(512, b"\0") + bytes(block) + b"\0" * 2048)
    # numbers with spaces, empty fields and trailing garbage after the NUL are read as tarfile reads them
    spaced = fix_checksum(bytearray(good[:124]) + b"   3 \0garbag" + good[136:329] + b"\0" * 16 + good[345:])
    ti = parse_header(bytes(spaced), tarfile.TarInfo, "utf-8", "surrogateescape")
    assert ti is not None and (ti.size, ti.devmajor, ti.devminor) == (3, 0, 0)
    agree(bytes(header_of("first")) + b"abc".ljust(512, b"\0") + bytes(spaced) + b"abc".ljust(512, b"\0") + b"\0" * 1024)


names = st.text(st.sampled_from("ab/.\u00e9\udcff-"), min_size=1, max_size=130)
kinds = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.FIFOTYPE, tarfile.CHRTYPE])


@st.composite
def archives(draw) -> bytes:
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    entries = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(kinds)
        data = draw(st.binary(max_size=700)) if kind == tarfile.REGTYPE else b""
        ti, payload = entry(draw(names), kind, data, mode=draw(st.integers(0, 0o7777)),
                            uid=draw(st.sampled_from([0, 1000, 2**21 - 1, 2**21])),
                            mtime=draw(st.sampled_from([0, 1_700_000_000, 8 ** 11 - 1])),
                            linkname=draw(names) if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "")
        entries.append((ti, payload))
    try:
        data = bytearray(tar_of(entries, fmt))
    except (ValueError, UnicodeError):  # a name or number this format cannot hold
        data = bytearray(tar_of(entries[:0], fmt))
    # damage: bytes overwritten anywhere (headers included), then maybe a truncation
    for _ in range(draw(st.integers(0, 3))):
        if data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        # recompute the damaged header checksums, so the damage reaches the field parsers
        for off in range(0, len(data) - 511, 512):
            block = data[off:off + 512]
            if block[257:262] == b"ustar":
                data[off:off + 512] = fix_checksum(bytearray(block))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives())
def test_fast_reader_agrees_with_tarfile(data):
    agree(data)
