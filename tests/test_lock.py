"""The lock file: round trip, stable order, merge, clear errors, atomic writes."""

from __future__ import annotations

import json
import os
import random
import threading

import pytest

from shpc_lite import fsutil
from shpc_lite.errors import ResolveError
from shpc_lite.lock import (
    Lock,
    LockedRecipe,
    LockedVersion,
    dump_lock,
    locked_version,
    merge,
    parse_lock,
    read_lock,
    update_lock,
    write_lock,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
T0 = "2026-01-01T00:00:00Z"
T1 = "2026-02-01T00:00:00Z"


def recipe(name, *versions, image=None):
    return LockedRecipe(
        name, image or f"docker.io/library/{name}", tuple(LockedVersion(v, t, d, at) for v, t, d, at in versions)
    )


PY = recipe("python", ("3.11", "3.11-bookworm", D1, T0), ("3.12", "3.12-bookworm", D2, T0), ("3.9", "3.9-bookworm", D3, T0))
TORCH = recipe("pytorch", ("2.9.1", "2.9.1-cuda12.8-cudnn9-runtime", D3, T0), image="docker.io/pytorch/pytorch")


def test_round_trip_and_documented_shape(tmp_path):
    path = tmp_path / "shpc-lite.lock"
    write_lock(path, Lock((TORCH, PY)))
    lock = read_lock(path)
    assert lock.names() == ["python", "pytorch"]
    assert [v.version for v in lock.get("python").versions] == ["3.12", "3.11", "3.9"]  # newest first
    assert read_lock(path) == lock and dump_lock(lock) == path.read_text()
    data = json.loads(path.read_text())
    assert data["lockfile_version"] == 1
    assert data["recipes"]["python"]["image"] == "docker.io/library/python"
    assert data["recipes"]["python"]["versions"][0] == {
        "version": "3.12", "tag": "3.12-bookworm", "digest": D2, "resolved_at": T0,
    }
    assert list(data["recipes"]["python"]["versions"][0]) == ["version", "tag", "digest", "resolved_at"]


def test_missing_lock_is_empty(tmp_path):
    assert read_lock(tmp_path / "none.lock") == Lock()


def test_text_does_not_depend_on_input_order():
    texts = set()
    rng = random.Random(7)
    for _ in range(10):
        versions = list(PY.versions)
        rng.shuffle(versions)
        recipes = [LockedRecipe("python", PY.image, tuple(versions)), TORCH]
        rng.shuffle(recipes)
        texts.add(dump_lock(Lock(tuple(recipes))))
    assert len(texts) == 1


def test_merge_replaces_named_recipes_and_keeps_the_others():
    lock = merge(Lock(), [PY, TORCH])
    new_py = recipe("python", ("3.12", "3.12-bookworm", D2, T1), ("3.13", "3.13-bookworm", D1, T1))
    merged = merge(lock, [new_py])
    assert merged.get("pytorch") == TORCH
    py = merged.get("python")
    assert [(v.version, v.resolved_at) for v in py.versions] == [("3.13", T1), ("3.12", T0)]  # unchanged keeps T0
    repushed = merge(merged, [recipe("python", ("3.12", "3.12-bookworm", D3, T1))])
    assert repushed.get("python").versions[0].resolved_at == T1


def test_locked_version():
    lock = Lock((PY,))
    found = locked_version(lock, "python", "3.12")
    assert (found.tag, found.digest) == ("3.12-bookworm", D2)
    assert locked_version(lock, "python", "3.8") is None
    assert locked_version(lock, "nope", "3.12") is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "the lock file is not JSON"),
        ("[" * 100_000 + "]" * 100_000, "the lock file is nested too deeply"),
        ("[]", "not a valid lock file (expected a JSON object)"),
        ("{}", "missing field 'lockfile_version'"),
        ('{"lockfile_version": 2}', "lockfile_version: 2 was written by a newer shpc-lite"),
        ('{"lockfile_version": "1"}', "lockfile_version: unsupported value '1'"),
        ('{"lockfile_version": 1, "extra": 1}', "unknown field 'extra'"),
        ('{"lockfile_version": 1, "recipes": []}', "recipes: expected an object"),
        ('{"lockfile_version": 1, "recipes": {"a b": {}}}', "recipes.a b: invalid recipe name"),
        ('{"lockfile_version": 1, "recipes": {"py": {"versions": []}}}', "recipes.py.image: invalid value None"),
        (
            '{"lockfile_version": 1, "recipes": {"py": {"image": "x", "versions": [{"version": "1", "tag": "1", '
            '"digest": "sha256:abc", "resolved_at": "2026-01-01T00:00:00Z"}]}}}',
            "recipes.py.versions[0].digest: invalid value 'sha256:abc'",
        ),
        (
            '{"lockfile_version": 1, "recipes": {"py": {"image": "x", "versions": [{"version": "1", "tag": "1", '
            '"digest": "%s"}]}}}' % D1,
            "recipes.py.versions[0]: missing field 'resolved_at'",
        ),
        (
            '{"lockfile_version": 1, "recipes": {"py": {"image": "x", "versions": [{"version": "1", "tag": "1", '
            '"digest": "%s", "resolved_at": "%s"}, {"version": "1", "tag": "2", "digest": "%s", "resolved_at": "%s"}]}}}'
            % (D1, T0, D2, T0),
            "recipes.py.versions[1]: version '1' appears twice",
        ),
    ],
)
def test_bad_lock_files_are_clear_errors_naming_the_file(tmp_path, text, message):
    path = tmp_path / "shpc-lite.lock"
    path.write_text(text)
    with pytest.raises(ResolveError) as err:
        read_lock(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_unreadable_lock_names_the_file(tmp_path):
    path = tmp_path / "shpc-lite.lock"
    path.mkdir()
    with pytest.raises(ResolveError, match="cannot read lock file"):
        read_lock(path)


def test_failed_write_leaves_the_old_lock_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "shpc-lite.lock"
    write_lock(path, Lock((PY,)))
    before = path.read_text()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        update_lock(path, [TORCH])
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shpc-lite.lock"]
    assert not any(p.name.startswith(fsutil.TMP_PREFIX) for p in tmp_path.iterdir())


def test_concurrent_updates_lose_no_recipe(tmp_path):
    path = tmp_path / "shpc-lite.lock"
    names = [f"r{i}" for i in range(8)]
    threads = [
        threading.Thread(target=update_lock, args=(path, [recipe(n, ("1.0", "1.0", D1, T0))])) for n in names
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_lock(path).names() == names


def test_parse_accepts_what_dump_writes():
    lock = Lock((PY, TORCH))
    assert parse_lock(dump_lock(lock), "x") == merge(Lock(), [PY, TORCH])


def test_load_lock_and_versions_for_install(tmp_path):
    from shpc_lite.lock import load_lock

    path = tmp_path / "shpc-lite.lock"
    assert load_lock(path) is None
    write_lock(path, Lock((PY,)))
    lock = load_lock(path)
    assert list(lock.versions("python")) == ["3.12", "3.11", "3.9"]
    assert lock.versions("python")["3.11"].tag == "3.11-bookworm"
    assert lock.versions("nope") == {}
