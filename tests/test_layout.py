"""Layout: every on-disk name under a root, and the refusal to leave it (issue 9)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shpc_lite.errors import StoreError
from shpc_lite.layout import Layout
from shpc_lite.module_systems import LMOD, TCL

DIGEST = "sha256:" + "c" * 64


def test_store_names_and_their_inverse(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert layout.image(DIGEST).name == f"sha256-{'c' * 64}.sif"
    assert layout.image(DIGEST, imported=True).name == f"file-sha256-{'c' * 64}.sif"
    assert layout.image_digest(layout.image(DIGEST)) == DIGEST
    assert layout.image_digest(layout.image(DIGEST, imported=True)) == DIGEST
    # anything not exactly a store name of this root has no digest (so it is never deleted)
    assert layout.image_digest(tmp_path / "elsewhere" / f"sha256-{'c' * 64}.sif") is None
    assert layout.image_digest(layout.containers / "x.sif") is None
    assert layout.scratch_digest(layout.new_scratch(DIGEST)) == DIGEST
    assert layout.locked_digest(layout.digest_lock(DIGEST)) == DIGEST


def test_module_names_per_system(tmp_path: Path) -> None:
    assert Layout(tmp_path, LMOD).modulefile("py", "3.12") == tmp_path / "modules/py/3.12.lua"
    assert Layout(tmp_path, TCL).modulefile("py", "3.12") == tmp_path / "modules/py/3.12"
    assert Layout(tmp_path, TCL).modulerc("py") == tmp_path / "modules/py/.modulerc"
    assert Layout(tmp_path, LMOD).modulerc("py") == tmp_path / "modules/py/.modulerc.lua"


@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "../../etc", "x\n", "x\0", ".hidden", "a b", "-rf"])
def test_names_that_are_not_one_safe_component_are_refused(tmp_path: Path, bad: str) -> None:
    layout = Layout(tmp_path)
    for make in (lambda: layout.modulefile(bad, "1.0"), lambda: layout.modulefile("ok", bad),
                 lambda: layout.version_dir(bad, "1"), lambda: layout.view_dir(bad)):
        with pytest.raises(StoreError):
            make()


@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:" + "c" * 63, "sha256:" + "C" * 64, "md5:abc",
                                 "sha256:" + "c" * 64 + "\n"])
def test_digests_from_registries_are_checked_before_they_become_names(tmp_path: Path, bad: str) -> None:
    layout = Layout(tmp_path)
    for make in (layout.image, layout.blob_dir, layout.digest_lock, layout.new_scratch):
        with pytest.raises(StoreError):
            make(bad)


def test_relative_root_is_refused() -> None:
    with pytest.raises(StoreError):
        Layout(Path("relative/root"))


def test_inside_refuses_a_symlink_below_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    layout = Layout(root)
    layout.make_dir(layout.modules)
    os.symlink(outside, layout.module_dir("py"))
    with pytest.raises(StoreError, match="symlink"):
        layout.inside(layout.modulefile("py", "precious"))
    with pytest.raises(StoreError, match="symlink"):
        layout.make_dir(layout.module_dir("py") / "sub")
    # removing the link itself is fine: the target is untouched
    assert layout.remove(layout.module_dir("py"))
    assert (outside / "precious").read_text() == "keep"
    with pytest.raises(StoreError):
        layout.inside(tmp_path / "outside" / "precious")
    with pytest.raises(StoreError):
        layout.inside(root / "modules" / ".." / ".." / "outside")


def test_records_ignore_symlinked_module_dirs(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    real = layout.make_dir(layout.version_dir("real", "1.0"))
    (real / "install.json").write_text("{}")
    foreign = tmp_path / "foreign" / "1.0"
    foreign.mkdir(parents=True)
    (foreign / "install.json").write_text("{}")
    os.symlink(foreign.parent, layout.wrapper_root("planted"))
    assert [(n, v) for n, v, _ in layout.records()] == [("real", "1.0")]


def _inside_by_paths(layout, path):
    """The containment rule read plainly with pathlib (what ``Layout.inside`` computes on
    strings for speed): below the root, no '..', no symlink or file on the way."""
    import stat as st

    path = Path(path)
    try:
        parts = path.relative_to(layout.root).parts
    except ValueError:
        return "outside"
    if not parts or ".." in parts:
        return "not below"
    current = layout.root
    for part in parts[:-1]:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break
        if not st.S_ISDIR(mode):
            return "symlink" if st.S_ISLNK(mode) else "not a directory"
    return str(path)


def test_inside_agrees_with_the_plain_pathlib_rule(tmp_path):
    """Random paths around a root with a symlink, a file and odd spellings ('//', '.', '..',
    trailing '/'): the fast check accepts and refuses exactly what the plain rule does."""
    import random

    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    os.symlink("/etc", root / "link")
    os.symlink("a", root / "rel")
    (root / "file").write_text("x")
    rng = random.Random(7)
    comps = ["a", "b", "c", "..", ".", "", "link", "file", "rel", "x y", "é"]
    for base_root in (root, Path("/"), tmp_path):
        layout = Layout(base_root)
        for _ in range(3000):
            base = rng.choice([str(base_root), str(base_root) + "/", str(base_root) + "x", "/etc", "rel",
                               str(root), "//" + str(base_root).lstrip("/"), "///"])
            path = base + "".join("/" + rng.choice(comps) for _ in range(rng.randint(0, 4)))
            expected = _inside_by_paths(layout, path)
            try:
                got = str(layout.inside(path))
            except StoreError as err:
                message = str(err)
                got = ("outside" if "is outside" in message else "not below" if "not a path below" in message
                       else "symlink" if "is a symlink" in message else "not a directory")
            assert got == expected, path
