"""Nothing outside the root is deleted or overwritten, whatever the tree or its records say.

The tree under a root is not trusted (issue 9): install records can be edited, store entries,
module and wrapper dirs replaced by symlinks, records can hold ``..``. Every deleting command
(``uninstall``, ``clean``, ``batch sync``, ``view delete``) runs after each such tampering, and a
planted file outside the root must survive each of them; the commands either work or stop with
one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import Site

BLOB = "ab" * 32


def _planted(outside: Path) -> dict[Path, str]:
    """Files outside the root named like everything a deleting command might remove."""
    files = {
        outside / "precious": "keep me",
        outside / "3.12.lua": "outside modulefile",
        outside / "3.12" / "install.json": "{}",
        outside / "3.12" / "bin" / "python": "outside wrapper",
        outside / "victim.sif": "outside sif",
        outside / BLOB / "data": "outside blob",
        outside / "python" / "3.12.lua": "outside view entry",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def _record(site: Site) -> Path:
    return site.root / "wrappers" / "python" / "3.12" / "install.json"


def _edit_record(site: Site, **changes: str) -> None:
    data = json.loads(_record(site).read_text())
    data.update(changes)
    _record(site).write_text(json.dumps(data))


def _symlink_over(path: Path, target: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def _old_link(path: Path, target: Path) -> None:
    """A symlink old enough for ``clean`` to sweep as a stale ref (not only skip as young)."""
    import time

    _symlink_over(path, target)
    then = time.time() - 7200
    os.utime(path, (then, then), follow_symlinks=False)


def _image_refs(site: Site) -> Path:
    return next(p for p in (site.root / "containers" / ".refs").iterdir() if p.is_dir())


TAMPERING: dict[str, Callable[[Site, Path], None]] = {
    "record modulefile points outside": lambda s, o: _edit_record(s, modulefile=str(o / "3.12.lua")),
    "record sif points outside": lambda s, o: _edit_record(s, sif=str(o / "victim.sif")),
    "record sif climbs out with ..": lambda s, o: _edit_record(
        s, sif=str(s.root / "containers" / ".." / ".." / o.name / "victim.sif")),
    "record version climbs out with ..": lambda s, o: _edit_record(s, version=f"../../../{o.name}/3.12"),
    "record name climbs out with ..": lambda s, o: _edit_record(s, name=f"../../{o.name}"),
    "modules/<name> is a symlink": lambda s, o: _symlink_over(s.root / "modules" / "python", o),
    "wrappers/<name>/<version> is a symlink": lambda s, o: _symlink_over(
        s.root / "wrappers" / "python" / "3.12", o / "3.12"),
    "wrappers/<name> is a symlink": lambda s, o: _symlink_over(s.root / "wrappers" / "python", o),
    "store entry is a symlink": lambda s, o: [_symlink_over(p, o / "victim.sif")
                                              for p in (s.root / "containers").glob("*.sif")],
    "cache/blobs/sha256 is a symlink": lambda s, o: _symlink_over(s.root / "cache" / "blobs" / "sha256", o),
    "cache/blobs/sha256/<hex> is a symlink": lambda s, o: _symlink_over(
        s.root / "cache" / "blobs" / "sha256" / BLOB, o / BLOB),
    "containers/.locks is a symlink": lambda s, o: _symlink_over(s.root / "containers" / ".locks", o),
    "containers/.refs/<image> is a symlink": lambda s, o: _old_link(_image_refs(s), o),
    "a ref is a symlink to an outside file": lambda s, o: _old_link(_image_refs(s) / "python@3.12", o / "precious"),
    "views/<view> is a symlink": lambda s, o: _symlink_over(s.root / "views" / "course", o),
    "views/<view>/<name> is a symlink": lambda s, o: _symlink_over(s.root / "views" / "course" / "python",
                                                                   o / "python"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
def test_deleting_commands_leave_outside_files_alone(site: Site, small_sif: Path, tmp_path: Path,
                                                      tampering: str) -> None:
    site.cli("install", "python:3.12", "--sif", str(small_sif), check=True)
    site.cli("view", "create", "course", check=True)
    site.cli("view", "add", "course", "python", check=True)
    outside = tmp_path / "outside"
    planted = _planted(outside)
    TAMPERING[tampering](site, outside)
    manifest = tmp_path / "empty.yaml"
    manifest.write_text("modules: []\n")
    for command in (["uninstall", "python:3.12"], ["clean"], ["batch", "sync", str(manifest), "--yes"],
                    ["view", "delete", "course"]):
        proc = site.cli(*command)
        assert "Traceback" not in proc.stderr, (command, proc.stderr)
        if proc.returncode != 0:
            assert len(proc.stderr.strip().splitlines()) == 1, (command, proc.stderr)
        for path, text in planted.items():
            assert path.is_file() and path.read_text() == text, (tampering, command, path)


def test_uninstall_never_trusts_the_record_for_what_to_delete(site: Site, small_sif: Path, tmp_path: Path) -> None:
    """A record naming another module's files: uninstall removes the module's own files only."""
    site.cli("install", "python:3.12", "--sif", str(small_sif), check=True)
    site.cli("install", "pytorch:2.2.1", "--sif", str(small_sif), check=True)
    other = site.root / "modules" / "pytorch" / "2.2.1.lua"
    _edit_record(site, modulefile=str(other))
    assert site.cli("uninstall", "python:3.12").returncode == 0
    assert other.is_file() and not (site.root / "modules" / "python").exists()
    assert site.cli("list", "--json", check=True).stdout.count('"pytorch"') == 1


def test_symlinked_module_dir_is_not_written_through(site: Site, small_sif: Path, tmp_path: Path) -> None:
    """install into a tree whose modules/<name> was replaced by a link: refused, nothing written out."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (site.root / "modules").mkdir(parents=True)
    os.symlink(outside, site.root / "modules" / "python")
    proc = site.cli("install", "python:3.12", "--sif", str(small_sif))
    assert proc.returncode == 1 and "symlink" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(outside.iterdir()) == []
