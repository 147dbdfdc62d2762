"""Indexes over a module tree: default versions, and Lmod's spider cache when asked for.

A spider cache makes ``module avail``/``spider`` read one file instead of walking the tree. Lmod
uses it while the cache file is not older (in whole seconds) than its timestamp file, and never
looks at the tree itself, so:

* every change to the tree first sets the timestamp into the future (``invalidate``): from then
  until the next refresh Lmod walks the tree, slower but right, also after a crash;
* ``refresh`` (after each install, uninstall and batch) writes the cache and then sets the
  timestamp back to when it started looking at the tree.

A refresh redoes only the module names whose directory changed since the last one (each name's
directory mtime and inode, kept in ``Layout.spider_state``; every write in the tree is a rename
in that directory, shpc_lite.fsutil). Lmod's own spider walks just those names and writes each
one's entry with Lmod's own serializer (shpc_lite/spider_update.lua); they are spliced into the
old cache text at the places the state recorded, in Lmod's order, so the text is the one a full
walk writes. What a splice cannot redo alone (module rc aliases, hidden modules, anything but
module directories) falls back to the full walk.

Not shards: Lmod takes several cache descriptors (``scDescriptT``), but a newer cache file
replaces a MODULEPATH dir's whole entry, so shards would need one MODULEPATH dir each, and users
rely on ``module use <root>/modules``. Nor a faster full walk: Lmod's spider spends about 3/4 of
its time per module whatever the module holds (an empty modulefile costs ~75% of ours).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from shpc_lite.config import Config
from shpc_lite.errors import SiteError
from shpc_lite.fsutil import TMP_PREFIX, atomic_write
from shpc_lite.layout import Layout

LMOD_LIBEXEC_DIRS = ("/usr/share/lmod/lmod/libexec", "/opt/apps/lmod/lmod/libexec", "/usr/local/lmod/lmod/libexec")
SPIDER_UPDATE = Path(__file__).resolve().parent / "spider_update.lua"
REFUSED = 3  # spider_update.lua's exit status when only a full walk can index the tree
FUTURE = 2.0  # seconds ahead an invalidated timestamp is set (Lmod compares whole seconds)
SECOND = 1_000_000_000
STATE_FORMAT = 1
NO_USER_CACHE = 86400  # LMOD_SHORT_TIME: seconds a walk must take before Lmod saves a per-user cache


@dataclass(frozen=True)
class LmodSpider:
    """Lmod's spider script, the Lua that runs it and the compiler of its cache."""
    spider: Path
    lua: str
    luac: Optional[str]
    luac_ext: str  # Lmod reads spiderT.<luac_ext> before spiderT.lua

    @property
    def libexec(self) -> Path:
        return self.spider.parent


def find_spider() -> LmodSpider:
    dirs = [os.environ["LMOD_DIR"]] if os.environ.get("LMOD_DIR") else []
    for directory in [*dirs, *LMOD_LIBEXEC_DIRS]:
        spider = Path(directory) / "spider"
        if spider.is_file():
            break
    else:
        raise SiteError("spider_cache is on but Lmod's spider was not found (set LMOD_DIR to Lmod's libexec)")
    with open(spider, encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
    lua = first[2:].split()[0] if first.startswith("#!") and len(first) > 2 else "lua"
    name = Path(lua).name
    luac = shutil.which(str(Path(lua).with_name(name.replace("lua", "luac", 1)))) or shutil.which("luac")
    version = subprocess.run([lua, "-e", 'io.write((_VERSION:gsub("Lua ","")))'], capture_output=True,
                             text=True, timeout=60).stdout.strip()
    return LmodSpider(spider, lua, luac, f"luac_{version}")


def invalidate(layout: Layout) -> None:
    """Make Lmod stop trusting the spider cache (if there is one) until the next refresh.

    Called before and after every change to the tree; nothing when no cache is kept. The
    timestamp only moves forward (by a second at least, whatever the file system's timestamp
    granularity), so a refresh can tell that a change happened while it walked."""
    path = layout.spider_timestamp
    try:
        later = max(time.time() + FUTURE, os.lstat(path).st_mtime + 1)
        os.utime(path, (later, later), follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        pass


def _stamp(path: Path) -> Optional[int]:
    try:
        return os.lstat(path).st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        return None


def _names(modules: Path) -> Optional[dict[str, list[int]]]:
    """Each module name's directory: [mtime_ns, inode]. None when the MODULEPATH dir holds anything
    else (files, links), which only a full walk indexes."""
    found: dict[str, list[int]] = {}
    with os.scandir(modules) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                return None
            st = entry.stat(follow_symlinks=False)
            found[entry.name] = [st.st_mtime_ns, st.st_ino]
    return found


@dataclass(frozen=True)
class Walk:
    """What one run of Lmod's spider produced: the cache text around the names' entries, each
    walked name's entry text, and whether the cache holds nothing but those entries."""
    prefix: bytes
    suffix: bytes
    entries: dict[str, bytes]
    plain: bool


@dataclass(frozen=True)
class Cache:
    """The cache text and where each name's entry lies in it."""
    text: bytes
    spans: dict[str, list[int]]  # name -> [offset, length] in text


PLACEHOLDER = b'    ["shpc-lite: the names go here"] = {},\n'


def _walk(layout: Layout, lmod: LmodSpider, only: Optional[list[str]]) -> Optional[Walk]:
    """Run Lmod's spider over the tree (or ``only`` these names) through spider_update.lua; None
    when it refuses to walk only some names (the tree holds more than modules)."""
    cache = layout.spider_cache
    blocks = cache / f"{TMP_PREFIX}blocks.{os.getpid()}"
    env = {**os.environ, "LMOD_DIR": str(lmod.libexec), "SHPC_LITE_SPIDER_UPDATE": str(SPIDER_UPDATE),
           "SHPC_LITE_SPIDER_TOP": str(layout.modules), "SHPC_LITE_SPIDER_BLOCKS": str(blocks)}
    if only is not None:
        env["SHPC_LITE_SPIDER_NAMES"] = "\n".join(only)
    argv = [lmod.lua, "-e", 'dofile(os.getenv("SHPC_LITE_SPIDER_UPDATE"))', str(lmod.spider), "-o", "spiderT",
            str(layout.modules)]
    try:
        proc = subprocess.run(argv, capture_output=True, env=env, timeout=3600)
        if proc.returncode == REFUSED and only is not None:
            return None
        _check(layout, proc)
        data = blocks.read_bytes()
    finally:
        layout.remove(blocks)
    entries: dict[str, bytes] = {}
    at = 0
    while data.startswith(b"B ", at):
        line_end = data.index(b"\n", at)
        name_len, text_len = (int(n) for n in data[at + 2:line_end].split())
        name_end = line_end + 1 + name_len
        entries[data[line_end + 1:name_end].decode()] = data[name_end:name_end + text_len]
        at = name_end + text_len
    places = proc.stdout.count(PLACEHOLDER)
    if data[at:] not in (b"E 1\n", b"E 0\n") or places > 1 or (places == 0 and (only is not None or entries)):
        raise SiteError(f"updating the Lmod spider cache in {cache} failed: "
                        "this Lmod's spider output is not understood")
    if places == 0:  # no module found: Lmod's text as it is
        return Walk(proc.stdout, b"", {}, False)
    prefix, suffix = proc.stdout.split(PLACEHOLDER)
    return Walk(prefix, suffix, entries, data[at:] == b"E 1\n")


def _check(layout: Layout, proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise SiteError(f"updating the Lmod spider cache in {layout.spider_cache} failed: {last}")


def _load_state(layout: Layout, lmod: LmodSpider) -> Optional[dict]:
    try:
        state = json.loads(layout.spider_state.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(state, dict) and state.get("format") == STATE_FORMAT and state.get("spider") == str(lmod.spider)
          and state.get("modules") == str(layout.modules) and isinstance(state.get("names"), dict)
          and isinstance(state.get("spans"), dict))
    return state if ok else None


def _changed(state: Optional[dict], names: Optional[dict[str, list[int]]]) -> Optional[list[str]]:
    """The names to walk again, or None for a full walk (no usable state, or most names changed)."""
    if names is None or state is None:
        return None
    before = state["names"]
    changed = sorted({n for n, mark in names.items() if before.get(n) != mark} | (before.keys() - names.keys()))
    return changed if len(changed) <= max(64, len(names) // 4) else None


def _identity(path: Path) -> list[int]:
    st = os.lstat(path)
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def _old_cache(layout: Layout, state: dict) -> Optional[Cache]:
    """The cache file, if it is still the very file the state describes (written anew, by
    Lmod's own tool say, it is another inode)."""
    target = layout.spider_cache / "spiderT.lua"
    try:
        if _identity(target) != state.get("file"):
            return None
        return Cache(target.read_bytes(), state["spans"])
    except OSError:
        return None


def _assemble(walk: Walk, old: Optional[Cache], walked: Optional[list[str]]) -> Cache:
    """The cache text: Lmod's text around the entries, sorted by name as Lmod's serializer sorts
    them (Lua's ``<`` on strings: bytes); an entry not walked again is copied from the old text."""
    pieces = dict(walk.entries)
    if old is not None and walked is not None:
        again = set(walked)
        for name, (offset, length) in old.spans.items():
            if name not in again:
                pieces[name] = old.text[offset:offset + length]
    out, spans, at = [walk.prefix], {}, len(walk.prefix)
    for name in sorted(pieces, key=lambda n: n.encode()):
        spans[name] = [at, len(pieces[name])]
        out.append(pieces[name])
        at += len(pieces[name])
    out.append(walk.suffix)
    return Cache(b"".join(out), spans)


def _settled(names: dict[str, list[int]], start: float) -> dict[str, list[int]]:
    """``names`` as the next refresh should compare them: a directory whose mtime is a whole
    second (a file system with coarse timestamps) within a second of ``start`` may have changed
    again after it was looked at without its mtime moving, so it is walked again next time."""
    recent = int(start * SECOND) - SECOND
    return {n: ([-1, mark[1]] if mark[0] % SECOND == 0 and mark[0] >= recent else mark) for n, mark in names.items()}


def _publish(layout: Layout, path: Path, data: bytes) -> None:
    """Write a cache file beside ``path`` and rename it over: readers see the old or the new one.

    Not fsynced (60 MB a refresh on a 20,000-module tree): a file cut short by a power loss does
    not load, and Lmod then walks the tree; the state names the file it describes."""
    fd, scratch = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(scratch, 0o644)
        os.replace(scratch, path)
    except BaseException:
        layout.remove(Path(scratch))
        raise


def _write_cache(layout: Layout, lmod: LmodSpider, names: Optional[dict[str, list[int]]], full: bool,
                 start: float) -> None:
    """Write spiderT.lua, its compiled form (what Lmod reads first) and the state beside them."""
    cache = layout.spider_cache
    state = None if full else _load_state(layout, lmod)
    walked = _changed(state, names)
    old = _old_cache(layout, state) if state is not None and walked is not None else None
    if old is None:
        walked = None
    elif not walked:
        return  # nothing changed since the cache was written
    walk = _walk(layout, lmod, walked)
    if walk is None:  # only a full walk can index what the tree holds now
        walked, old, walk = None, None, _walk(layout, lmod, None)
    made = _assemble(walk, old, walked)
    if not made.spans and walked is not None:  # the last modules went: Lmod's own text for that
        made = Cache(_walk(layout, lmod, None).prefix, {})
    target = cache / "spiderT.lua"
    _publish(layout, target, made.text)
    for backup in ("spiderT.old.lua", f"spiderT.old.{lmod.luac_ext}"):  # Lmod's tool keeps these
        layout.remove(cache / backup)
    if not lmod.luac:
        layout.remove(cache / f"spiderT.{lmod.luac_ext}")  # Lmod would read it first
    else:
        compiled = cache / f"spiderT.{lmod.luac_ext}"
        scratch = cache / f"{TMP_PREFIX}spiderT.{lmod.luac_ext}.{os.getpid()}"
        try:
            proc = subprocess.run([lmod.luac, "-o", str(scratch), str(target)], capture_output=True, timeout=600)
            _check(layout, proc)
            os.chmod(scratch, 0o644)
            os.replace(scratch, compiled)
        finally:
            layout.remove(scratch)
    if names is None or not walk.plain or not made.spans:
        layout.remove(layout.spider_state)  # the next refresh walks the whole tree
        return
    _publish(layout, layout.spider_state, json.dumps(
        {"format": STATE_FORMAT, "spider": str(lmod.spider), "modules": str(layout.modules),
         "file": _identity(target), "names": _settled(names, start), "spans": made.spans, "walked": walked}).encode())


def refresh(config: Config, full: bool = False) -> Optional[str]:
    """Bring the spider cache up to date if config ``spider_cache`` is on (Lmod only).

    Only the names changed since the last refresh are walked unless ``full``. Returns the line an
    admin puts into the site's shell start-up (LMOD_RC, and LMOD_SHORT_TIME so that no per-user
    cache can hide a change), or None when no cache is kept.
    """
    from filelock import Timeout

    from shpc_lite.modules import render
    from shpc_lite.store import lease

    layout = config.layout
    if not layout.system.spider_cache or not config["spider_cache"]:
        return None
    lmod = find_spider()
    cache = layout.make_dir(layout.spider_cache)
    layout.make_dir(layout.modules)
    try:
        with lease(layout.spider_lock, config["lock_lease"], timeout=3600):
            _refresh(layout, lmod, full)
    except Timeout:
        raise SiteError(f"timed out waiting for another refresh of the spider cache in {cache}") from None
    rc = layout.lmodrc
    atomic_write(rc, render("lmodrc.lua.j2", modules=str(layout.modules), cache_dir=str(cache),
                            timestamp=str(layout.spider_timestamp), rc=str(rc)))
    # Lmod writes a per-user cache after a walk longer than LMOD_SHORT_TIME and trusts it for a
    # day whenever the system cache is marked stale: a module installed then would stay hidden
    # from that user. With a system cache kept fresh no user needs one.
    return f"export LMOD_RC={rc} LMOD_SHORT_TIME={NO_USER_CACHE}"


def _refresh(layout: Layout, lmod: LmodSpider, full: bool) -> None:
    """Write the cache and mark it valid from when the tree was looked at, unless the tree changed
    meanwhile: every writer moves the timestamp forward after its change, so a timestamp that
    moved (or a name directory that did) means another round. After three rounds the cache
    stays marked stale and Lmod walks the tree."""
    timestamp = layout.spider_timestamp
    for _ in range(3):
        start = time.time()
        before = _stamp(timestamp)
        names = _names(layout.modules)
        _write_cache(layout, lmod, names, full, start)
        if _stamp(timestamp) == before:
            _set_timestamp(timestamp, start)
            if _names(layout.modules) == names:
                return
        invalidate(layout)


def _set_timestamp(path: Path, when: float) -> None:
    """The cache counts from ``when`` (not after the cache file's own mtime, so it is valid)."""
    if not path.is_file() or path.is_symlink():
        atomic_write(path, "")
    os.utime(path, (when, when), follow_symlinks=False)
