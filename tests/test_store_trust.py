"""The store is not trusted either (issue 9): what is found under an image's name is checked
before a module uses it, and a failed install leaves no image behind."""

from __future__ import annotations

import os
from pathlib import Path

from shpc_lite.layout import Layout
from shpc_lite.sif import DataType, SifObject, build_container_sif, write_sif
from shpc_lite.store import file_digest, stored_image_ok
from tests.conftest import Site


def _sifs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "containers").glob("*.sif")) if (root / "containers").exists() else []


def test_unknown_group_fails_before_the_image_is_copied(site: Site, small_sif: Path) -> None:
    proc = site.cli("install", "python:3.12", "--sif", str(small_sif), extra_env={"SHPC_LITE_GROUP": "no-such-group-x"})
    assert proc.returncode == 1 and "no-such-group-x" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _sifs(site.root) == [] and not (site.root / "modules").exists()


def test_a_sif_without_a_root_file_system_is_refused(site: Site, tmp_path: Path) -> None:
    empty = tmp_path / "no-partition.sif"
    write_sif(empty, [SifObject(DataType.DEFFILE, b"bootstrap: scratch\n")])
    proc = site.cli("install", "python:3.12", "--sif", str(empty))
    assert proc.returncode == 1 and "no-partition.sif" in proc.stderr and "partition" in proc.stderr
    assert _sifs(site.root) == []


def test_a_tampered_store_entry_is_replaced_not_used(site: Site, small_sif: Path, tmp_path: Path) -> None:
    site.cli("install", "python:3.12", "--sif", str(small_sif), check=True)
    [stored] = (site.root / "containers").glob("*.sif")
    stored.write_bytes(b"not the image any more")
    site.cli("install", "python:3.12", "--sif", str(small_sif), check=True)
    assert file_digest(stored) == file_digest(small_sif)
    # a symlink planted under the name is replaced by the real file; its target is left alone
    outside = tmp_path / "outside.sif"
    outside.write_bytes(small_sif.read_bytes())
    stored.unlink()
    os.symlink(outside, stored)
    site.cli("install", "python:3.12", "--sif", str(small_sif), check=True)
    assert not stored.is_symlink() and file_digest(stored) == file_digest(small_sif) and outside.exists()


def test_stored_image_checks(tmp_path: Path, small_sif: Path) -> None:
    digest, other = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    squash = tmp_path / "fs.squashfs"
    from shpc_lite.sif import primary_partition, read_sif

    partition = primary_partition(read_sif(small_sif))
    with open(small_sif, "rb") as src:
        src.seek(partition.offset)
        squash.write_bytes(src.read(partition.size))
    made = tmp_path / "made.sif"
    build_container_sif(made, squash, deffile=f"bootstrap: docker\nfrom: x/y@{digest}\n".encode(), json_objects={}, arch="amd64")
    assert stored_image_ok(made, digest, imported=False)
    assert not stored_image_ok(made, other, imported=False)  # it says it is another image
    link = tmp_path / "link.sif"
    os.symlink(made, link)
    assert not stored_image_ok(link, digest, imported=False)
    assert stored_image_ok(small_sif, file_digest(small_sif), imported=True)
    assert not stored_image_ok(small_sif, other, imported=True)


def test_user_install_sif_uses_the_central_copy(site: Site, small_sif: Path, tmp_path: Path) -> None:
    central = tmp_path / "central"
    site.cli("install", "python:3.12", "--sif", str(small_sif), check=True, extra_env={"SHPC_LITE_ROOT": str(central)})
    [shared] = _sifs(central)
    proc = site.cli("install", "python:3.11", "--sif", str(small_sif), check=True,
                    extra_env={"SHPC_LITE_CENTRAL_ROOT": str(central)})
    assert _sifs(site.root) == []  # nothing copied: the central store has it
    record = Layout(site.root).record("python", "3.11").read_text()
    assert str(central / "containers" / shared) in record, proc.stdout
    # uninstalling the user's module never deletes the central image
    site.cli("uninstall", "python:3.11", check=True, extra_env={"SHPC_LITE_CENTRAL_ROOT": str(central)})
    assert _sifs(central) == [shared]
