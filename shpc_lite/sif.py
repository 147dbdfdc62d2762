"""Read and write SIF (Singularity Image Format) files, spec version 01, in pure Python.

Why here: the builtin puller must wrap a squashfs in a SIF that Apptainer/Singularity run
without having either installed, and ``inspect`` must find the squashfs inside any SIF. The layout
follows the Go reference (sylabs/sif); ``write_sif`` reproduces its deterministic output byte for
byte (tests/data/sif/golden-create).

A file is: a 128-byte header, ``capacity`` descriptors of 585 bytes from offset 4096, then the data
objects one after another. Only the header and descriptors are ever read; payloads given as paths
are streamed, never loaded in memory (a squashfs may be many GB).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO, Iterator, Optional, Sequence, Tuple, Union

from shpc_lite.errors import SifError

PathLike = Union[str, "os.PathLike[str]"]

MAGIC = b"SIF_MAGIC\0"
VERSION = b"01\0"
APPTAINER_LAUNCH_SCRIPT = "#!/usr/bin/env run-singularity\n"
DESCRIPTORS_OFFSET = 4096
DEFAULT_CAPACITY = 48
# Reading the descriptor table costs its size in memory: a header may claim any count, so bound it
# (4096 descriptors: 2.4 MB, far more objects than any image has).
MAX_DESCRIPTORS = 4096
PARTITION_ALIGNMENT = 4096
#: Go's zero ``time.Time`` in unix seconds: what deterministic images record as their times.
ZERO_TIME = -62135596800

_HEADER = struct.Struct("<32s10s3s3s16s8q")  # launch, magic, version, arch, id, 8 x int64
_DESCRIPTOR = struct.Struct("<i?III7q128s384s")  # type, used, id, group, link, 7 x int64, name, extra
_PARTITION = struct.Struct("<ii3s")  # fs type, partition type, arch
_GROUP_MASK = 0xF0000000  # set in group IDs, and in linked IDs that name a group
_MAX_GROUP = 0x0FFFFFFF
_MAGIC_SLICE = slice(32, 42)
assert _HEADER.size == 128 and _DESCRIPTOR.size == 585


class DataType(IntEnum):
    """Descriptor data types (the file stores them as int32)."""

    DEFFILE = 0x4001
    ENV_VARS = 0x4002
    LABELS = 0x4003
    PARTITION = 0x4004
    SIGNATURE = 0x4005
    GENERIC_JSON = 0x4006
    GENERIC = 0x4007
    CRYPTO_MESSAGE = 0x4008
    SBOM = 0x4009
    OCI_ROOT_INDEX = 0x400A
    OCI_BLOB = 0x400B


class FsType(IntEnum):
    """File system of a partition object."""

    SQUASHFS = 1
    EXT3 = 2
    IMMUTABLE_OBJECT = 3
    RAW = 4
    ENCRYPTED_SQUASHFS = 5


class PartType(IntEnum):
    """Role of a partition object; at most one PRIMARY_SYSTEM per file."""

    SYSTEM = 1
    PRIMARY_SYSTEM = 2
    DATA = 3
    OVERLAY = 4


# Go/OCI architecture names -> the 2-digit SIF code (header and partition extra).
_ARCH_CODES = {
    "386": "01", "amd64": "02", "arm": "03", "arm64": "04", "ppc64": "05", "ppc64le": "06",
    "mips": "07", "mipsle": "08", "mips64": "09", "mips64le": "10", "s390x": "11", "riscv64": "12",
}
_ARCH_NAMES = {code: name for name, code in _ARCH_CODES.items()}
# Kernel (uname -m) spellings that image configs sometimes carry instead of the Go names.
_ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64", "i386": "386", "i686": "386"}
UNKNOWN_ARCH = "unknown"


def sif_arch_code(arch: str) -> str:
    """The SIF code ("02") of a Go/OCI architecture name ("amd64"); SifError if SIF has none."""
    name = _ARCH_ALIASES.get(arch, arch)
    if name not in _ARCH_CODES:
        raise SifError(f"architecture {arch!r} has no SIF code (known: {', '.join(_ARCH_CODES)})")
    return _ARCH_CODES[name]


def _arch_name(raw: bytes) -> str:
    return _ARCH_NAMES.get(_cstr(raw), UNKNOWN_ARCH)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _enum(kind: type, value: int) -> int:
    """``kind(value)`` when known, else the bare int: readers must accept types newer than us."""
    try:
        return kind(value)
    except ValueError:
        return value


# -------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Header:
    """The global header. ``arch`` is the Go name of the primary partition's arch, or "unknown"."""

    launch_script: str
    version: str
    arch: str
    id: uuid.UUID
    created: int
    modified: int
    descriptors_free: int
    descriptors_total: int
    descriptors_offset: int
    descriptors_size: int
    data_offset: int
    data_size: int


@dataclass(frozen=True)
class Descriptor:
    """One used data object descriptor.

    ``group_id`` is the group number (0: in no group). ``linked_id`` is 0 (no link), an object ID,
    or a group number when ``linked_group``. ``size_with_padding`` includes the alignment gap
    before the object. ``fs_type``, ``partition_type`` and ``arch`` are set for partitions only;
    ``extra`` keeps the raw 384 type-specific bytes (signature hash, SBOM format, ...).
    """

    data_type: int
    id: int
    group_id: int
    linked_id: int
    linked_group: bool
    offset: int
    size: int
    size_with_padding: int
    created: int
    modified: int
    name: str
    extra: bytes = bytes(384)
    fs_type: Optional[int] = None
    partition_type: Optional[int] = None
    arch: Optional[str] = None


@dataclass(frozen=True)
class SifImage:
    """A parsed SIF: its header and its used descriptors in file order; ``path`` names it in errors."""

    header: Header
    descriptors: Tuple[Descriptor, ...]
    path: str = ""


@dataclass(frozen=True)
class InPlace:
    """A payload already in the destination file, at the offset ``object_offset`` gives its object
    (e.g. a squashfs written there by ``mksquashfs -offset``): nothing is copied."""

    size: int


@dataclass(frozen=True)
class SifObject:
    """A data object to write.

    ``payload`` is the content as bytes, the path of a file to stream into the SIF, or ``InPlace``.
    ``group`` is the group number (None: no group; default 1 like the Go library); link to an
    object with ``link`` or to a group with ``link_group``. ``alignment`` defaults to 4096 for
    partitions and none for other types. ``created`` overrides the image time for this object.
    ``extra`` is the raw type-specific metadata of non-partition types (partitions build theirs
    from ``fs_type``, ``partition_type`` and ``arch``, a Go/OCI architecture name).
    """

    data_type: int
    payload: Union[bytes, str, "os.PathLike[str]", InPlace]
    name: str = ""
    group: Optional[int] = 1
    link: int = 0
    link_group: int = 0
    alignment: Optional[int] = None
    created: Optional[int] = None
    extra: bytes = b""
    fs_type: int = FsType.SQUASHFS
    partition_type: int = PartType.PRIMARY_SYSTEM
    arch: str = "amd64"

    @property
    def is_primary(self) -> bool:
        return self.data_type == DataType.PARTITION and self.partition_type == PartType.PRIMARY_SYSTEM


# ------------------------------------------------------------------------------------------- reader


def is_sif(path: PathLike) -> bool:
    """Whether ``path`` starts like a SIF (magic only: cheap; ``read_sif`` validates the rest).

    Unreadable or missing files are not SIFs: callers use this to choose how to treat a file.
    """
    try:
        with open(path, "rb") as f:
            return f.read(_MAGIC_SLICE.stop)[_MAGIC_SLICE] == MAGIC
    except OSError:
        return False


def read_sif(path: PathLike) -> SifImage:
    """Parse the header and used descriptors of the SIF at ``path``, reading nothing else.

    Raises SifError naming the file if it is not a SIF, has another spec version, or is truncated
    (header, descriptor table or any object past the end of the file: a cut download or copy).
    """
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            raw_header = f.read(_HEADER.size)
            header = _parse_header(name, raw_header)
            if header.descriptors_total > MAX_DESCRIPTORS:
                raise SifError(f"{name}: corrupt or hostile SIF header ({header.descriptors_total} descriptors; "
                               f"at most {MAX_DESCRIPTORS} are read, SIF files have {DEFAULT_CAPACITY})")
            table_size = header.descriptors_total * _DESCRIPTOR.size
            if header.descriptors_size < table_size:
                raise SifError(f"{name}: corrupt SIF header (descriptor table size {header.descriptors_size} "
                               f"< {header.descriptors_total} descriptors)")
            if header.descriptors_offset + table_size > file_size:
                raise SifError(f"{name}: truncated SIF (descriptor table ends at "
                               f"{header.descriptors_offset + table_size}, file has {file_size} bytes)")
            f.seek(header.descriptors_offset)
            table = f.read(table_size)
    except OSError as err:
        raise SifError(f"{name}: cannot read SIF: {err.strerror or err}") from None
    descriptors = []
    for start in range(0, table_size, _DESCRIPTOR.size):
        desc = _unpack_descriptor(table[start:start + _DESCRIPTOR.size])
        if desc is None:
            continue
        if desc.offset < 0 or desc.size < 0:
            raise SifError(f"{name}: corrupt SIF descriptor {desc.id} (offset {desc.offset}, size {desc.size})")
        if desc.offset + desc.size > file_size:
            raise SifError(f"{name}: truncated SIF (object {desc.id} ends at {desc.offset + desc.size}, "
                           f"file has {file_size} bytes)")
        descriptors.append(desc)
    return SifImage(header, tuple(descriptors), name)


def _parse_header(name: str, raw: bytes) -> Header:
    if len(raw) < _MAGIC_SLICE.stop or raw[_MAGIC_SLICE] != MAGIC:
        raise SifError(f"{name}: not a SIF image (no SIF_MAGIC at offset 32)")
    if len(raw) < _HEADER.size:
        raise SifError(f"{name}: truncated SIF (header is {len(raw)} of {_HEADER.size} bytes)")
    launch, _, version, arch, image_id, *numbers = _HEADER.unpack(raw)
    if version != VERSION:
        raise SifError(f"{name}: unsupported SIF version {_cstr(version)!r} (only 01 is supported)")
    header = Header(_cstr(launch), _cstr(version), _arch_name(arch), uuid.UUID(bytes=image_id), *numbers)
    if min(header.descriptors_free, header.descriptors_total, header.descriptors_offset,
           header.data_offset, header.data_size) < 0 or header.descriptors_free > header.descriptors_total:
        raise SifError(f"{name}: corrupt SIF header (negative or inconsistent counts)")
    return header


def _unpack_descriptor(raw: bytes) -> Optional[Descriptor]:
    """The descriptor in ``raw``, or None for an unused slot."""
    (data_type, used, object_id, group, link, offset, size, padded, created, modified, _uid, _gid,
     name, extra) = _DESCRIPTOR.unpack(raw)
    if not used:
        return None
    partition = {}
    if data_type == DataType.PARTITION:
        fs_type, part_type, arch = _PARTITION.unpack_from(extra)
        partition = dict(fs_type=_enum(FsType, fs_type), partition_type=_enum(PartType, part_type),
                         arch=_arch_name(arch))
    return Descriptor(
        data_type=_enum(DataType, data_type), id=object_id, group_id=group & ~_GROUP_MASK,
        linked_id=link & ~_GROUP_MASK, linked_group=bool(link & _GROUP_MASK),
        offset=offset, size=size, size_with_padding=padded, created=created, modified=modified,
        name=_cstr(name), extra=extra, **partition,
    )


def _pack_descriptor(d: Descriptor) -> bytes:
    group = (d.group_id | _GROUP_MASK) if d.group_id else _GROUP_MASK
    link = (d.linked_id | _GROUP_MASK) if d.linked_group else d.linked_id
    return _DESCRIPTOR.pack(d.data_type, True, d.id, group, link, d.offset, d.size, d.size_with_padding,
                            d.created, d.modified, 0, 0, d.name.encode(), d.extra)


def primary_partition(image: SifImage) -> Descriptor:
    """The primary system partition (the container's root file system); SifError if there is none."""
    for desc in image.descriptors:
        if desc.data_type == DataType.PARTITION and desc.partition_type == PartType.PRIMARY_SYSTEM:
            return desc
    raise SifError(f"{image.path or 'SIF image'}: no primary system partition")


def partition_offset(image: SifImage) -> int:
    """File offset of the primary partition: where ``unsquashfs -o`` or a loop mount starts."""
    return primary_partition(image).offset


def read_data(path: PathLike, descriptor: Descriptor, max_size: Optional[int] = None) -> bytes:
    """The bytes of one (small) object, e.g. the deffile or a JSON object. Not for partitions.

    With ``max_size``, an object larger than that is refused (SifError) rather than read."""
    if max_size is not None and descriptor.size > max_size:
        raise SifError(f"{os.fspath(path)}: object {descriptor.id} ({descriptor.name or 'unnamed'}) is "
                       f"{descriptor.size} bytes, more than the {max_size} expected")
    try:
        with open(path, "rb") as f:
            f.seek(descriptor.offset)
            data = f.read(descriptor.size)
    except OSError as err:
        raise SifError(f"{os.fspath(path)}: cannot read SIF: {err.strerror or err}") from None
    if len(data) != descriptor.size:
        raise SifError(f"{os.fspath(path)}: truncated SIF (object {descriptor.id})")
    return data


# ------------------------------------------------------------------------------------------- writer


def write_sif(
    dest: Union[PathLike, BinaryIO],
    objects: Sequence[SifObject],
    *,
    launch_script: str = "",
    id: Union[uuid.UUID, str, None] = None,
    created: Optional[int] = None,
    modified: Optional[int] = None,
    descriptor_capacity: int = DEFAULT_CAPACITY,
    deterministic: bool = False,
) -> SifImage:
    """Write a SIF holding ``objects`` (in order, IDs 1..n) to a path or a seekable binary file.

    As in the Go library: the ID is random and the times are now, unless ``deterministic`` (zero
    ID, Go's zero time) or given explicitly (which wins over ``deterministic``); ``modified``
    defaults to ``created``; the header arch is the primary partition's. A path is created with
    mode 0o755 (less umask) because the launch script makes a SIF executable; a file object is
    emptied first. Returns what was written.
    """
    name = str(os.fspath(dest) if isinstance(dest, (str, os.PathLike)) else getattr(dest, "name", "SIF"))
    launch = launch_script.encode()
    if len(launch) >= 32:
        raise SifError(f"{name}: launch script too long ({len(launch)} bytes, at most 31)")
    if descriptor_capacity > MAX_DESCRIPTORS:
        raise SifError(f"{name}: descriptor capacity {descriptor_capacity} is more than {MAX_DESCRIPTORS}")
    if len(objects) > descriptor_capacity:
        raise SifError(f"{name}: {len(objects)} objects exceed the descriptor capacity {descriptor_capacity}")
    primaries = [obj for obj in objects if obj.is_primary]
    if len(primaries) > 1:
        raise SifError(f"{name}: more than one primary system partition")
    arch = sif_arch_code(primaries[0].arch) if primaries else "00"
    image_id = _image_id(name, id, deterministic)
    when = created if created is not None else (ZERO_TIME if deterministic else int(time.time()))
    data_offset = DESCRIPTORS_OFFSET + descriptor_capacity * _DESCRIPTOR.size

    planned = [_plan(name, obj, when) for obj in objects]  # every check before the file is touched
    in_place = any(isinstance(obj.payload, InPlace) for obj in objects)
    if in_place and not isinstance(dest, (str, os.PathLike)):
        raise SifError(f"{name}: an in-place payload needs the SIF's path")

    with _open_dest(dest, name, keep=in_place) as f:
        end = data_offset
        descriptors = []
        for index, (obj, (alignment, fields)) in enumerate(zip(objects, planned), start=1):
            offset = _next_aligned(end, alignment)
            size = _write_payload(f, obj.payload, offset, name)
            # Packed and parsed back so that the result reads exactly as read_sif would read it.
            descriptors.append(_unpack_descriptor(_pack_descriptor(Descriptor(
                id=index, offset=offset, size=size, size_with_padding=offset - end + size, **fields))))
            end = offset + size
        header = Header(
            launch_script=launch_script, version="01", arch=_ARCH_NAMES.get(arch, UNKNOWN_ARCH), id=image_id,
            created=when, modified=modified if modified is not None else when,
            descriptors_free=descriptor_capacity - len(objects), descriptors_total=descriptor_capacity,
            descriptors_offset=DESCRIPTORS_OFFSET, descriptors_size=descriptor_capacity * _DESCRIPTOR.size,
            data_offset=data_offset, data_size=end - data_offset,
        )
        table = b"".join(_pack_descriptor(d) for d in descriptors)
        f.seek(DESCRIPTORS_OFFSET)
        f.write(table + bytes(header.descriptors_size - len(table)))
        f.seek(0)
        f.write(_HEADER.pack(
            launch, MAGIC, VERSION, arch.encode() + b"\0", image_id.bytes, header.created, header.modified,
            header.descriptors_free, header.descriptors_total, header.descriptors_offset,
            header.descriptors_size, header.data_offset, header.data_size,
        ))
    return SifImage(header, tuple(descriptors), name)


def build_container_sif(
    dest_path: PathLike,
    squashfs_path: Union[PathLike, InPlace],
    *,
    deffile: bytes,
    json_objects: "dict[str, bytes]",
    arch: str,
    id: Union[uuid.UUID, str, None] = None,
    created: Optional[int] = None,
    deterministic: bool = False,
) -> SifImage:
    """Write the SIF Apptainer's build writes: deffile, generic JSON objects sorted by name, then
    the squashfs as primary system partition for ``arch`` (Go/OCI name), with the
    run-singularity launch script, so Apptainer and Singularity treat it as one of their own.

    Writes ``dest_path`` in place; the caller makes it atomic (temp file + rename).
    """
    objects = _container_objects(squashfs_path, deffile, json_objects, arch)
    return write_sif(dest_path, objects, launch_script=APPTAINER_LAUNCH_SCRIPT, id=id, created=created,
                     deterministic=deterministic)


def container_partition_offset(*, deffile: bytes, json_objects: "dict[str, bytes]", arch: str) -> int:
    """Where ``build_container_sif`` with these objects puts the squashfs: a builder can write it
    there first (``mksquashfs -offset``) and pass ``InPlace(size)``, so it is never copied."""
    objects = _container_objects(InPlace(0), deffile, json_objects, arch)
    return object_offset(objects, len(objects) - 1)


def _container_objects(squashfs: Union[PathLike, InPlace], deffile: bytes, json_objects: "dict[str, bytes]",
                       arch: str) -> "list[SifObject]":
    objects = [SifObject(DataType.DEFFILE, deffile)]
    objects += [SifObject(DataType.GENERIC_JSON, json_objects[key], name=key) for key in sorted(json_objects)]
    objects.append(SifObject(DataType.PARTITION, squashfs, fs_type=FsType.SQUASHFS,
                             partition_type=PartType.PRIMARY_SYSTEM, arch=arch))
    return objects


def _image_id(name: str, value: Union[uuid.UUID, str, None], deterministic: bool) -> uuid.UUID:
    if value is None:
        return uuid.UUID(int=0) if deterministic else uuid.uuid4()
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    except ValueError:
        raise SifError(f"{name}: invalid image ID {value!r} (not a UUID)") from None


def _plan(name: str, obj: SifObject, when: int) -> "Tuple[int, dict]":
    """The alignment and the layout-independent Descriptor fields of ``obj``, checked."""
    if obj.group is not None and not 0 < obj.group <= _MAX_GROUP:
        raise SifError(f"{name}: invalid object group {obj.group} (1 to {_MAX_GROUP}, or None)")
    if obj.link and obj.link_group:
        raise SifError(f"{name}: an object links to an object or to a group, not both")
    if len(obj.name.encode()) > 128:
        raise SifError(f"{name}: object name {obj.name[:40]!r}... longer than 128 bytes")
    alignment = obj.alignment if obj.alignment is not None else (
        PARTITION_ALIGNMENT if obj.data_type == DataType.PARTITION else 0)
    stamp = obj.created if obj.created is not None else when
    return alignment, dict(
        data_type=obj.data_type, group_id=obj.group or 0, linked_id=obj.link_group or obj.link,
        linked_group=bool(obj.link_group), created=stamp, modified=stamp, name=obj.name, extra=_extra(name, obj))


def _extra(name: str, obj: SifObject) -> bytes:
    """The 384 type-specific bytes: built for partitions, given (zero-padded) for other types."""
    if obj.data_type == DataType.PARTITION:
        raw = _PARTITION.pack(obj.fs_type, obj.partition_type, sif_arch_code(obj.arch).encode() + b"\0")
    else:
        raw = obj.extra
    if len(raw) > 384:
        raise SifError(f"{name}: object metadata longer than 384 bytes")
    return raw + bytes(384 - len(raw))


def _next_aligned(offset: int, alignment: int) -> int:
    """The first offset >= ``offset`` that is a multiple of ``alignment`` (0 or 1: no alignment)."""
    if alignment <= 1:
        return offset
    return -(-offset // alignment) * alignment


def object_offset(objects: Sequence[SifObject], index: int,
                  descriptor_capacity: int = DEFAULT_CAPACITY) -> int:
    """Where ``write_sif`` puts ``objects[index]`` (0-based): the objects before it must have bytes
    payloads. What an ``InPlace`` payload is written at beforehand."""
    end = DESCRIPTORS_OFFSET + descriptor_capacity * _DESCRIPTOR.size
    for obj in objects[:index + 1]:
        alignment = obj.alignment if obj.alignment is not None else (
            PARTITION_ALIGNMENT if obj.data_type == DataType.PARTITION else 0)
        offset = _next_aligned(end, alignment)
        if obj is objects[index]:
            return offset
        if not isinstance(obj.payload, (bytes, bytearray, memoryview)):
            raise SifError("object_offset: objects before the one asked for must be bytes")
        end = offset + len(obj.payload)
    raise IndexError(index)


@contextlib.contextmanager
def _open_dest(dest: Union[PathLike, BinaryIO], name: str, keep: bool = False) -> Iterator[BinaryIO]:
    """``dest`` itself if it is a file object, else the path opened (not emptied when ``keep``:
    it holds an in-place payload); OSError becomes SifError."""
    try:
        if isinstance(dest, (str, os.PathLike)):
            flags = os.O_WRONLY | os.O_CREAT | (0 if keep else os.O_TRUNC)
            with open(os.open(dest, flags, 0o755), "r+b" if keep else "wb") as f:
                yield f
        else:
            dest.seek(0)
            dest.truncate()  # the gaps are never written: they must read as zeros
            yield dest
    except OSError as err:
        raise SifError(f"{name}: cannot write SIF: {err.strerror or err}") from None


def _write_payload(f: BinaryIO, payload: Union[bytes, str, "os.PathLike[str]", InPlace], offset: int,
                   name: str) -> int:
    """Put ``payload`` at ``offset`` of ``f``; returns its size. Files are streamed, never loaded."""
    if isinstance(payload, InPlace):
        have = os.fstat(f.fileno()).st_size
        if have != offset + payload.size:
            raise SifError(f"{name}: in-place payload of {payload.size} bytes at {offset} does not end the "
                           f"file ({have} bytes)")
        return payload.size
    f.seek(offset)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return f.write(payload)
    try:
        with open(payload, "rb") as src:
            copied = _copy_in_kernel(src, f, offset)
            if copied is None:
                shutil.copyfileobj(src, f, 1 << 20)
                return f.tell() - offset
    except OSError as err:
        raise SifError(f"{name}: cannot copy {os.fspath(payload)} into the SIF: {err.strerror or err}") from None
    f.seek(offset + copied)
    return copied


# copy_file_range errors meaning "not between these two files": fall back to a plain copy.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def _copy_in_kernel(src: BinaryIO, dst: BinaryIO, offset: int) -> Optional[int]:
    """Copy ``src`` to ``dst`` at ``offset`` with copy_file_range; None if that is not possible.

    Why: no user-space copy of a multi-GB squashfs, and server-side copies on NFS 4.2 or reflinks
    on XFS/btrfs. ``dst`` may be any file object, so one without a file descriptor (BytesIO) or on
    a file system without support gets None and the caller copies by chunks.
    """
    if not hasattr(os, "copy_file_range"):
        return None
    try:
        dst_fd = dst.fileno()
        dst.flush()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return None
    copied = 0
    while True:
        try:
            n = os.copy_file_range(src.fileno(), dst_fd, 1 << 30, offset_dst=offset + copied)
        except OSError as err:
            if copied == 0 and err.errno in _NO_KERNEL_COPY:
                return None
            raise
        if n == 0:
            return copied
        copied += n
