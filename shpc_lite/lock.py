"""The lock file ``<root>/shpc-lite.lock``: which tag and digest each module version comes from.

JSON, written so that it diffs well: recipes sorted by name, module versions newest first, keys in
a fixed order, one field a line. ``resolved_at`` is kept from the previous lock while a version's
tag and digest are unchanged, so resolving again without news changes nothing. Format::

    {
      "lockfile_version": 1,
      "recipes": {
        "python": {
          "image": "docker.io/library/python",
          "versions": [
            {
              "version": "3.12",
              "tag": "3.12-bookworm",
              "digest": "sha256:<64 hex>",
              "resolved_at": "2026-03-01T12:00:00Z"
            }
          ]
        }
      }
    }

``digest`` is the digest of what the tag points at (an image index or a manifest), as a HEAD
request with the full Accept list reports it. Writes are atomic (temp file + rename) under a
short lock, so two ``resolve`` runs never lose each other's recipes.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from shpc_lite.errors import ResolveError
from shpc_lite.recipe import SAFE_NAME, SAFE_VERSION
from shpc_lite.versions import version_key

LOCK_FORMAT = 1
# \Z, not $: in Python $ also matches before a final newline, and "1.0\n" must not pass.
DIGEST = re.compile(r"\A(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")
TAG = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
TIMESTAMP = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")


@dataclass(frozen=True)
class LockedVersion:
    version: str
    tag: str
    digest: str
    resolved_at: str


@dataclass(frozen=True)
class LockedRecipe:
    name: str
    image: str
    versions: tuple[LockedVersion, ...] = ()

    def version(self, version: str) -> Optional[LockedVersion]:
        return next((v for v in self.versions if v.version == version), None)


@dataclass(frozen=True)
class Lock:
    recipes: tuple[LockedRecipe, ...] = ()

    def get(self, name: str) -> Optional[LockedRecipe]:
        return next((r for r in self.recipes if r.name == name), None)

    def names(self) -> list[str]:
        return [r.name for r in self.recipes]

    def versions(self, name: str) -> dict[str, LockedVersion]:
        """Locked module versions of one recipe, newest first ({} when it is not locked)."""
        recipe = self.get(name)
        return {v.version: v for v in recipe.versions} if recipe else {}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def locked_version(lock: Lock, name: str, version: str) -> Optional[LockedVersion]:
    """A locked module version, or None."""
    recipe = lock.get(name)
    return recipe.version(version) if recipe else None


def _sorted_recipe(recipe: LockedRecipe) -> LockedRecipe:
    versions = sorted(recipe.versions, key=lambda v: version_key(v.version), reverse=True)
    return replace(recipe, versions=tuple(versions))


def merge(lock: Lock, updates: Iterable[LockedRecipe]) -> Lock:
    """``lock`` with the given recipes replaced whole (others kept).

    A version whose tag and digest did not change keeps its earlier ``resolved_at``.
    """
    recipes = {r.name: r for r in lock.recipes}
    for new in updates:
        old = recipes.get(new.name)
        if old is not None:
            kept = []
            for v in new.versions:
                before = old.version(v.version)
                if before and (before.tag, before.digest) == (v.tag, v.digest):
                    v = replace(v, resolved_at=before.resolved_at)
                kept.append(v)
            new = replace(new, versions=tuple(kept))
        recipes[new.name] = new
    return Lock(tuple(_sorted_recipe(recipes[name]) for name in sorted(recipes)))


def to_dict(lock: Lock) -> dict[str, Any]:
    recipes = {}
    for recipe in sorted(lock.recipes, key=lambda r: r.name):
        recipe = _sorted_recipe(recipe)
        recipes[recipe.name] = {
            "image": recipe.image,
            "versions": [
                {"version": v.version, "tag": v.tag, "digest": v.digest, "resolved_at": v.resolved_at}
                for v in recipe.versions
            ],
        }
    return {"lockfile_version": LOCK_FORMAT, "recipes": recipes}


def dump_lock(lock: Lock) -> str:
    return json.dumps(to_dict(lock), indent=2, ensure_ascii=False) + "\n"


def _check(ok: bool, source: str, where: str, problem: str) -> None:
    if not ok:
        raise ResolveError(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


def _known(data: dict, allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        _check(False, source, where, f"unknown field {unknown[0]!r}")


def _string(data: dict, key: str, pattern: re.Pattern, source: str, where: str) -> str:
    value = data.get(key)
    _check(key in data, source, where, f"missing field {key!r}")
    _check(isinstance(value, str) and bool(pattern.match(value)), source, f"{where}.{key}", f"invalid value {value!r}")
    return value


def parse_lock(text: str, source: str) -> Lock:
    """Validate a lock file's text; errors name ``source`` and the field."""
    from shpc_lite.oci.document import load_json

    data = load_json(text, f"{source}: the lock file", ResolveError)
    _check(isinstance(data, dict), source, "", "not a valid lock file (expected a JSON object)")
    fmt = data.get("lockfile_version")
    _check("lockfile_version" in data, source, "", "missing field 'lockfile_version'")
    _check(
        not (isinstance(fmt, int) and fmt > LOCK_FORMAT),
        source, "lockfile_version", f"{fmt} was written by a newer shpc-lite (this one reads {LOCK_FORMAT})",
    )
    _check(fmt == LOCK_FORMAT, source, "lockfile_version", f"unsupported value {fmt!r}")
    _known(data, {"lockfile_version", "recipes"}, source, "")
    raw = data.get("recipes", {})
    _check(isinstance(raw, dict), source, "recipes", "expected an object")
    recipes = []
    for name, entry in raw.items():
        where = f"recipes.{name}"
        _check(bool(SAFE_NAME.match(name)), source, where, "invalid recipe name")
        _check(isinstance(entry, dict), source, where, "expected an object")
        _known(entry, {"image", "versions"}, source, where)
        image = entry.get("image")
        _check(isinstance(image, str) and bool(image), source, f"{where}.image", f"invalid value {image!r}")
        items = entry.get("versions", [])
        _check(isinstance(items, list), source, f"{where}.versions", "expected a list")
        versions: list[LockedVersion] = []
        for i, item in enumerate(items):
            at = f"{where}.versions[{i}]"
            _check(isinstance(item, dict), source, at, "expected an object")
            _known(item, {"version", "tag", "digest", "resolved_at"}, source, at)
            locked = LockedVersion(
                version=_string(item, "version", SAFE_VERSION, source, at),
                tag=_string(item, "tag", TAG, source, at),
                digest=_string(item, "digest", DIGEST, source, at),
                resolved_at=_string(item, "resolved_at", TIMESTAMP, source, at),
            )
            _check(
                all(v.version != locked.version for v in versions),
                source, at, f"version {locked.version!r} appears twice",
            )
            versions.append(locked)
        recipes.append(LockedRecipe(name, image, tuple(versions)))
    return Lock(tuple(_sorted_recipe(r) for r in sorted(recipes, key=lambda r: r.name)))


def read_lock(path: Path) -> Lock:
    """The lock at ``path``; an empty lock if there is none yet."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Lock()
    except (OSError, UnicodeDecodeError) as err:
        raise ResolveError(f"{path}: cannot read lock file: {getattr(err, 'strerror', None) or err}") from None
    return parse_lock(text, str(path))


def load_lock(path: Path) -> Optional[Lock]:
    """The lock at ``path``, or None when there is no lock file (install falls back to pins)."""
    return read_lock(path) if Path(path).exists() else None


def write_lock(path: Path, lock: Lock, mode: int = 0o644) -> None:
    """Replace the lock file atomically: readers see the old or the new file, never a part."""
    from shpc_lite.fsutil import atomic_write

    atomic_write(Path(path), dump_lock(lock), mode)


@contextlib.contextmanager
def _writer_lock(path: Path, timeout: float) -> Iterator[None]:
    from filelock import SoftFileLock, Timeout

    guard = Path(str(path) + ".writing")
    guard.parent.mkdir(parents=True, exist_ok=True)
    try:
        with SoftFileLock(str(guard), timeout=timeout):
            yield
    except Timeout:
        raise ResolveError(
            f"{path}: another shpc-lite is writing the lock file (remove {guard} if no other run is active)"
        ) from None


def update_lock(path: Path, updates: Iterable[LockedRecipe], mode: int = 0o644, timeout: float = 60) -> Lock:
    """Read, merge ``updates`` and write the lock, holding a lock so concurrent runs merge too."""
    updates = list(updates)
    with _writer_lock(Path(path), timeout):
        lock = merge(read_lock(path), updates)
        write_lock(path, lock, mode)
    return lock
