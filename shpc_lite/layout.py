"""Every on-disk name under one root (a site's central tree or a user's private one).

The tree::

    <root>/modules/<name>/<version>[.lua]          modulefiles (+ .modulerc[.lua] per name)
    <root>/wrappers/<name>/<version>/bin/<cmd>       wrapper scripts, outside MODULEPATH
    <root>/wrappers/<name>/<version>/install.json    the install record (a venv module's names its venv)
    <root>/wrappers/<name>/<version>/jupyter/kernels/<kernel>/kernel.json
                                                     a recipe's kernelspec (``jupyter: true``),
                                                     the dir on the module's JUPYTER_PATH
    <root>/containers/<algo>-<hex>.sif               pulled images, by manifest digest
    <root>/containers/file-<algo>-<hex>.sif          images imported with --sif, by file digest
    <root>/containers/.locks/<algo>-<hex>.lock       per-digest pull locks
    <root>/containers/.refs/<image stem>/<name>@<version>  which modules use a stored image
    <root>/containers/.refs/.complete                  every record of the tree has its ref
    <root>/containers/.shpc-lite-tmp-<algo>-<hex>.*  scratch dirs of running (or killed) pulls
    <root>/cache/blobs/<algo>/<hex>/data             verified layer blobs (+ <hex>.lock)
    <root>/cache/apptainer, <root>/cache/lmod        Apptainer's cache, Lmod's spider cache
    <root>/views/<view>/<name>/<version>[.lua]       views: symlinks to modulefiles
    <root>/shpc-lite.lock, <root>/lmodrc.lua         the lock file, the spider cache's rc
    <root>/cache/lmod/spiderT.lua(c_5.3), timestamp  the spider cache (+ shpc-lite-names.json, refresh.lock)
    <root>/batch/<id>/                               Slurm batch installs (tasks, logs, outcomes)

Names and digests come from recipes, records and registries, which nobody here controls: each
is checked to be one safe path component before it is joined, so no path made here leaves the
root. The tree itself may have been tampered with (a symlinked ``modules/<name>``), so what
writes or deletes goes through ``inside``, which refuses to pass through a symlink below the
root; the root itself is the site's configuration and may be a symlink.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from shpc_lite.errors import StoreError
from shpc_lite.fsutil import TMP_PREFIX
from shpc_lite.module_systems import DEFAULT, ModuleSystem

# One path component a name or version may become: no '/', no leading '.', nothing a shell or
# module system treats specially.
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
IMPORTED_PREFIX = "file-"
SIF_SUFFIX = ".sif"
RECORD = "install.json"
# Written into a venv shpc-lite created (outside the root, wherever the user asked): only a
# directory holding it may be deleted by ``venv remove --delete``.
VENV_MARKER = ".shpc-lite-venv.json"
VENV_SUFFIX = "-venv"  # <name>-venv/<version>: a venv module's default name
KERNELS = "kernels"  # Jupyter's kernelspec dir below every entry of its data path


def valid_digest(digest: str) -> bool:
    from shpc_lite.oci.reference import is_digest

    return is_digest(digest)


def _digest_stem(digest: str) -> str:
    """``sha256:<hex>`` -> ``sha256-<hex>``, the form a digest takes in file names."""
    if not valid_digest(digest):
        raise StoreError(f"invalid digest {str(digest)[:80]!r}")
    return digest.replace(":", "-", 1)


def _stem_digest(stem: str) -> Optional[str]:
    digest = stem.replace("-", ":", 1)
    return digest if valid_digest(digest) else None


@dataclass(frozen=True)
class Layout:
    root: Path
    system: ModuleSystem = DEFAULT

    def __post_init__(self) -> None:
        root = Path(self.root)
        if not root.is_absolute():
            raise StoreError(f"root {str(root)!r} is not an absolute path")
        object.__setattr__(self, "root", Path(os.path.normpath(root)))

    def with_root(self, root: Path) -> "Layout":
        return Layout(Path(root), self.system)

    # ----------------------------------------------------------------------------- top level
    @property
    def modules(self) -> Path:
        return self.root / "modules"

    @property
    def wrappers(self) -> Path:
        return self.root / "wrappers"

    @property
    def containers(self) -> Path:
        return self.root / "containers"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def views(self) -> Path:
        return self.root / "views"

    @property
    def lock_file(self) -> Path:
        return self.root / "shpc-lite.lock"

    @property
    def batches(self) -> Path:
        return self.root / "batch"

    @property
    def lmodrc(self) -> Path:
        return self.root / "lmodrc.lua"

    @property
    def spider_cache(self) -> Path:
        return self.cache / self.system.name

    @property
    def spider_timestamp(self) -> Path:
        """Lmod's cache timestamp file: the cache counts only while it is not older than this."""
        return self.spider_cache / "timestamp"

    @property
    def spider_state(self) -> Path:
        """What each module name's directory looked like when the spider cache was made."""
        return self.spider_cache / "shpc-lite-names.json"

    @property
    def spider_lock(self) -> Path:
        return self.spider_cache / "refresh.lock"

    @property
    def apptainer_cache(self) -> Path:
        return self.cache / "apptainer"

    @property
    def blobs(self) -> Path:
        return self.cache / "blobs"

    @property
    def digest_locks(self) -> Path:
        return self.containers / ".locks"

    # ----------------------------------------------------------------------------- modules
    def module_dir(self, name: str) -> Path:
        return self.modules / component(name, "module name")

    def modulefile(self, name: str, version: str, system: Optional[ModuleSystem] = None) -> Path:
        filename = (system or self.system).modulefile_name(component(version, "version"))
        return self.module_dir(name) / filename

    def modulerc(self, name: str) -> Path:
        return self.module_dir(name) / self.system.rc_file

    def wrapper_root(self, name: str) -> Path:
        return self.wrappers / component(name, "module name")

    def version_dir(self, name: str, version: str) -> Path:
        return self.wrapper_root(name) / component(version, "version")

    def wrapper_bin(self, name: str, version: str) -> Path:
        return self.version_dir(name, version) / "bin"

    def jupyter_dir(self, name: str, version: str) -> Path:
        """The module's entry for ``JUPYTER_PATH`` (its kernelspec is in ``kernels/`` below)."""
        return self.version_dir(name, version) / "jupyter"

    @staticmethod
    def venv_module(name: str) -> str:
        """The default module name of a venv made from module ``name``."""
        return component(name + VENV_SUFFIX, "module name")

    def record(self, name: str, version: str) -> Path:
        return self.version_dir(name, version) / RECORD

    def records(self, name: Optional[str] = None) -> Iterator[tuple[str, str, Path]]:
        """(name, version, record file) of every install record, found without following
        symlinks: a planted link to elsewhere is not an installed module."""
        # Joined as strings, one Path per record: on a 20,000-module tree building Paths for
        # every step was most of what ``list`` spent.
        wrappers = os.fspath(self.wrappers)
        names = [component(name, "module name")] if name else _real_dirs(wrappers)
        for module in filter(_COMPONENT.fullmatch, names):
            versions = os.path.join(wrappers, module)
            for version in filter(_COMPONENT.fullmatch, _real_dirs(versions)):
                record = os.path.join(versions, version, RECORD)
                if _is_regular(record):
                    yield module, version, Path(record)

    # ----------------------------------------------------------------------------- views
    def view_dir(self, view: str) -> Path:
        return self.views / component(view, "view name")

    def view_entry(self, view: str, name: str, version: str, system: Optional[ModuleSystem] = None) -> Path:
        filename = (system or self.system).modulefile_name(component(version, "version"))
        return self.view_dir(view) / component(name, "short name") / filename

    # ----------------------------------------------------------------------------- store
    def image(self, digest: str, imported: bool = False) -> Path:
        prefix = IMPORTED_PREFIX if imported else ""
        return self.containers / f"{prefix}{_digest_stem(digest)}{SIF_SUFFIX}"

    def image_digest(self, path: Path) -> Optional[str]:
        """The digest a path of this store is named after; None for anything else (a path in
        another directory, a foreign name): the inverse of ``image``."""
        path = Path(path)
        if path.parent != self.containers or not path.name.endswith(SIF_SUFFIX):
            return None
        stem = path.name[: -len(SIF_SUFFIX)]
        return _stem_digest(stem[len(IMPORTED_PREFIX):] if stem.startswith(IMPORTED_PREFIX) else stem)

    @property
    def refs(self) -> Path:
        return self.containers / ".refs"

    @property
    def refs_complete(self) -> Path:
        """Marker: every install record of the tree has its ref (a tree written before refs
        existed gets them from one scan, after which no decision needs to list the tree)."""
        return self.refs / ".complete"

    def image_refs(self, image: Path) -> Optional[Path]:
        """The directory of refs to an image of this store; None for a path that is not one
        (an image of the central store, a foreign path): only our own images are collected."""
        if self.image_digest(image) is None:
            return None
        return self.refs / Path(image).name[: -len(SIF_SUFFIX)]

    def image_ref(self, image: Path, name: str, version: str) -> Optional[Path]:
        """The entry saying module ``name/version`` uses ``image`` ('@' is never in a component)."""
        directory = self.image_refs(image)
        if directory is None:
            return None
        return directory / f"{component(name, 'module name')}@{component(version, 'version')}"

    def digest_lock(self, digest: str) -> Path:
        return self.digest_locks / f"{_digest_stem(digest)}.lock"

    def locked_digest(self, lock: Path) -> Optional[str]:
        return _stem_digest(lock.name[: -len(".lock")]) if lock.name.endswith(".lock") else None

    def new_scratch(self, digest: str) -> Path:
        """A scratch dir name unique to this call: a pull that lost its lease cannot touch ours."""
        return self.containers / f"{TMP_PREFIX}{_digest_stem(digest)}.{os.getpid()}-{secrets.token_hex(4)}"

    def scratch_digest(self, path: Path) -> Optional[str]:
        """The digest a scratch dir belongs to, None for other temp files."""
        name = Path(path).name
        if not name.startswith(TMP_PREFIX):
            return None
        return _stem_digest(name[len(TMP_PREFIX):].split(".", 1)[0])

    def blob_dir(self, digest: str) -> Path:
        algo, _, hexpart = _digest_stem(digest).partition("-")
        return self.blobs / algo / hexpart

    def blob_data(self, digest: str) -> Path:
        return self.blob_dir(digest) / "data"

    def scratch_blob(self, scratch: Path, digest: str) -> Path:
        """Where a pull that keeps no blobs (config ``keep_blobs`` false) puts a layer: its scratch dir."""
        return Path(scratch) / f"blob-{_digest_stem(digest)}"

    def blob_lock(self, digest: str) -> Path:
        """The lock a cached layer is downloaded (and removed by ``clean``) under."""
        directory = self.blob_dir(digest)
        return directory.with_name(directory.name + ".lock")

    def cached_blobs(self) -> list[str]:
        """Digests in the blob cache, found without following symlinks."""
        found = []
        for algo in _real_dirs(self.blobs):
            for hexpart in _real_dirs(self.blobs / algo):
                digest = f"{algo}:{hexpart}"
                if valid_digest(digest):
                    found.append(digest)
        return sorted(found)

    # ----------------------------------------------------------------------------- safety
    def inside(self, path: Path) -> Path:
        """``path`` if it lies below the root and no existing directory on the way there (below
        the root) is a symlink; anything else is refused with one line."""
        path = Path(path)
        # On the normalised strings (called for every file a batch writes: no Path per step)
        text, root = str(path), str(self.root)
        prefix = root if root.endswith("/") else root + "/"
        if path.root != self.root.root or not text.startswith(prefix) and text != root:  # "//x" is not "/x"
            raise StoreError(f"{path} is outside {self.root}: refused")
        parts = text[len(prefix):].split("/") if text != root else []
        if not parts or ".." in parts:
            raise StoreError(f"{path} is not a path below {self.root}: refused")
        current = root
        for part in parts[:-1]:
            current = os.path.join(current, part)
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                break
            if not stat.S_ISDIR(mode):
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a directory"
                raise StoreError(f"{current} is {kind}: refusing to follow it out of {self.root}")
        return path

    def make_dir(self, path: Path) -> Path:
        """Create a directory below the root (and its parents), never through a symlink."""
        self.inside(path / "_")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove(self, path: Path) -> bool:
        """Delete a file, symlink (the link, never its target) or directory tree below the root.

        Returns whether something was there. Directory trees are removed by ``shutil.rmtree``,
        which does not follow symlinks inside them."""
        self.inside(path)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return True

    def remove_empty_parents(self, path: Path, stop: Path) -> None:
        """Remove now-empty directories from ``path`` up to (not including) ``stop``."""
        self.inside(path)
        path, stop = Path(path), Path(stop)
        while path != stop and stop in path.parents:
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent


def kernel_dir(kernels: Path, kernel: str) -> Path:
    """One kernelspec's directory below a Jupyter ``kernels`` dir (any root: the user's Jupyter
    data dir, a --prefix, a module's jupyter dir)."""
    return Path(kernels) / component(kernel, "kernel name")


def venv_marker(venv: Path) -> Path:
    return Path(venv) / VENV_MARKER


def is_component(value: object) -> bool:
    """Whether ``value`` can be one path component of the tree (a name, a version)."""
    return isinstance(value, str) and _COMPONENT.fullmatch(value) is not None


def component(value: str, what: str) -> str:
    """``value`` if it can be one path component of the tree; else one line naming it."""
    if not isinstance(value, str) or not _COMPONENT.fullmatch(value):
        raise StoreError(f"invalid {what} {str(value)[:80]!r} (allowed: letters, digits and . _ + -)")
    return value


def _real_dirs(directory: Path | str) -> list[str]:
    """Names of the real (not symlinked) subdirectories of ``directory``, sorted."""
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_regular(path: Path | str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
