"""Install and uninstall: store the image, then generate the module; undo on any failure."""

from __future__ import annotations

import functools
import itertools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from shpc_lite.choice import ImageChoice, choose
from shpc_lite.config import Config
from shpc_lite.errors import NotFoundError, SifError
from shpc_lite.modules import Installed, ModuleSpec, find_installed, installed, make_spec, remove_module
from shpc_lite.publish import PendingModule, write_modules
from shpc_lite.packages import Package
from shpc_lite.recipe import Recipe, recipe_index
from shpc_lite.runtime_images import prepare as prepare_runtime_image
from shpc_lite import refs
from shpc_lite.store import digest_lock, import_sif

if TYPE_CHECKING:
    from shpc_lite.puller import StoredImage


def install_sif(config: Config, name: str, version: str, sif: Path) -> Installed:
    """``install NAME:VERSION --sif PATH``: the recipe must know the version (its tag is recorded)."""
    recipe = recipe_index(config).get(name)
    return commit(config, [prepare_sif(config, recipe, version, sif)])[0].result()


def prepare_sif(config: Config, recipe: Recipe, version: str, sif: Path, *, default: bool = False) -> Prepared:
    """Store a SIF file the site has (once per file: see ``import_sif``) for module
    ``recipe``/``version`` and make its spec; ``commit`` writes it."""
    pin = recipe.version(version)
    return _prepare(config, recipe, version, pin.tag, lambda _digest: _imported(config, sif), default=default)


@dataclass(frozen=True)
class _Imported:
    """A SIF file's copy in the store, as ``_prepare`` uses a pulled ``StoredImage`` (without
    importing the puller and its HTTP stack: ``install --sif`` starts faster)."""

    path: Path
    digest: str
    pulled: bool
    layers: tuple[str, ...] = ()


def _imported(config: Config, sif: Path) -> _Imported:
    """``import_sif``, once per file and root in this process: a batch of many modules from one
    SIF hashes and checks it once (again if the stored copy went away meanwhile)."""
    from shpc_lite.fsutil import identity

    file = identity(sif)  # None: import_sif says what is wrong with it
    key = (file, str(config.layout.root)) if file else None
    with _IMPORTING.setdefault(key, threading.Lock()):  # the batch's other threads wait here, not on the store's lock
        known = _IMPORTED.get(key) if key else None
        if known is not None and os.path.exists(known):
            return _Imported(known, "", False)
        stored, created = import_sif(config, sif)
        if key:
            _IMPORTED[key] = stored
        return _Imported(stored, "", created)


_IMPORTED: dict[tuple, Path] = {}
_IMPORTING: dict[Optional[tuple], threading.Lock] = {}


def image_packages(sif: Path) -> tuple[Package, ...]:
    """The packages the stored image holds, for the modulefile and the record. They help users
    find the module but the module works without them, so an image that cannot be listed
    (no squashfs-tools on this host) installs with none. Stored images never change in place,
    so a batch of modules of one image lists it once (keyed by the file's identity)."""
    from shpc_lite.fsutil import identity

    file = identity(sif)
    return _scan(file) if file else ()


@functools.lru_cache(maxsize=64)
def _scan(file: tuple) -> tuple[Package, ...]:
    from shpc_lite.packages import scan_sif

    try:
        return scan_sif(file[0])
    except SifError:
        return ()


def choose_version(config: Config, recipe: Recipe, version: Optional[str]) -> ImageChoice:
    """The image a module version is made from: the site's lock file wins, then the recipe's pins.

    Without a version, the newest one the lock or the recipe offers is taken.
    """
    from shpc_lite.lock import load_lock, locked_version
    from shpc_lite.versions import newest

    lock = load_lock(config.layout.lock_file)
    locked = lock.versions(recipe.name) if lock is not None else {}
    if version is None:
        version = newest([*locked, *(p.version for p in recipe.versions)])
        if version is None:
            raise NotFoundError(f"{recipe.name}: no versions pinned and none locked; run shpc-lite resolve {recipe.name}")
    hit = locked_version(lock, recipe.name, version) if lock is not None else None
    if hit is not None:
        return choose(version, recipe.image, hit.tag, hit.digest)
    pin = recipe.version(version)
    return choose(version, recipe.image, pin.tag, pin.digest)


def install_pull(config: Config, name: str, version: Optional[str] = None, *, quiet: bool = False,
                 client=None) -> Installed:
    """``install NAME[:VERSION]``: resolve (or read the lock), pull into the store, generate."""
    recipe = recipe_index(config).get(name)
    return install_version(config, recipe, choose_version(config, recipe, version), quiet=quiet, client=client)


def install_version(config: Config, recipe: Recipe, choice: ImageChoice, *,
                    quiet: bool = False, client=None, default: bool = False) -> Installed:
    """Pull the chosen image into the store and write the module."""
    prepared = prepare_version(config, recipe, choice, quiet=quiet, client=client, default=default)
    return commit(config, [prepared])[0].result()


def install_from(config: Config, name: str, version: str, source: str, *, quiet: bool = False) -> Installed:
    """``install NAME:VERSION --from oci:DIR|oci-archive:PATH|docker-archive:PATH``: an image the
    site already has, built and stored exactly as a registry pull (shpc_lite.oci.layout_source).

    The record's ``image`` is the recipe's image; its ``tag`` is the name the layout or archive
    gives the image (``:TAG`` or its only ref name / RepoTag) when that is a valid tag, else
    VERSION; its ``digest`` is the store key (the manifest digest, or a docker archive's config
    digest)."""
    from shpc_lite.oci.layout_source import open_local_source
    from shpc_lite.oci.reference import parse_reference
    from shpc_lite.puller import store_image

    recipe = recipe_index(config).get(name)
    local = open_local_source(source, config, parse_reference(recipe.image))
    tag = local.record_tag(version)

    def store(_digest: Optional[str]) -> StoredImage:
        return store_image(config, local, quiet=quiet)

    return _install_stored(config, recipe, version, tag, store)


def _install_stored(config: Config, recipe: Recipe, version: str, tag: str,
                    store: Callable[[Optional[str]], StoredImage], *, default: bool = False) -> Installed:
    """Store the image (``store(None)``) and write the module; the image an earlier install of this
    version used is dropped once no module uses it. Shared by every source of an image."""
    return commit(config, [_prepare(config, recipe, version, tag, store, default=default)])[0].result()


@dataclass
class Prepared:
    """A module whose image is stored and whose spec is made: ready for ``commit``."""

    spec: ModuleSpec
    default: bool
    image: Path
    created: bool  # this install stored the image (dropped again if the module fails)
    previous: list[str]  # the images this version's earlier install used
    restore: Callable[[], object]  # store the image again (a concurrent uninstall dropped it)


@dataclass
class Committed:
    """The outcome of one ``Prepared`` after ``commit``."""

    prepared: Prepared
    record: Optional[Installed] = None
    error: Optional[BaseException] = None

    def result(self) -> Installed:
        if self.error is not None:
            raise self.error
        assert self.record is not None
        return self.record


def prepare_version(config: Config, recipe: Recipe, choice: ImageChoice, *, quiet: bool = False,
                    client=None, default: bool = False) -> Prepared:
    """Pull the chosen image into the store and hold it for the module (``commit`` writes it)."""
    from shpc_lite.puller import pull

    def store(digest: Optional[str]) -> StoredImage:
        return pull(config, choice.ref, digest or choice.digest, quiet=quiet, client=client)

    return _prepare(config, recipe, choice.version, choice.tag, store, default=default)


def _prepare(config: Config, recipe: Recipe, version: str, tag: str,
             store: Callable[[Optional[str]], StoredImage], *, default: bool = False) -> Prepared:
    """Store the image (``store(None)``) and make the module's spec; ``commit`` adds the ref
    (before the module can appear) and writes it. On failure, what this did is undone."""
    layout = config.layout
    previous = [r.sif for r in installed(layout, recipe.name) if r.version == version]
    stored = store(None)
    try:
        digest = stored.digest or pin_digest(recipe, version)
        spec = make_spec(recipe, version, tag, digest, stored.path, layout, config,
                         packages=image_packages(stored.path),
                         layers=_layers_of(layout, stored) if stored.digest else ())
        prepare_runtime_image(config, spec)
    except BaseException:
        _release(config, stored.path, recipe.name, version, previous, stored.pulled)
        raise
    return Prepared(spec, default, stored.path, stored.pulled, previous, lambda: store(stored.digest))


def hold_image(config: Config, image: Path, name: str, version: str) -> bool:
    """Add the ref name/version -> image before the module is written (a venv module, written
    outside ``commit``): see ``_hold``."""
    return _hold(config, image, [(name, version)])


def pin_digest(recipe: Recipe, version: str) -> str:
    """The digest the recipe pins for a version (what ``--sif`` records), else empty."""
    return recipe.version(version).digest or ""


def commit(config: Config, prepared: list[Prepared]) -> list[Committed]:
    """Hold the images (refs added, one digest lock per image) and write the modules of many
    prepared installs at once (``write_modules``: one flush for all their files, defaults once
    per name); each one that fails is undone alone."""
    layout = config.layout
    out = {id(p): Committed(p) for p in prepared}
    groups: dict[Path, list[Prepared]] = {}
    for p in prepared:
        groups.setdefault(p.image, []).append(p)
    for image, group in groups.items():
        try:
            if not _hold(config, image, [(p.spec.name, p.spec.version) for p in group]):
                group[0].restore()  # a concurrent uninstall dropped it before our modules used it
        except Exception as err:  # noqa: BLE001 - reported per module
            for p in group:
                out[id(p)].error = err
    ready = [p for p in prepared if out[id(p)].error is None]
    results = write_modules([PendingModule(p.spec, p.default) for p in ready], layout, config)
    for p, written in zip(ready, results):
        out[id(p)].record, out[id(p)].error = written.record, written.error
    for p in prepared:
        if out[id(p)].error is not None:
            _release(config, p.image, p.spec.name, p.spec.version, p.previous, p.created)
        else:
            _replaced(config, p.spec.name, p.spec.version, p.previous, p.image)
    return [out[id(p)] for p in prepared]


def _hold(config: Config, image: Path, modules: list[tuple[str, str]]) -> bool:
    """Add the refs name/version -> image before the modules are written, under the image's
    digest lock (what a deleter holds while it decides; taken once for all modules of the
    image): returns whether the image is still there, so a concurrent uninstall either sees our
    refs or has already dropped the image, never neither."""
    layout = config.layout
    digest = layout.image_digest(image)
    if digest is None:
        return True  # the central store's image: not ours to drop
    with digest_lock(layout, digest, config["lock_lease"]):
        for name, version in modules:
            refs.add(layout, image, name, version)
        return image.exists()


def _release(config: Config, image: Path, name: str, version: str, previous: list[str], created: bool) -> None:
    """Undo ``hold_image`` after a failed install: the ref goes unless the version's old module,
    still in place, uses the same image; the image goes if this install created it and no
    module uses it."""
    if str(image) not in previous:
        refs.drop(config.layout, image, name, version)
    if created:
        drop_unused(config, [str(image)])


def _replaced(config: Config, name: str, version: str, previous: list[str], image: Path) -> None:
    """After a reinstall: the version no longer uses the image it used before (if another)."""
    old = [sif for sif in previous if sif != str(image)]
    for sif in old:
        refs.drop(config.layout, Path(sif), name, version)
    drop_unused(config, old)


def _layers_of(layout, stored: StoredImage) -> tuple[str, ...]:
    """The layer digests of a stored image: from this pull, else from the record of another
    module the refs say uses the same image (an image already stored was not opened again). A
    few users are asked, not all: modules of one image were all made by pulls that knew the
    layers or all not."""
    if stored.layers:
        return stored.layers
    for name, version in itertools.islice(refs.users(layout, stored.path), 8):
        found = [r.layers for r in installed(layout, name) if r.version == version and r.digest == stored.digest]
        if found and found[0]:
            return found[0]
    return ()


def uninstall(config: Config, name: str, version: Optional[str] = None) -> list[Installed]:
    from shpc_lite import views

    layout = config.layout
    records = find_installed(layout, name, version)
    for record in records:
        remove_module(layout, record, config)
        refs.drop(layout, Path(record.sif), record.name, record.version)
    drop_unused(config, [r.sif for r in records])
    views.prune(layout, config)
    return records


def after_change(config: Config) -> Optional[str]:
    """Refresh indexes after the tree changed; returns a line for the admin when a cache is kept."""
    from shpc_lite.index import refresh

    line = refresh(config)
    return f"spider cache refreshed; users need: {line}" if line else None


def drop_unused(config: Config, sifs: list[str]) -> None:
    """Delete stored images no module uses, each under its digest lock (no pull or install is
    finishing). Whether one is used is read from its refs (shpc_lite.refs), not by listing every
    installed module: O(1) in the tree size."""
    layout = config.layout
    for path in refs.own_images(layout, sifs):
        with digest_lock(layout, layout.image_digest(path), config["lock_lease"]):
            if not refs.in_use(layout, path):
                layout.remove(path)
                refs.forget(layout, path)


