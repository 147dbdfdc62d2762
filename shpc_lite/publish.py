"""Publishing generated modules: many at once, with as few flushes as crash safety allows.

A batch stages every file of its modules under hidden temp names, flushes them once, then
renames them into place in the order that keeps every visible module whole (wrappers, then the
modulefile, then the defaults, then the record). The argument for why that order is enough
after ``kill -9`` and after a power cut is in docs/site.md ("Crash safety of batch writes").
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from shpc_lite.config import Config
from shpc_lite.index import invalidate
from shpc_lite.kernels import SPEC_FILE, check_name
from shpc_lite.layout import KERNELS, RECORD as RECORD_NAME, Layout
from shpc_lite.modules import (Installed, ModuleSpec, record_json, write_record, installed, render,
                               render_modulefile, render_wrapper)
from shpc_lite.versions import newest, version_key

# A temp entry of another host's writer older than this is taken as left by a crash (staging
# one batch chunk takes seconds).
STALE_TEMP_SECONDS = 3600


@dataclass(frozen=True)
class PendingModule:
    """One module for ``write_modules``: its spec, and whether the site makes it the default."""

    spec: ModuleSpec
    default: bool = False


@dataclass
class WriteResult:
    """What became of one ``PendingModule``: its record, or the error that stopped it (that
    module's files are then as they were; the others of the batch are not affected)."""

    pending: PendingModule
    record: Optional[Installed] = None
    error: Optional[BaseException] = None


@dataclass
class _Staged:
    """A module's files, written under hidden temp names beside where they will be published."""

    pending: PendingModule
    record: Installed
    stage: str  # <root>/wrappers/<name>/.shpc-lite-tmp-...: bin/ with the wrappers
    stage_record: str  # the record, inside the stage under a hidden name (published last)
    modulefile_tmp: str  # <root>/modules/<name>/.shpc-lite-tmp-...
    files: list[str]
    dirs: list[str]


def write_one(spec: ModuleSpec, layout: Layout, config: Config, default: bool = False) -> Installed:
    """Write one module (a batch of one: see ``write_modules``); raises what stopped it."""
    result = write_modules([PendingModule(spec, default)], layout, config)[0]
    if result.error is not None:
        raise result.error
    assert result.record is not None
    return result.record


def write_modules(pending: list[PendingModule], layout: Layout, config: Config) -> list[WriteResult]:
    """Write many modules with one flush barrier for all their files, defaults once per name.

    1. stage: each module's wrappers (``bin/``) and record go into a hidden directory beside its
       final one, its modulefile into a hidden file beside its final name (no fsync each);
    2. flush: one ``syncfs`` (else fsync of each file) makes all of it durable;
    3. publish, per module: the wrapper directory is renamed into place, then the modulefile
       (what users see);
    4. defaults: ``.modulerc[.lua]`` once per name of the batch (staged in step 1 and flushed
       in step 2 with the modules), renamed;
    5. the records (what ``list`` and a rerun see): a module with a record is complete, so a
       rerun after a crash anywhere before redoes the module and its defaults;
    6. one more flush (``syncfs``, else an fsync of every directory a rename changed).

    Why this order is enough after ``kill -9`` or a power cut: docs/site.md, "Crash safety of
    batch writes". A module whose staging or publishing fails is rolled back alone.
    """
    from shpc_lite import fsutil

    # The spider cache is marked stale before anything changes and again after (``finally``):
    # Lmod walks the tree until the next refresh, so it never hides a module (shpc_lite.index).
    invalidate(layout)
    results = [WriteResult(p) for p in pending]
    for name in dict.fromkeys(p.spec.name for p in pending):
        _sweep(layout, name)
    staged = _stage_all(results, layout, config)
    # The defaults of every name, computed as if all staged modules publish, join the same flush.
    rcs = _stage_defaults(layout, [s.pending.spec.name for _, s in staged], config, [s.record for _, s in staged])
    try:
        try:
            fsutil.flush([f for _, s in staged for f in s.files] + [rc.tmp for rc in rcs if rc.tmp],
                         [d for _, s in staged for d in s.dirs])
        except BaseException:  # a write-back error: nothing was published
            _unstage([s for _, s in staged])
            raise
        changed: set[str] = set()
        published: list[_Staged] = []
        for i, (result, item) in enumerate(staged):
            try:
                _publish(item, layout, changed)
                result.record = item.record
                published.append(item)
            except BaseException as err:  # noqa: BLE001
                result.error = err
                if not isinstance(err, Exception):
                    _unstage([s for _, s in staged[i + 1:]])
                    raise
        for item in published:
            if item.pending.default:
                spec = item.pending.spec
                for other in installed(layout, spec.name):
                    if other.default and other.version != spec.version:
                        write_record(layout, dataclasses.replace(other, default=False))
        # Defaults before the records: a module has its record only once everything about it is
        # written, so a rerun after a crash anywhere before redoes the module and its defaults.
        # A name where a module failed gets its defaults computed again from what is there.
        failed = {r.pending.spec.name for r in results if r.error is not None}
        _publish_defaults(layout, [rc for rc in rcs if rc.name not in failed], changed)
        write_defaults_many(layout, sorted(failed & {s.record.name for s in published}), config, changed,
                            [s.record for s in published])
        for item in published:
            final = layout.version_dir(item.record.name, item.record.version)
            os.rename(final / os.path.basename(item.stage_record), final / RECORD_NAME)
        fsutil.flush((), sorted(changed))
    finally:
        for rc in rcs:
            if rc.tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(rc.tmp)
        invalidate(layout)
    return results


# A thread creating the staged files while the main thread renders the next modules (creating a
# file is a system call that releases the GIL). One: creates on one ext4 file system took as long
# in total with 2 or 4 threads (they serialize in the kernel), so more threads only add switches.
STAGE_THREADS = 1


def _stage_all(results: list[WriteResult], layout: Layout, config: Config) -> list[tuple[WriteResult, _Staged]]:
    """Stage every module: rendered here (pure), its files created by STAGE_THREADS thread(s).
    A module that fails is reported on its result (nothing of it left); on an interrupt
    (KeyboardInterrupt, SystemExit) everything staged is removed and it propagates. Nothing is
    published here: the flush and the publish order of ``write_modules`` are unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    try:
        with ThreadPoolExecutor(max_workers=STAGE_THREADS, thread_name_prefix="stage") as pool:
            for result in results:
                try:
                    rendered = _render(result.pending, layout, config)
                except Exception as err:  # noqa: BLE001 - reported per module
                    result.error = err
                    continue
                jobs.append((result, pool.submit(_create, rendered, layout)))
        staged = []
        for result, job in jobs:  # all done: the pool was shut down (waiting) above
            err = job.exception()
            if err is None:
                staged.append((result, job.result()))
            elif isinstance(err, Exception):
                result.error = err
            else:
                raise err
        return staged
    except BaseException:
        _unstage([job.result() for _, job in jobs if job.done() and job.exception() is None])
        raise


@dataclass
class _Rendered:
    """A module's files as text, and where they go: everything of staging but the system calls."""

    pending: PendingModule
    record: Installed
    wrappers: list[tuple[str, bytes]]
    module_text: bytes
    record_text: bytes
    kernel: Optional[object]


def _render(pending: PendingModule, layout: Layout, config: Config) -> _Rendered:
    from shpc_lite import mpi

    spec = pending.spec
    modulefile = layout.modulefile(spec.name, spec.version)
    record = Installed(
        name=spec.name,
        version=spec.version,
        image=spec.image,
        tag=spec.tag,
        digest=spec.digest,
        sif=spec.sif,
        module_system=layout.system.name,
        modulefile=str(modulefile),
        commands=tuple(spec.commands),
        gpu=spec.gpu,
        description=spec.description,
        default=pending.default,
        packages=tuple(p.spec for p in spec.packages),
        layers=spec.layers,
        venv=spec.venv,
        base=spec.base,
        mpi=mpi.HOST if spec.mpi else "none",
        mpi_settings=mpi.settings_digest(config) if spec.mpi else "",
    )
    # Rendered before anything is created: a template error leaves nothing to undo.
    wrappers = [(w.name, render_wrapper(spec, w).encode()) for w in spec.wrappers]
    module_text = render_modulefile(spec, layout.system).encode()
    kernel = None
    if spec.jupyter_path:
        from shpc_lite.kernels import module_kernel

        kernel = module_kernel(spec)
    return _Rendered(pending, record, wrappers, module_text, record_json(record).encode(), kernel)


def _create(rendered: _Rendered, layout: Layout) -> _Staged:
    """Create a rendered module's files under hidden temp names (removed again on failure)."""
    from shpc_lite.fsutil import mkdir_new, temp_name, write_new

    pending, record, kernel = rendered.pending, rendered.record, rendered.kernel
    spec = pending.spec
    final = layout.version_dir(spec.name, spec.version)
    modulefile = layout.modulefile(spec.name, spec.version)
    layout.make_dir(final.parent)
    layout.make_dir(modulefile.parent)
    stage = os.path.join(final.parent, temp_name(spec.version))
    item = _Staged(pending, record, stage, os.path.join(stage, temp_name("record")),
                   os.path.join(modulefile.parent, temp_name(spec.version + ".mod")), [],
                   [stage, os.path.join(stage, "bin"), str(final.parent), str(modulefile.parent)])
    try:
        mkdir_new(stage, 0o755)
        bindir = os.path.join(stage, "bin")
        mkdir_new(bindir, 0o755)
        for name, text in rendered.wrappers:
            path = os.path.join(bindir, name)
            write_new(path, text, 0o755)
            item.files.append(path)
        write_new(item.stage_record, rendered.record_text, 0o644)
        write_new(item.modulefile_tmp, rendered.module_text, 0o644)
        item.files += [item.stage_record, item.modulefile_tmp]
        if kernel is not None:  # jupyter: true: the kernelspec the modulefile's JUPYTER_PATH shows
            directory = stage
            for part in (*Path(spec.jupyter_path).relative_to(final).parts, KERNELS, check_name(kernel.name)):
                directory = os.path.join(directory, part)
                mkdir_new(directory, 0o755)
                item.dirs.append(directory)
            write_new(os.path.join(directory, SPEC_FILE), kernel.to_json().encode(), 0o644)
            item.files.append(os.path.join(directory, SPEC_FILE))
    except BaseException:
        _unstage([item])
        raise
    return item


def _unstage(items: list[_Staged]) -> None:
    for item in items:
        shutil.rmtree(item.stage, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(item.modulefile_tmp)


def _publish(item: _Staged, layout: Layout, changed: set[str]) -> None:
    """Wrappers into place, then the modulefile (the record comes after the defaults). A
    reinstall swaps the new wrapper directory with the old one in one step (``renameat2``
    RENAME_EXCHANGE) where the file system can, so the old modulefile never names a missing
    directory; else the old one is moved aside first. On failure the version's previous files
    come back."""
    from shpc_lite.fsutil import exchange, temp_name

    spec = item.pending.spec
    final = str(layout.inside(layout.version_dir(spec.name, spec.version)))
    modulefile = str(layout.inside(layout.modulefile(spec.name, spec.version)))
    old = None
    swapped = False
    try:
        if not os.path.lexists(final):
            os.rename(item.stage, final)
        elif exchange(item.stage, final):
            old, swapped = item.stage, True  # the stage's name now holds the old directory
        else:
            old = os.path.join(os.path.dirname(final), temp_name(f"old-{spec.version}"))
            os.rename(final, old)
            os.rename(item.stage, final)
        os.replace(item.modulefile_tmp, modulefile)
    except BaseException:
        if swapped:
            exchange(item.stage, final)
            old = None
        _unstage([item])
        if old is not None:
            layout.remove(Path(final))
            os.rename(old, final)
            old = None
        raise
    finally:
        if old is not None:
            layout.remove(Path(old))
    # The name directories too: a first install of a name created them.
    changed.update((os.path.dirname(final), final, os.path.dirname(modulefile), str(layout.modules),
                    str(layout.wrappers)))


def _sweep(layout: Layout, name: str) -> None:
    """Remove what a killed writer left in this name's directories (hidden temp files and
    directories of a dead process of this host, or older than an hour): a rerun leaves no
    garbage. One directory read per name; a live writer's temps are never touched."""
    import time

    from shpc_lite.fsutil import stale_temp

    now = time.time()
    for directory in (layout.wrapper_root(name), layout.module_dir(name)):
        try:
            with os.scandir(layout.inside(directory / "_").parent) as entries:
                leftovers = [e for e in entries
                             if stale_temp(e.name, e.stat(follow_symlinks=False).st_mtime, now, STALE_TEMP_SECONDS)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in leftovers:
            layout.remove(Path(entry.path))


def write_defaults(layout: Layout, name: str, config: Config) -> None:
    """Rewrite ``.modulerc.lua`` / ``.modulerc`` for one module: default version and GPU tags.

    The last step of every change to a name: the spider cache is marked stale again after it, so a
    refresh that looked at the tree before the change cannot leave a cache that hides it."""
    from shpc_lite.fsutil import flush

    try:
        changed: set[str] = set()
        write_defaults_many(layout, [name], config, changed)
        flush((), sorted(changed))
    finally:
        invalidate(layout)


@dataclass
class _StagedRc:
    """A name's defaults file: its new text staged at ``tmp``, or (``tmp`` empty) to be removed."""

    name: str
    path: Path
    tmp: str = ""


def write_defaults_many(layout: Layout, names: list[str], config: Config, changed: set[str],
                        new: list[Installed] = ()) -> None:
    """The defaults file of each name, once however many of its versions a batch wrote: all
    staged, one flush, then renamed (or removed where nothing is left to mark). Directories
    changed are added to ``changed`` for the caller's final flush. ``new``: records about to be
    published (they count as installed)."""
    from shpc_lite.fsutil import flush

    staged = _stage_defaults(layout, names, config, new)
    try:
        flush([rc.tmp for rc in staged if rc.tmp])
        _publish_defaults(layout, staged, changed)
    finally:
        for rc in staged:
            if rc.tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(rc.tmp)


def _stage_defaults(layout: Layout, names: list[str], config: Config, new: list[Installed]) -> list[_StagedRc]:
    from shpc_lite.fsutil import temp_name, write_new

    staged: list[_StagedRc] = []
    new_of: dict[str, list[Installed]] = {}
    for record in new:
        new_of.setdefault(record.name, []).append(record)
    try:
        for name in dict.fromkeys(names):
            rc = _StagedRc(name, layout.inside(layout.modulerc(name)))
            text = _defaults_text(layout, name, config, new_of.get(name, []))
            if text is not None:
                layout.make_dir(rc.path.parent)
                rc.tmp = os.path.join(rc.path.parent, temp_name("rc"))
                write_new(rc.tmp, text.encode(), 0o644)
            staged.append(rc)
    except BaseException:
        for rc in staged:
            if rc.tmp:
                os.unlink(rc.tmp)
        raise
    return staged


def _publish_defaults(layout: Layout, staged: list[_StagedRc], changed: set[str]) -> None:
    """Rename each staged defaults file into place, or remove one that marks nothing now."""
    for rc in staged:
        if rc.tmp:
            os.replace(rc.tmp, rc.path)
            rc.tmp = ""
            changed.add(str(rc.path.parent))
        else:
            if layout.remove(rc.path):
                changed.add(str(rc.path.parent))
            layout.remove_empty_parents(rc.path.parent, layout.modules)


def _defaults_text(layout: Layout, name: str, config: Config, new: list[Installed]) -> Optional[str]:
    """What ``.modulerc[.lua]`` of ``name`` says (default version, GPU tags); None for no file."""
    versions = {r.version for r in new}
    records = [r for r in installed(layout, name) if r.version not in versions]
    if any(r.default for r in new):  # the site's new choice replaces an earlier one
        records = [dataclasses.replace(r, default=False) for r in records]
    records += new
    records = sorted((r for r in records if r.module_system == layout.system.name), key=lambda r: version_key(r.version))
    chosen = [r.version for r in records if r.default]
    default = chosen[0] if chosen else newest(r.version for r in records) if config["default_version"] == "newest" else None
    gpu_versions = [r.version for r in records if r.gpu != "none"]
    if not records or (default is None and not gpu_versions):
        return None
    return render(layout.system.rc_template, name=name, default=default, gpu_versions=gpu_versions)
