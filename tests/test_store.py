"""The store's clean-up of what killed pulls leave behind, and its content addressing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shpc_lite.layout import Layout
from shpc_lite.errors import StoreError
from shpc_lite.fsutil import TMP_PREFIX
from shpc_lite.store import clean_stale, digest_lock

LEASE = 120


def test_clean_stale_spares_live_pulls(tmp_path):
    paths = Layout(tmp_path)
    paths.containers.mkdir(parents=True)
    dead = paths.containers / f"{TMP_PREFIX}sha256-{'a' * 64}.4242-0a1b2c3d"
    live = paths.containers / f"{TMP_PREFIX}sha256-{'b' * 64}.4343-0a1b2c3d"
    old_file = paths.containers / f"{TMP_PREFIX}abc123"
    new_file = paths.containers / f"{TMP_PREFIX}def456"
    for d in (dead, live):
        d.mkdir()
        (d / "image.sif").write_bytes(b"partial")
    old_file.write_bytes(b"x")
    new_file.write_bytes(b"x")
    os.utime(old_file, (time.time() - 3 * 86400,) * 2)
    with digest_lock(paths, "sha256:" + "b" * 64, LEASE):
        removed = clean_stale(paths, LEASE)
        assert set(removed) == {dead, old_file}
        assert live.is_dir() and new_file.exists()
    assert clean_stale(paths, LEASE) == [live]


def _holder(paths: Layout, digest: str, lease: float) -> subprocess.Popen:
    """Another process holding the digest lock (as a pull would), until it is stopped or killed."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom shpc_lite.layout import Layout\n"
            "from shpc_lite.store import digest_lock\n"
            f"with digest_lock(Layout(Path({str(paths.root)!r})), {digest!r}, {lease}):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_keeps_its_lock_and_a_frozen_one_loses_it_after_the_lease(tmp_path):
    """A node that hangs or dies mid-pull blocks the others for one lease, not for hours; a
    holder that is alive renews its lease and keeps the lock."""
    paths, digest, lease = Layout(tmp_path), "sha256:" + "d" * 64, 2
    holder = _holder(paths, digest, lease)
    try:
        with pytest.raises(StoreError, match="timed out waiting for another process"):
            with digest_lock(paths, digest, lease, timeout=3 * lease):
                pass
        holder.send_signal(signal.SIGSTOP)  # frozen: alive for its host, but no heartbeat
        start = time.monotonic()
        with digest_lock(paths, digest, lease, timeout=30):
            waited = time.monotonic() - start
        assert lease * 0.5 <= waited < lease * 6
    finally:
        holder.kill()
        holder.wait(10)


def test_a_killed_holder_on_this_host_is_noticed_at_once(tmp_path):
    paths, digest = Layout(tmp_path), "sha256:" + "e" * 64
    holder = _holder(paths, digest, 120)
    holder.kill()
    holder.wait(10)
    start = time.monotonic()
    with digest_lock(paths, digest, 120, timeout=30):
        assert time.monotonic() - start < 2
