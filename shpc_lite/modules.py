"""Modulefiles and wrapper scripts from one model (``ModuleSpec``) and Jinja2 templates.

All text lives in ``modulefiles/*.j2``; this module computes values (the runtime argv, the
quoting) once, so the Lmod and Tcl templates cannot disagree. Generated modulefiles never run
a subprocess or probe the filesystem at load time: every path is decided here.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from shpc_lite.config import Config
from shpc_lite.errors import ConfigError, NotFoundError
from shpc_lite.fsutil import atomic_write
from shpc_lite.layout import Layout
from shpc_lite.module_systems import MODULE_SYSTEMS, ModuleSystem
from shpc_lite.packages import Package
from shpc_lite.recipe import GENERATED, Alias, Recipe
from shpc_lite.runtimes import SINGULARITY, RuntimeKind, runtime_kind
from shpc_lite.versions import newest, version_key

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
    # Host paths seen at the same path inside the container (a venv): each kind binds them its way.
    host_paths: tuple[str, ...] = ()
    # ``jupyter: true``: the JUPYTER_PATH entry the modulefile prepends (its kernelspec is written
    # with the wrappers); empty for other modules.
    jupyter_path: str = ""
    # A venv module: the venv's path and the module (name/version) it was made from.
    venv: str = ""
    base: str = ""
    # mpi: host: config mpi_binds are in ``bind`` and mpi_env in ``env`` already; kinds that do not
    # pass the caller's environment and file descriptors on (podman) pass PMI's on as well.
    mpi: bool = False

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
        for path in self.bind + self.host_paths:
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
    from shpc_lite import mpi

    kind = runtime_kind(config)
    host_mpi = mpi.mode(recipe.features.mpi, config) == mpi.HOST
    binds = tuple(config["bind_paths"]) + recipe.bind
    env = recipe.env
    if host_mpi:
        # The site's knowledge of its MPI wins over the recipe's env of the same name.
        binds += tuple(config["mpi_binds"])
        env = tuple((k, v) for k, v in env if k not in config["mpi_env"]) + tuple(sorted(config["mpi_env"].items()))
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
        env=env,
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
        jupyter_path=str(layout.jupyter_dir(recipe.name, version)) if recipe.features.jupyter else "",
        mpi=host_mpi,
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


@functools.lru_cache(maxsize=None)
def _template(name: str) -> Any:
    """A compiled template, looked up once per process (a batch renders thousands)."""
    return _environment().get_template(name)


def render(template: str, **context: Any) -> str:
    from shpc_lite import __version__

    return _template(template).render(shpc_lite_version=__version__, **context)


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
    venv: str = ""  # a venv module: the venv's path (shpc_lite.venvs)
    base: str = ""  # a venv module: the module it was made from (name/version)
    mpi: str = "none"  # host: the wrappers bind the host's MPI (doctor checks it against the image)
    mpi_settings: str = ""  # mpi.settings_digest of the mpi_binds/mpi_env written into the wrappers

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


def record_json(record: Installed) -> str:
    """The text of ``install.json``."""
    # Its fields are strings, bools and tuples of strings: a shallow dict is what ``asdict``'s
    # deep copy would give json (tuples are written as lists either way), at a fraction of the cost.
    return json.dumps({name: getattr(record, name) for name in record.__dataclass_fields__},
                      indent=2, sort_keys=True) + "\n"


def write_record(layout: Layout, record: Installed) -> None:
    """Rewrite the record of an installed module in place (its ``default`` flag)."""
    atomic_write(layout.inside(layout.record(record.name, record.version)), record_json(record))


def write_module(spec: ModuleSpec, layout: Layout, config: Config, default: bool = False) -> Installed:
    """Write one module: a batch of one (shpc_lite.publish.write_modules)."""
    from shpc_lite.publish import write_one

    return write_one(spec, layout, config, default)


def write_defaults(layout: Layout, name: str, config: Config) -> None:
    """Rewrite ``.modulerc.lua`` / ``.modulerc`` for one module (shpc_lite.publish.write_defaults)."""
    from shpc_lite.publish import write_defaults as write

    write(layout, name, config)


def remove_module(layout: Layout, record: Installed, config: Config) -> None:
    """Remove the modulefile first (users stop seeing it), then the wrappers.

    What is removed is derived from (name, version) through the layout, never from paths stored
    in the record, and nothing is followed through a symlink out of the root."""
    from shpc_lite.index import invalidate  # not at the top: ``list`` and ``show`` start without it

    invalidate(layout)
    systems = {layout.system, MODULE_SYSTEMS.get(record.module_system, layout.system)}
    for system in systems:
        layout.remove(layout.modulefile(record.name, record.version, system))
    layout.remove(layout.version_dir(record.name, record.version))
    write_defaults(layout, record.name, config)
    layout.remove_empty_parents(layout.wrapper_root(record.name), layout.wrappers)


def locate(config: Config, name: str, version: Optional[str] = None) -> tuple[Layout, Installed]:
    """An installed module (its newest version unless one is named) in this tree, else in the
    central tree a user's tree reuses: what ``kernel install`` and ``venv create`` start from."""
    error = None
    for layout in filter(None, (config.layout, config.central_layout)):
        try:
            return layout, find_installed(layout, name, version)[-1]
        except NotFoundError as err:
            error = error or err
    assert error is not None
    raise error


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
    "installed",
    "find_installed",
    "newest",
]
