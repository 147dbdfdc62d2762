"""shpc_lite.sif against the Go reference: its golden files byte for byte, its test images, and
(when installed) its CLI ``siftool`` and squashfs-tools reading what we write."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from shpc_lite.errors import SifError
from shpc_lite.sif import (
    APPTAINER_LAUNCH_SCRIPT,
    ZERO_TIME,
    DataType,
    FsType,
    PartType,
    SifObject,
    build_container_sif,
    is_sif,
    partition_offset,
    primary_partition,
    read_data,
    read_sif,
    sif_arch_code,
    write_sif,
)
from tests.needs import missing, requires

DATA = Path(__file__).resolve().parent / "data" / "sif"
GOLDEN = DATA / "golden-create"
REFERENCE = DATA / "reference-images"
REFERENCE_IMAGES = sorted(p.name for p in REFERENCE.glob("*.sif"))


def _partition_386(payload: bytes, **kw) -> SifObject:
    return SifObject(DataType.PARTITION, payload, fs_type=FsType.SQUASHFS, partition_type=PartType.PRIMARY_SYSTEM,
                     arch="386", **kw)


# The inputs of sylabs/sif TestCreateContainer (create_test.go), all with OptCreateDeterministic.
GOLDEN_CASES = {
    "Empty": ([], {}),
    "EmptyCloseOnUnload": ([], {}),  # close-on-unload is Go API behaviour, not file content
    "EmptyDescriptorLimitedCapacity": ([], {"descriptor_capacity": 1}),
    "EmptyLaunchScript": ([], {"launch_script": "#!/usr/bin/env launch-script\n"}),
    "EmptyWithID": ([], {"id": "de170c43-36ab-44a8-bca9-1ea1a070a274"}),
    "EmptyWithTime": ([], {"created": 946702800}),
    "OneDescriptor": ([SifObject(DataType.GENERIC, b"\xfa\xce")], {}),
    "TwoDescriptors": ([SifObject(DataType.GENERIC, b"\xfa\xce"), _partition_386(b"\xfe\xed")], {}),
    "TwoDescriptorsNotAligned": (
        [SifObject(DataType.GENERIC, b"\xfa\xce", alignment=0), _partition_386(b"\xfe\xed", alignment=0)], {}),
    "TwoDescriptorsAligned": (
        [SifObject(DataType.GENERIC, b"\xfa\xce", alignment=4), _partition_386(b"\xfe\xed", alignment=4)], {}),
}


def test_every_golden_file_has_a_case():
    assert sorted(GOLDEN_CASES) == sorted(p.stem for p in GOLDEN.glob("*.golden"))


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_bytes(name, tmp_path):
    objects, options = GOLDEN_CASES[name]
    expected = (GOLDEN / f"{name}.golden").read_bytes()
    buffer = io.BytesIO()
    write_sif(buffer, objects, deterministic=True, **options)
    assert buffer.getvalue() == expected
    # The same through a path (the kernel-copy path for file payloads, too).
    payloads = []
    for i, obj in enumerate(objects):
        src = tmp_path / f"payload{i}"
        src.write_bytes(obj.payload)
        payloads.append(dataclasses.replace(obj, payload=src))
    write_sif(tmp_path / "out.sif", payloads, deterministic=True, **options)
    assert (tmp_path / "out.sif").read_bytes() == expected


def test_golden_two_descriptors_reads_back():
    image = read_sif(GOLDEN / "TwoDescriptors.golden")
    assert image.header.arch == "386"
    assert image.header.created == image.header.modified == ZERO_TIME
    assert image.header.id == uuid.UUID(int=0)
    generic, part = image.descriptors
    assert (generic.data_type, generic.offset, generic.size, generic.group_id) == (DataType.GENERIC, 32176, 2, 1)
    assert (part.offset, part.size, part.size_with_padding) == (32768, 2, 32768 - 32178 + 2)
    assert (part.fs_type, part.partition_type, part.arch) == (FsType.SQUASHFS, PartType.PRIMARY_SYSTEM, "386")
    assert partition_offset(image) == 32768


# ------------------------------------------------------------------------------------ reference images


@pytest.mark.parametrize("name", REFERENCE_IMAGES)
def test_reference_image_parses(name):
    path = REFERENCE / name
    assert is_sif(path)
    image = read_sif(path)
    assert image.header.version == "01"
    assert len(image.descriptors) == image.header.descriptors_total - image.header.descriptors_free
    assert [d.id for d in image.descriptors] == sorted(d.id for d in image.descriptors)


def test_reference_generic_json():
    """What ``siftool header`` / ``siftool info 1`` report for one-object-generic-json.sif."""
    path = REFERENCE / "one-object-generic-json.sif"
    image = read_sif(path)
    h = image.header
    assert (h.launch_script, h.arch, h.descriptors_free, h.descriptors_total) == ("", "unknown", 47, 48)
    assert (h.descriptors_offset, h.data_offset, h.data_size) == (4096, 32176, 2)
    (d,) = image.descriptors
    assert (d.data_type, d.id, d.group_id, d.linked_id, d.offset, d.size, d.name) == (
        DataType.GENERIC_JSON, 1, 1, 0, 32176, 2, "data.json")
    assert d.fs_type is None
    assert read_data(path, d) == b"{}"
    with pytest.raises(SifError, match="one-object-generic-json.sif: no primary system partition"):
        primary_partition(image)


def test_reference_two_groups_signed():
    image = read_sif(REFERENCE / "two-groups-signed-pgp.sif")
    ext3, sig1, sig2 = image.descriptors[2:]
    assert (ext3.group_id, ext3.fs_type, ext3.partition_type, ext3.arch, ext3.offset, ext3.size) == (
        2, FsType.EXT3, PartType.SYSTEM, "amd64", 40960, 262144)
    assert (sig1.data_type, sig1.group_id, sig1.linked_id, sig1.linked_group) == (DataType.SIGNATURE, 0, 1, True)
    assert (sig2.linked_id, sig2.linked_group) == (2, True)
    assert partition_offset(image) == 36864


def test_reference_times_and_ids():
    assert read_sif(REFERENCE / "one-object-time.sif").header.created == 1593475316  # 2020-06-30 00:01:56 UTC
    assert read_sif(REFERENCE / "empty-id.sif").header.id == uuid.UUID("3fa802cc-358b-45e3-bcc0-69dc7a45f9f8")
    assert read_sif(REFERENCE / "empty-launch-script.sif").header.launch_script == "#!/usr/bin/env run-script\n"
    legacy = read_sif(REFERENCE / "one-group-signed-legacy.sif")
    assert legacy.header.data_offset == 32768 and legacy.descriptors[2].linked_id == 2
    assert not legacy.descriptors[2].linked_group


def _siftool_rows(path: Path) -> list:
    out = subprocess.run(["siftool", "list", str(path)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines()[3:]:
        object_id, group, link, position, _ = (cell.strip() for cell in line.split("|"))
        start, end = position.split("-")
        rows.append((int(object_id), 0 if group == "NONE" else int(group),
                     0 if link == "NONE" else int(link.split()[0]), link.endswith("(G)"), int(start), int(end)))
    return rows


@requires(shutil.which("siftool"), reason="siftool (Debian package siftool) is not on PATH")
@pytest.mark.parametrize("name", REFERENCE_IMAGES)
def test_reference_image_matches_siftool_list(name):
    image = read_sif(REFERENCE / name)
    ours = [(d.id, d.group_id, d.linked_id, d.linked_group, d.offset, d.offset + d.size) for d in image.descriptors]
    assert ours == _siftool_rows(REFERENCE / name)


# ---------------------------------------------------------------------------------------- bad input


def test_not_a_sif(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a container image at all\n" * 10)
    assert not is_sif(path)
    assert not is_sif(tmp_path / "missing.sif")
    with pytest.raises(SifError, match=r"notes\.txt: not a SIF image"):
        read_sif(path)
    with pytest.raises(SifError, match=r"missing\.sif: cannot read SIF"):
        read_sif(tmp_path / "missing.sif")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SifError, match="not a SIF image"):
        read_sif(tmp_path / "empty")


@pytest.mark.parametrize("cut, message", [
    (100, "header is 100 of 128 bytes"),
    (5000, "descriptor table ends at 32176"),
    (32769, "object 2 ends at 32770, file has 32769 bytes"),
])
def test_truncated(tmp_path, cut, message):
    path = tmp_path / "cut.sif"
    path.write_bytes((GOLDEN / "TwoDescriptors.golden").read_bytes()[:cut])
    assert is_sif(path)
    with pytest.raises(SifError, match=rf"cut\.sif: truncated SIF \(.*{message}") as info:
        read_sif(path)
    assert "\n" not in str(info.value)


def test_bad_version(tmp_path):
    data = bytearray((GOLDEN / "Empty.golden").read_bytes())
    data[42:45] = b"02\0"
    (tmp_path / "v2.sif").write_bytes(bytes(data))
    with pytest.raises(SifError, match=r"v2\.sif: unsupported SIF version '02'"):
        read_sif(tmp_path / "v2.sif")


def test_corrupt_counts(tmp_path):
    data = bytearray((GOLDEN / "Empty.golden").read_bytes())
    data[80:88] = (49).to_bytes(8, "little")  # more free than total descriptors
    (tmp_path / "bad.sif").write_bytes(bytes(data))
    with pytest.raises(SifError, match=r"bad\.sif: corrupt SIF header"):
        read_sif(tmp_path / "bad.sif")


@pytest.mark.parametrize("objects, options, message", [
    ([SifObject(DataType.GENERIC, b"x")] * 2, {"descriptor_capacity": 1}, "exceed the descriptor capacity 1"),
    ([_partition_386(b"a"), _partition_386(b"b")], {}, "more than one primary system partition"),
    ([], {"launch_script": "#!/usr/bin/env a-very-long-launcher\n"}, "launch script too long"),
    ([SifObject(DataType.PARTITION, b"a", arch="vax")], {}, "architecture 'vax' has no SIF code"),
    ([SifObject(DataType.GENERIC, b"a", name="n" * 129)], {}, "longer than 128 bytes"),
    ([SifObject(DataType.GENERIC, b"a", group=0)], {}, "invalid object group 0"),
    ([SifObject(DataType.GENERIC, b"a", link=1, link_group=1)], {}, "not both"),
    ([], {"id": "not-a-uuid"}, "invalid image ID"),
])
def test_write_refuses(objects, options, message):
    with pytest.raises(SifError, match=message):
        write_sif(io.BytesIO(), objects, **options)


def test_write_checks_before_touching_the_file(tmp_path):
    dest = tmp_path / "out.sif"
    with pytest.raises(SifError, match="architecture 'vax'"):
        write_sif(dest, [SifObject(DataType.GENERIC, b"a"), SifObject(DataType.PARTITION, b"b", arch="vax")])
    assert not dest.exists()


def test_write_missing_payload_names_it(tmp_path):
    with pytest.raises(SifError, match=r"out\.sif: cannot copy .*nope\.squashfs into the SIF"):
        write_sif(tmp_path / "out.sif", [SifObject(DataType.PARTITION, tmp_path / "nope.squashfs")])


# ---------------------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    squashfs = tmp_path / "big.squashfs"
    chunk = bytes(range(256)) * 4096  # 5 MiB + 3 bytes: several copy chunks and an odd size
    with open(squashfs, "wb") as f:
        for _ in range(5):
            f.write(chunk)
        f.write(b"end")
    objects = [
        SifObject(DataType.DEFFILE, b"bootstrap: docker\n"),
        SifObject(DataType.GENERIC_JSON, b'{"a": 1}', name="a.json", group=None, link=1),
        SifObject(DataType.LABELS, b"{}", group=3, link_group=1, created=1234, extra=b"\x07"),
        SifObject(DataType.PARTITION, squashfs, fs_type=FsType.SQUASHFS, partition_type=PartType.PRIMARY_SYSTEM,
                  arch="arm64"),
    ]
    dest = tmp_path / "out.sif"
    written = write_sif(dest, objects, launch_script=APPTAINER_LAUNCH_SCRIPT, created=1700000000,
                        modified=1700000001, descriptor_capacity=8)
    image = read_sif(dest)
    assert image == written
    h = image.header
    assert (h.launch_script, h.arch, h.created, h.modified, h.descriptors_free) == (
        APPTAINER_LAUNCH_SCRIPT, "arm64", 1700000000, 1700000001, 4)
    assert h.id != uuid.UUID(int=0)
    deffile, js, labels, part = image.descriptors
    assert (js.group_id, js.linked_id, js.linked_group, js.name) == (0, 1, False, "a.json")
    assert (labels.group_id, labels.linked_id, labels.linked_group, labels.created) == (3, 1, True, 1234)
    assert labels.extra[:2] == b"\x07\x00" and deffile.created == 1700000000
    assert [read_data(dest, d) for d in (deffile, js, labels)] == [b"bootstrap: docker\n", b'{"a": 1}', b"{}"]
    assert part.offset % 4096 == 0 and part.offset == partition_offset(image)
    assert part.size == squashfs.stat().st_size and part.arch == "arm64"
    assert h.data_offset + h.data_size == part.offset + part.size == dest.stat().st_size
    with open(dest, "rb") as f, open(squashfs, "rb") as src:
        f.seek(part.offset)
        assert f.read() == src.read()
    assert dest.stat().st_mode & 0o100  # executable thanks to the launch script


@pytest.mark.parametrize("mode", ["kernel copy", "kernel refuses (EXDEV)", "no file descriptor"])
def test_file_payload_is_streamed(tmp_path, monkeypatch, mode):
    """Each way of copying a payload file gives the same bytes; none reads it whole."""
    payload = tmp_path / "rootfs.squashfs"
    payload.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    calls = []
    real = os.copy_file_range

    def copy_file_range(*args, **kwargs):
        calls.append(args[2])
        if mode.startswith("kernel refuses"):
            raise OSError(errno.EXDEV, "cross-device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    dest = io.BytesIO() if mode == "no file descriptor" else open(tmp_path / "out.sif", "w+b")
    with dest:
        image = write_sif(dest, [SifObject(DataType.GENERIC, b"abc"), _partition_386(payload)])
        dest.seek(partition_offset(image))
        assert dest.read() == payload.read_bytes()
    assert primary_partition(image).size == payload.stat().st_size
    assert bool(calls) == (mode != "no file descriptor")


def test_write_into_file_object_truncates_old_content(tmp_path):
    path = tmp_path / "reused.sif"
    path.write_bytes(b"\xff" * 40000)
    with open(path, "r+b") as f:
        write_sif(f, [], deterministic=True)
    assert path.read_bytes() == (GOLDEN / "Empty.golden").read_bytes()


def test_arch_codes():
    assert [sif_arch_code(a) for a in ("386", "amd64", "arm64", "ppc64le", "s390x", "riscv64")] == [
        "01", "02", "04", "06", "11", "12"]
    assert sif_arch_code("x86_64") == "02" and sif_arch_code("aarch64") == "04"


def test_build_container_sif_layout(tmp_path):
    squashfs = tmp_path / "rootfs.squashfs"
    squashfs.write_bytes(b"hsqs" + bytes(100))
    dest = tmp_path / "c.sif"
    build_container_sif(dest, squashfs, deffile=b"bootstrap: docker\nfrom: x\n",
                        json_objects={"z.json": b"{}", "oci-config.json": b'{"Env": []}'}, arch="ppc64le",
                        deterministic=True)
    image = read_sif(dest)
    assert [(d.data_type, d.name) for d in image.descriptors] == [
        (DataType.DEFFILE, ""), (DataType.GENERIC_JSON, "oci-config.json"), (DataType.GENERIC_JSON, "z.json"),
        (DataType.PARTITION, "")]
    assert image.header.launch_script == APPTAINER_LAUNCH_SCRIPT and image.header.arch == "ppc64le"
    assert image.header.id == uuid.UUID(int=0)
    part = primary_partition(image)
    assert (part.fs_type, part.partition_type, part.offset) == (FsType.SQUASHFS, PartType.PRIMARY_SYSTEM, 32768)


# ------------------------------------------------------------------------- the Go CLI and squashfs-tools


@pytest.fixture
def real_container(tmp_path):
    for tool in ("siftool", "mksquashfs", "unsquashfs"):
        if not shutil.which(tool):
            missing(f"{tool} is not on PATH (Debian packages siftool and squashfs-tools)")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text("NAME=test\n")
    (root / "hello.txt").write_text("hello\n" * 1000)
    squashfs = tmp_path / "rootfs.squashfs"
    subprocess.run(["mksquashfs", str(root), str(squashfs), "-noappend", "-quiet", "-all-root"],
                   check=True, capture_output=True)
    dest = tmp_path / "container.sif"
    config = json.dumps({"Env": ["PATH=/usr/bin"]}).encode()
    build_container_sif(dest, squashfs, deffile=b"bootstrap: docker\nfrom: test\n",
                        json_objects={"oci-config.json": config}, arch="amd64")
    return dest, config


def _fields(text: str) -> dict:
    """siftool's aligned ``Key:   value`` lines as a dict."""
    return dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines()) if v)


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_siftool_accepts_built_container(real_container):
    dest, config = real_container
    listing = _run("siftool", "list", str(dest))
    assert "Def.FILE" in listing and "JSON.Generic" in listing and "FS (Squashfs/*System/amd64)" in listing
    header = _fields(_run("siftool", "header", str(dest)))
    assert header["Launch Script"] == "#!/usr/bin/env run-singularity"
    assert header["Primary Architecture"] == "amd64"
    image = read_sif(dest)
    info = _fields(_run("siftool", "info", "3", str(dest)))
    assert (info["Offset"], info["Size"]) == (str(partition_offset(image)), str(primary_partition(image).size))
    assert (info["Filesystem Type"], info["Partition Type"], info["Architecture"]) == ("Squashfs", "*System", "amd64")
    assert _fields(_run("siftool", "info", "2", str(dest)))["Name"] == "oci-config.json"
    assert subprocess.run(["siftool", "dump", "2", str(dest)], capture_output=True, check=True).stdout == config


def test_unsquashfs_lists_partition_at_offset(real_container):
    dest, _ = real_container
    offset = partition_offset(read_sif(dest))
    listing = _run("unsquashfs", "-o", str(offset), "-l", str(dest))
    assert "squashfs-root/etc/os-release" in listing and "squashfs-root/hello.txt" in listing


def test_squashfs_written_in_place_gives_the_same_sif_as_a_copy(tmp_path):
    """The puller has mksquashfs write the partition straight to its offset in the SIF; the SIF
    then gets the same bytes as one built by copying the squashfs in."""
    from shpc_lite.sif import InPlace, container_partition_offset

    payload = os.urandom(10_000) + b"end"
    objects = dict(deffile=b"bootstrap: docker\nfrom: x\n", json_objects={"oci-config.json": b'{"Env": ["A=1"]}'},
                   arch="amd64")
    squashfs = tmp_path / "rootfs.squashfs"
    squashfs.write_bytes(payload)
    copied = tmp_path / "copied.sif"
    build_container_sif(copied, squashfs, deterministic=True, **objects)

    offset = container_partition_offset(**objects)
    in_place = tmp_path / "in-place.sif"
    with open(in_place, "wb") as f:  # as mksquashfs -offset leaves it: a hole, then the squashfs
        f.seek(offset)
        f.write(payload)
    build_container_sif(in_place, InPlace(len(payload)), deterministic=True, **objects)
    assert in_place.read_bytes() == copied.read_bytes()
    assert primary_partition(read_sif(in_place)).offset == offset

    with pytest.raises(SifError, match="does not end the file"):  # a size that does not match is refused
        build_container_sif(in_place, InPlace(len(payload) + 1), deterministic=True, **objects)
