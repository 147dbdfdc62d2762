"""Commands that touch one module do work independent of the tree's size (issue 13).

Trees of 50 and 500 installed modules (records sharing one stored image, as a real tree of one
base image would) get one more module installed and uninstalled in process; the install records
read and the directories listed on the way are counted, and must not grow with the tree. A user
notices the opposite as an uninstall that takes minutes on a 20,000-module tree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shpc_lite import refs
from shpc_lite.config import load_config
from shpc_lite.install import install_sif, uninstall
from shpc_lite.layout import RECORD

pytestmark = pytest.mark.filterwarnings("ignore")


def _config(root: Path):
    return load_config({"root": str(root)}, environ={"SHPC_LITE_SYSTEM_CONFIG": "/nonexistent",
                                                     "XDG_CONFIG_HOME": str(root / "cfg")})


def _fill(config, sif: Path, count: int, legacy: bool = True) -> Path:
    """A tree of ``count`` modules besides python/3.11, all using the image python/3.11 stored.
    ``legacy``: written as an older shpc-lite did, without refs (they must be found by one scan)."""
    base = install_sif(config, "python", "3.11", sif)
    layout = config.layout
    for i in range(count):
        name = f"fake{i:04d}"
        record = {**json.loads(layout.record("python", "3.11").read_text()), "name": name, "version": "1.0"}
        layout.version_dir(name, "1.0").mkdir(parents=True)
        layout.record(name, "1.0").write_text(json.dumps(record))
        if not legacy:
            refs.add(layout, Path(base.sif), name, "1.0")
    return Path(base.sif)


def _count_work(monkeypatch, action) -> dict[str, int]:
    """Run ``action`` counting install-record reads and directory listings."""
    counts = {"records": 0, "scandir": 0}
    read_text, scandir = Path.read_text, os.scandir

    def counting_read(self, *args, **kwargs):
        counts["records"] += self.name == RECORD
        return read_text(self, *args, **kwargs)

    def counting_scandir(*args, **kwargs):
        counts["scandir"] += 1
        return scandir(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "read_text", counting_read)
        patch.setattr(os, "scandir", counting_scandir)
        action()
    return counts


def _one_more(config, sif: Path) -> None:
    install_sif(config, "python", "3.12", sif)
    uninstall(config, "python", "3.12")


def test_install_and_uninstall_do_not_read_the_whole_tree(tmp_path, small_sif, monkeypatch):
    work = []
    for count in (50, 500):
        config = _config(tmp_path / f"tree{count}")
        image = _fill(config, small_sif, count)
        _one_more(config, small_sif)  # the first decision turns the old tree's records into refs
        work.append(_count_work(monkeypatch, lambda: _one_more(config, small_sif)))
        assert image.is_file()  # still used by python/3.11 and the fakes
    assert work[0] == work[1], work
    assert work[0]["records"] <= 6


def test_an_image_goes_with_its_last_user_only(tmp_path, small_sif):
    config = _config(tmp_path / "root")
    image = _fill(config, small_sif, 2, legacy=False)
    uninstall(config, "python", "3.11")
    uninstall(config, "fake0000", "1.0")
    assert image.is_file()
    uninstall(config, "fake0001", "1.0")
    assert not image.exists() and not config.layout.image_refs(image).exists()


def test_a_tree_without_refs_keeps_images_its_old_records_use(tmp_path, small_sif):
    """A tree an older shpc-lite wrote: python/3.11 has a ref, the fakes do not; uninstalling
    python/3.11 must not drop the image they use."""
    config = _config(tmp_path / "root")
    layout = config.layout
    image = _fill(config, small_sif, 3)
    refs.drop(layout, image, "fake0000", "1.0")
    assert not layout.refs_complete.exists()
    uninstall(config, "python", "3.11")
    assert image.is_file() and layout.refs_complete.exists()
    assert sorted(refs.users(layout, image)) == [("fake0000", "1.0"), ("fake0001", "1.0"), ("fake0002", "1.0")]


def test_a_reinstall_onto_another_image_moves_the_ref(tmp_path, small_sif):
    config = _config(tmp_path / "root")
    layout = config.layout
    first = Path(install_sif(config, "python", "3.11", small_sif).sif)
    other = tmp_path / "other.sif"
    other.write_bytes(small_sif.read_bytes() + b"\0")  # another file digest, still a SIF
    second = Path(install_sif(config, "python", "3.11", other).sif)
    assert second != first and not first.exists()
    assert list(refs.users(layout, second)) == [("python", "3.11")]


def test_a_symlinked_refs_dir_is_refused_and_nothing_outside_is_touched(tmp_path, small_sif):
    """A planted ``.refs/<stem>`` link to elsewhere: the ref is not removed through it (one
    line, StoreError), the outside file survives and the image, whose users are unknown, stays."""
    from shpc_lite.errors import StoreError

    config = _config(tmp_path / "root")
    layout = config.layout
    image = Path(install_sif(config, "python", "3.11", small_sif).sif)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "python@3.11").write_text("keep me")
    refs_dir = layout.image_refs(image)
    for entry in refs_dir.iterdir():
        entry.unlink()
    refs_dir.rmdir()
    refs_dir.symlink_to(outside)
    with pytest.raises(StoreError, match="symlink"):
        uninstall(config, "python", "3.11")
    assert (outside / "python@3.11").read_text() == "keep me" and image.is_file()


def test_uninstall_prunes_every_view_in_one_pass(tmp_path, small_sif):
    from shpc_lite import views

    config = _config(tmp_path / "root")
    layout = config.layout
    for version in ("3.11", "3.12"):
        install_sif(config, "python", version, small_sif)
    for view in ("course", "project"):
        views.create(layout, view)
        views.add(layout, config, view, "python", None, "py")
    uninstall(config, "python", None)
    for view in ("course", "project"):
        assert views.entries(layout, view) == [] and not (layout.view_dir(view) / "py").exists()
