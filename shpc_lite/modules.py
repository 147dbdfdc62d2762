"""Modulefiles and wrapper scripts from one model (``ModuleSpec``) and Jinja2 templates.

All text lives in ``modulefiles/*.j2``; this module computes values (the runtime argv, the
quoting) once, so the Lmod and Tcl templates cannot disagree. Generated modulefiles never run
a subprocess or probe the filesystem at load time: every path is decided here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from shpc_lite.config import Config
from shpc_lite.errors import ConfigError, NotFoundError
from shpc_lite.fsutil import atomic_write
from shpc_lite.layout import RECORD as RECORD_NAME, Layout
from shpc_lite.module_systems import MODULE_SYSTEMS, ModuleSystem
from shpc_lite.packages import Package
from shpc_lite.recipe import GENERATED, Alias, Recipe
from shpc_lite.runtimes import SINGULARITY, RuntimeKind, runtime_kind
from shpc_lite.versions import newest, version_key

# A temp entry of another host's writer older than this is taken as left by a crash (staging
# one batch chunk takes seconds).
STALE_TEMP_SECONDS = 3600

# Device files whose presence means "this node has such a GPU" (checked by wrappers at run time).
GPU_DEVICES = {"nvidia": "/dev/nvidiactl", "amd": "/dev/kfd"}


@dataclass(frozen=True)
class Wrapper:
    """One script on PATH: ``exec <runtime> <subcommand> [options] <sif> [argv] "$@"``."""

    name: str
    subcommand: str
    argv: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModuleSpec:
    """Everything a modulefile and its wrappers say, resolved to plain values."""

    name: str
    version: str
    description: str
    url: str
    maintainer: str
    image: str
    tag: str
    digest: str
    sif: str
    wrapper_dir: str
    runtime: str
    runtime_module: str
    gpu: str
    gpu_mode: str
    bind: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    home: bool | str
    x11: bool
    aliases: tuple[Alias, ...]
    runtime_kind: RuntimeKind = SINGULARITY
    recipe_source: str = ""
    # What kinds that run the SIF themselves need (charliecloud): the image's own environment
    # and where its root file system starts in the SIF, both read once at install.
    image_env: tuple[tuple[str, str], ...] = ()
    partition_offset: int = 0
    # Found in the image at install (shpc_lite.packages) and the recipe's keywords: static
    # whatis/extensions text, so ``module spider torch`` and ``module keyword gpu`` find the module.
    packages: tuple[Package, ...] = ()
    keywords: tuple[str, ...] = ()
    package_cap: int = 500
    # The image's layer digests, lowest first (when the pull knew them): discover finds a
    # module's base among the installed modules by this prefix.
    layers: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def sif_env_var(self) -> str:
        return "SHPC_LITE_" + re.sub(r"[^A-Za-z0-9]", "_", self.name).upper() + "_SIF"

    @property
    def env_prefix(self) -> str:
        """Apptainer reads APPTAINERENV_*, Singularity SINGULARITYENV_* (and warns on the other)."""
        return self.runtime_kind.env_prefix

    @property
    def mount_name(self) -> str:
        """The SIF's file name without ``.sif``: one shared mount per node, user and image."""
        return Path(self.sif).name.rsplit(".", 1)[0]

    @property
    def pinned_image(self) -> str:
        """The image by digest, fully qualified (what podman and shifter are given)."""
        from shpc_lite.oci.reference import parse_reference

        ref = parse_reference(self.image)
        return f"{ref.name}@{self.digest}" if self.digest else str(ref.with_tag(self.tag))

    @property
    def runtime_options(self) -> tuple[str, ...]:
        """Options every wrapper passes, before the per-alias ones; GPU flags are added at run time."""
        opts: list[str] = []
        for path in self.bind:
            opts += ["-B", path]
        if self.home is False:
            opts.append("--no-home")
        elif isinstance(self.home, str):
            opts += ["--home", self.home]
        return tuple(opts)

    @property
    def plain_binds(self) -> tuple[str, ...]:
        """Binds as ``SRC[:DST]`` for runtimes without bind options (``make_spec`` refused
        ``:ro`` for those: it cannot be honoured, and a writable bind is not what was asked)."""
        return tuple(re.sub(r":rw$", "", path) for path in self.bind)

    @property
    def gpu_options(self) -> tuple[str, ...]:
        """What asks this kind of runtime for the recipe's GPU (added at run time, where present)."""
        return tuple(self.runtime_kind.gpu_options.get(self.gpu, ()))

    @property
    def gpu_device(self) -> str:
        return GPU_DEVICES.get(self.gpu, "")

    @property
    def wrappers(self) -> tuple[Wrapper, ...]:
        own = [Wrapper(a.name, "exec", a.argv, a.options) for a in self.aliases]
        own += [Wrapper(f"{self.name}-{sub}", sub) for sub in GENERATED]
        return tuple(own)

    @property
    def commands(self) -> list[str]:
        return [w.name for w in self.wrappers]

    @property
    def extensions(self) -> list[str]:
        """``name/version`` of the packages the modulefile declares: the first ``package_cap``
        (by name), so a huge conda environment cannot make every spider run slow."""
        return [p.spec for p in self.packages[: self.package_cap]]


def make_spec(
    recipe: Recipe, version: str, tag: str, digest: str, sif: Path, layout: Layout, config: Config,
    packages: tuple[Package, ...] = (), layers: tuple[str, ...] = (),
) -> ModuleSpec:
    kind = runtime_kind(config)
    binds = tuple(config["bind_paths"]) + recipe.bind
    if not kind.read_only_binds:
        for path in binds:
            if path.endswith(":ro"):
                raise ConfigError(f"{recipe.name}: bind {path!r} is read-only, which {kind.name} cannot do "
                                  f"(its binds are always writable): drop ':ro' or use another runtime_kind")
    image_env: tuple[tuple[str, str], ...] = ()
    offset = 0
    if kind.reads_image:
        from shpc_lite.inspect import inspect_sif
        from shpc_lite.sif import partition_offset, read_sif

        offset = partition_offset(read_sif(sif))
        image_env = tuple(sorted(inspect_sif(str(sif))["env"].items()))
    return ModuleSpec(
        name=recipe.name,
        version=version,
        description=recipe.description,
        url=recipe.url,
        maintainer=recipe.maintainer,
        image=recipe.image,
        tag=tag,
        digest=digest,
        sif=str(sif),
        wrapper_dir=str(layout.wrapper_bin(recipe.name, version)),
        runtime=config["runtime"],
        runtime_module=config["runtime_module"],
        gpu=recipe.features.gpu,
        gpu_mode=config["gpu"],
        bind=binds,
        env=recipe.env,
        home=recipe.features.home,
        x11=recipe.features.x11,
        aliases=recipe.aliases,
        runtime_kind=kind,
        recipe_source=recipe.source,
        image_env=image_env,
        partition_offset=offset,
        packages=packages,
        keywords=recipe.keywords,
        package_cap=config["package_cap"],
        layers=layers,
    )


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    from shpc_lite import quoting
    from shpc_lite.resources import templates_dir

    # Templates write code for sh, Lua and Tcl: every value goes through the quoting filter of its
    # context, and ``finalize`` refuses one that did not (recipe text must never become code).
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        finalize=quoting.finalize,
        keep_trailing_newline=True,
        auto_reload=False,  # templates are package data: not stat'ed again for every render
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(quoting.FILTERS)
    return env


def render(template: str, **context: Any) -> str:
    from shpc_lite import __version__

    return _environment().get_template(template).render(shpc_lite_version=__version__, **context)


def render_modulefile(spec: ModuleSpec, system: ModuleSystem) -> str:
    return render(system.module_template, spec=spec)


def render_wrapper(spec: ModuleSpec, wrapper: Wrapper) -> str:
    return render(spec.runtime_kind.template, spec=spec, wrapper=wrapper)


# ---------------------------------------------------------------------------------------------
# The installed tree: <root>/modules/<name>/<version>[.lua], <root>/wrappers/<name>/<version>/


@dataclass(frozen=True)
class Installed:
    """What ``install.json`` records beside the wrappers of one installed version."""

    name: str
    version: str
    image: str
    tag: str
    digest: str
    sif: str
    module_system: str
    modulefile: str
    commands: tuple[str, ...] = ()
    gpu: str = "none"
    description: str = ""
    default: bool = False  # chosen as the default by the site (else the newest is)
    packages: tuple[str, ...] = ()  # ``name/version`` found in the image (all, not only the capped)
    layers: tuple[str, ...] = ()  # layer digests, lowest first (empty when the pull did not know them)

    @classmethod
    def from_json(cls, text: str) -> "Installed":
        data = json.loads(text)
        data["commands"] = tuple(data.get("commands", ()))
        data["packages"] = tuple(str(p) for p in data.get("packages", ()))
        data["layers"] = tuple(str(d) for d in data.get("layers", ()))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def installed(layout: Layout, name: Optional[str] = None) -> list[Installed]:
    """Installed versions (of one module or all), sorted by name then version.

    A record counts only where it says what its place in the tree says (name and version), so
    an edited or planted ``install.json`` cannot make another module's files look like its own.
    """
    found = []
    for module, version, path in layout.records(name):
        try:
            record = Installed.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            continue  # a half-removed or foreign directory: not ours to list
        if (record.name, record.version) == (module, version):
            found.append(record)
    return sorted(found, key=lambda i: (i.name, version_key(i.version)))


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


def write_module(spec: ModuleSpec, layout: Layout, config: Config, default: bool = False) -> Installed:
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

    results = [WriteResult(p) for p in pending]
    staged: list[tuple[WriteResult, _Staged]] = []
    for name in dict.fromkeys(p.spec.name for p in pending):
        _sweep(layout, name)
    for result in results:
        try:
            staged.append((result, _stage(result.pending, layout)))
        except BaseException as err:  # noqa: BLE001 - reported per module
            result.error = err
            if not isinstance(err, Exception):
                _unstage([s for _, s in staged])
                raise
    # The defaults of every name, computed as if all staged modules publish, join the same flush.
    rcs = _stage_defaults(layout, [s.pending.spec.name for _, s in staged], config, [s.record for _, s in staged])
    try:
        fsutil.flush([f for _, s in staged for f in s.files] + [rc.tmp for rc in rcs if rc.tmp],
                     [d for _, s in staged for d in s.dirs])
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
                        _write_record(layout, dataclasses.replace(other, default=False))
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
    return results


def _stage(pending: PendingModule, layout: Layout) -> _Staged:
    from shpc_lite.fsutil import mkdir_new, temp_name, write_new

    spec = pending.spec
    final = layout.version_dir(spec.name, spec.version)
    modulefile = layout.modulefile(spec.name, spec.version)
    layout.make_dir(final.parent)
    layout.make_dir(modulefile.parent)
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
    )
    # Rendered before anything is created: a template error leaves nothing to undo.
    wrappers = [(w.name, render_wrapper(spec, w).encode()) for w in spec.wrappers]
    module_text = render_modulefile(spec, layout.system).encode()
    stage = os.path.join(final.parent, temp_name(spec.version))
    item = _Staged(pending, record, stage, os.path.join(stage, temp_name("record")),
                   os.path.join(modulefile.parent, temp_name(spec.version + ".mod")), [],
                   [stage, os.path.join(stage, "bin"), str(final.parent), str(modulefile.parent)])
    try:
        mkdir_new(stage, 0o755)
        bindir = os.path.join(stage, "bin")
        mkdir_new(bindir, 0o755)
        for name, text in wrappers:
            path = os.path.join(bindir, name)
            write_new(path, text, 0o755)
            item.files.append(path)
        write_new(item.stage_record, _record_json(record).encode(), 0o644)
        write_new(item.modulefile_tmp, module_text, 0o644)
        item.files += [item.stage_record, item.modulefile_tmp]
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


def _record_json(record: Installed) -> str:
    return json.dumps(asdict(record), indent=2, sort_keys=True) + "\n"


def _write_record(layout: Layout, record: Installed) -> None:
    atomic_write(layout.inside(layout.record(record.name, record.version)), _record_json(record))


def remove_module(layout: Layout, record: Installed, config: Config) -> None:
    """Remove the modulefile first (users stop seeing it), then the wrappers.

    What is removed is derived from (name, version) through the layout, never from paths stored
    in the record, and nothing is followed through a symlink out of the root."""
    systems = {layout.system, MODULE_SYSTEMS.get(record.module_system, layout.system)}
    for system in systems:
        layout.remove(layout.modulefile(record.name, record.version, system))
    layout.remove(layout.version_dir(record.name, record.version))
    write_defaults(layout, record.name, config)
    layout.remove_empty_parents(layout.wrapper_root(record.name), layout.wrappers)


def write_defaults(layout: Layout, name: str, config: Config) -> None:
    """Rewrite ``.modulerc.lua`` / ``.modulerc`` for one module: default version and GPU tags."""
    changed: set[str] = set()
    write_defaults_many(layout, [name], config, changed)
    from shpc_lite.fsutil import flush

    flush((), sorted(changed))


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
    try:
        for name in dict.fromkeys(names):
            rc = _StagedRc(name, layout.inside(layout.modulerc(name)))
            text = _defaults_text(layout, name, config, [r for r in new if r.name == name])
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


def find_installed(layout: Layout, name: str, version: Optional[str] = None) -> list[Installed]:
    records = installed(layout, name)
    if version is not None:
        records = [r for r in records if r.version == version]
    if not records:
        what = f"{name}:{version}" if version else name
        raise NotFoundError(f"{what} is not installed in {layout.root}")
    return records


__all__ = [
    "ModuleSpec",
    "Wrapper",
    "Installed",
    "make_spec",
    "render_modulefile",
    "render_wrapper",
    "write_module",
    "remove_module",
    "write_defaults",
    "write_modules",
    "PendingModule",
    "WriteResult",
    "installed",
    "find_installed",
    "newest",
]
