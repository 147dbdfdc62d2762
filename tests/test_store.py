"""The store's clean-up of what killed pulls leave behind, and its content addressing."""

from __future__ import annotations

import os
import time

from shpc_lite.config import Paths
from shpc_lite.fsutil import TMP_PREFIX
from shpc_lite.store import clean_stale, digest_lock, sif_name


def test_clean_stale_spares_live_pulls(tmp_path):
    paths = Paths(tmp_path)
    paths.containers.mkdir(parents=True)
    dead = paths.containers / f"{TMP_PREFIX}sha256-{'a' * 64}"
    live = paths.containers / f"{TMP_PREFIX}sha256-{'b' * 64}"
    old_file = paths.containers / f"{TMP_PREFIX}abc123"
    new_file = paths.containers / f"{TMP_PREFIX}def456"
    for d in (dead, live):
        d.mkdir()
        (d / "image.sif").write_bytes(b"partial")
    old_file.write_bytes(b"x")
    new_file.write_bytes(b"x")
    os.utime(old_file, (time.time() - 3 * 86400,) * 2)
    with digest_lock(paths, "sha256:" + "b" * 64):
        removed = clean_stale(paths)
        assert set(removed) == {dead, old_file}
        assert live.is_dir() and new_file.exists()
    assert clean_stale(paths) == [live]


def test_sif_names():
    assert sif_name("sha256:" + "c" * 64) == f"sha256-{'c' * 64}.sif"
    assert sif_name("sha256:" + "c" * 64, imported=True) == f"file-sha256-{'c' * 64}.sif"


def test_digest_of_inverts_sif_name():
    from shpc_lite.store import digest_of

    digest = "sha256:" + "d" * 64
    assert digest_of(sif_name(digest)) == digest
    assert digest_of(sif_name(digest, imported=True)) == digest
