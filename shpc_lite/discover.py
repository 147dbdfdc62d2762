"""``shpc-lite discover``: the commands an image offers, proposed as recipe aliases.

Writing aliases by hand is the main cost of adding an image, and generated lists (shpc's) are
full of junk. The image's own file tree answers it: the executables in the directories of the
image's ``PATH``, with symlinks resolved inside the image (``python -> python3.11``; ``/bin ->
usr/bin``), minus the commands of a base image. Only names are read (shpc_lite.imagetree), never
file contents. Pure functions over the listing; reading the SIF and writing the recipe are at
the edges.
"""

from __future__ import annotations

import difflib
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

from shpc_lite.errors import RecipeError
from shpc_lite.imagetree import Entry

# The PATH Apptainer gives a container whose image sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where a distribution puts its own tools: commands elsewhere (/usr/local/bin, /opt/...) are the
# ones an image was made for, so without a base they are listed first.
SYSTEM_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
MAX_HOPS = 40  # symlinks followed for one path, as Linux does
MAX_PATHS = 256  # paths asked of unsquashfs in one round; past this the whole image is listed
# Alias names the recipe schema accepts; other names in the image (spaces, control bytes) are skipped.
ALIAS_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._+-]{0,63}\Z")


@dataclass(frozen=True)
class Tree:
    """What discover needs of an image: its symlinks and its executable files."""

    links: Mapping[str, str]
    executables: frozenset[str]
    children: Mapping[str, tuple[str, ...]]  # dir -> names of its links and executables


@dataclass(frozen=True)
class Command:
    """A command on the image's PATH: ``path`` is where PATH finds it, ``target`` the
    executable file it resolves to (the same path unless it is a symlink)."""

    name: str
    path: str
    target: str
    system: bool  # in a distribution directory (see SYSTEM_DIRS)


def read_tree(entries: Iterable[Entry]) -> Tree:
    """Keep only symlinks and executable files: a small part of a large image."""
    links: dict[str, str] = {}
    executables: set[str] = set()
    children: dict[str, list[str]] = {}
    for entry in entries:
        if entry.kind == "l":
            links[entry.path] = entry.target
        elif entry.kind == "f" and entry.executable:
            executables.add(entry.path)
        else:
            continue
        parent, _, name = entry.path.rpartition("/")
        children.setdefault(parent or "/", []).append(name)
    return Tree(links, frozenset(executables), {d: tuple(n) for d, n in children.items()})


def resolve(links: Mapping[str, str], path: str) -> str | None:
    """``path`` with every symlink in it followed inside the image (an absolute target starts
    again at the image's root, ``..`` stops there); None for a loop or too many hops."""
    parts = deque(path.split("/"))
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join([*done, part])
        target = links.get(here)
        if target is None:
            done.append(part)
            continue
        hops += 1
        if hops > MAX_HOPS:
            return None
        if target.startswith("/"):
            done = []
        parts.extendleft(reversed(target.split("/")))
    return "/" + "/".join(done)


def _path_dirs(tree: Tree, path_var: str) -> Iterator[tuple[str, str]]:
    """(PATH dir, where it is in the image) for each absolute PATH dir that resolves, once."""
    done: set[str] = set()
    for directory in path_var.split(":"):
        real_dir = resolve(tree.links, directory) if directory.startswith("/") else None
        if real_dir is not None and real_dir not in done:
            done.add(real_dir)
            yield directory, real_dir


def commands(tree: Tree, path_var: str) -> list[Command]:
    """Commands in PATH order, the first of a name winning (as a shell finds it); a dangling
    link, a loop or a non-executable target is not a command."""
    seen: set[str] = set()
    found: list[Command] = []
    for directory, real_dir in _path_dirs(tree, path_var):
        for name in sorted(tree.children.get(real_dir, ())):
            if name in seen or not ALIAS_NAME.match(name):
                continue
            path = f"{directory.rstrip('/')}/{name}"
            found_at = f"{real_dir}/{name}"  # its directory is resolved: only a link needs more
            target = resolve(tree.links, found_at) if found_at in tree.links else found_at
            if target is None or target not in tree.executables:
                continue
            seen.add(name)
            found.append(Command(name, path, target, real_dir in SYSTEM_DIRS))
    return found


def propose(own: list[Command], base: list[Command] | None) -> list[Command]:
    """With a base: only the commands the base does not have. Without: the image's own tools
    (outside the distribution's directories) first, each group by name."""
    if base is not None:
        names = {c.name for c in base}
        return sorted((c for c in own if c.name not in names), key=lambda c: c.name)
    return sorted(own, key=lambda c: (c.system, c.name))


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def wanted(tree: Tree, path_var: str, listed: frozenset[str]) -> list[str]:
    """Paths to list next: PATH dirs and link targets (as far as the links known so far
    resolve them) that nothing listed yet covers. Empty when the tree answers everything."""
    todo: set[str] = set()
    for _directory, real_dir in _path_dirs(tree, path_var):
        if not _under(real_dir, listed):
            todo.add(real_dir)
            continue
        for name in tree.children.get(real_dir, ()):
            path = f"{real_dir}/{name}"
            target = resolve(tree.links, path) if path in tree.links else path
            if target is not None and not _under(target, listed):
                todo.add(target)
    return sorted(todo)


def explore(list_paths: Callable[[list[str]], Iterable[Entry]], path_var: str,
            max_paths: int = MAX_PATHS) -> Tree:
    """The part of an image discover needs: the PATH dirs, then the places their links point
    to, listed round by round (a few directories, not the whole image). A path is listed at
    most once, so a dangling link or a loop ends the rounds; with too many paths to ask for,
    the whole image is listed at once."""
    entries: list[Entry] = []
    listed: frozenset[str] = frozenset()
    todo = wanted(read_tree(()), path_var, listed)
    for _ in range(MAX_HOPS + 1):
        todo = [p for p in todo if p not in listed]
        if not todo:
            break
        if len(todo) > max_paths or "/" in todo:  # "/" on PATH: the whole image anyway
            return read_tree(list_paths([]))
        entries.extend(list_paths(todo))
        listed |= frozenset(todo)
        todo = wanted(read_tree(entries), path_var, listed)
    return read_tree(entries)


def image_commands(sif: str) -> list[Command]:
    """The commands of a SIF: its PATH from the image's environment, its tree from the listing."""
    from shpc_lite.imagetree import list_sif
    from shpc_lite.inspect import inspect_sif

    path_var = inspect_sif(sif)["env"].get("PATH") or DEFAULT_PATH
    return commands(explore(lambda paths: list_sif(sif, paths), path_var), path_var)


# ------------------------------------------------------------------ images and their bases


@dataclass(frozen=True)
class Image:
    """An image discover read: what it is (a SIF path or an image reference), its commands, and
    its layer digests, lowest first (empty when unknown: a SIF not installed by a pull)."""

    label: str
    commands: tuple[Command, ...]
    layers: tuple[str, ...] = ()
    sif: str = ""


def sif_image(sif: str, label: str = "", layers: tuple[str, ...] = ()) -> Image:
    """A SIF's commands (an installed module's: its label and recorded layers)."""
    return Image(label or sif, tuple(image_commands(sif)), layers, sif)


@dataclass(frozen=True)
class LayerBase:
    """An installed module whose image's layers are the first layers of the image discovered."""

    name: str
    version: str
    sif: str
    shared: int  # how many layers


@dataclass(frozen=True)
class BaseUsed:
    """The base whose commands were left out, and how it was chosen (``--base`` or ``shared
    layers``, then how many), so the output can say which."""

    label: str
    how: str
    commands: tuple[Command, ...]
    shared_layers: int = 0

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "how": self.how, "shared_layers": self.shared_layers}


def config_path(image_config: Mapping[str, Any]) -> str:
    """The PATH of an image config's ``Env`` (``config.Env``: ``["PATH=...", ...]``), or the one
    Apptainer gives an image that sets none."""
    env = (image_config.get("config") or {}).get("Env") or []
    found = [e[len("PATH="):] for e in env if isinstance(e, str) and e.startswith("PATH=")]
    return (found[-1] if found else "") or DEFAULT_PATH


def as_reference(spec: str) -> Any:
    """``spec`` as an image reference when it names one explicitly, with a tag or a digest
    (``python:3.12``, ``host:5000/team/tool@sha256:...``), else None: a bare name is never
    looked up in a registry (it is an installed module or nothing)."""
    from shpc_lite.errors import ReferenceError_
    from shpc_lite.oci.reference import parse_reference

    last = spec.rpartition("/")[2]
    if ":" not in last and "@" not in last:
        return None
    try:
        return parse_reference(spec)
    except ReferenceError_:
        return None


def layer_base(layers: tuple[str, ...], records: Iterable[Any]) -> LayerBase | None:
    """The installed module whose layers are the longest proper prefix of ``layers`` (records
    come sorted by name and version, so the first of equal length wins: deterministic). The
    same image (all layers equal) is not its own base."""
    best: LayerBase | None = None
    for record in records:
        n = len(record.layers)
        if 0 < n < len(layers) and tuple(layers[:n]) == tuple(record.layers) and (best is None or n > best.shared):
            best = LayerBase(record.name, record.version, record.sif, n)
    return best


def registry_image(config: Any, ref: Any, *, quiet: bool = True) -> Image:
    """An image in its registry, read from its layers' tar headers (never installed): each
    layer is fetched into the blob cache as a pull would (verified, locked, reused by a later
    install and taken from there when present: nothing is downloaded twice), then only its
    headers are read, whiteouts and opaque dirs applied in order (shpc_lite.pull.layers).
    The merge keeps its files on disk and this keeps only symlinks and executables, so memory
    grows with those, not with the image's files or their size. ``quiet=False`` shows the
    download as a pull does (a bar on a terminal)."""
    from shpc_lite.errors import LayerError, PullError
    from shpc_lite.imagetree import rootfs_entries
    from shpc_lite.progress import Progress
    from shpc_lite.pull.layers import build_tree
    from shpc_lite.puller import RegistrySource
    from shpc_lite.resolve import client_from_config

    client = client_from_config(config)
    source = RegistrySource(client, ref, ref.digest or client.head_digest(ref))
    image = source.open()
    progress = Progress(image.label, image.size, len(image.layers), quiet=quiet)
    try:
        blobs = list(source.fetch_layers(image, config, progress, None))  # into the blob cache
    finally:
        progress.close()
    path_var = config_path(image.config)
    try:
        with build_tree(blobs) as tree:
            found = commands(read_tree(rootfs_entries(tree)), path_var)
    except (LayerError, PullError) as err:  # add the image (a LayerError names the layer and entry)
        raise type(err)(f"{ref}: {err}") from None
    return Image(str(ref), tuple(found), tuple(layer.digest for layer in image.layers))


# ----------------------------------------------------------------------------- --write


@dataclass(frozen=True)
class RecipeChange:
    """A recipe file's text before and after adding aliases, and the names added."""

    path: str
    before: str
    after: str
    added: tuple[str, ...]

    def diff(self) -> str:
        return "".join(difflib.unified_diff(self.before.splitlines(True), self.after.splitlines(True),
                                            self.path, self.path))


def _leading_comments(text: str) -> str:
    """The comment block at the top of a recipe (its explanation), kept when it is rewritten."""
    lines = []
    for line in text.splitlines(True):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "".join(lines)


def add_aliases(path: str, text: str, data: Any, found: list[Command]) -> RecipeChange:
    """The recipe with an alias for each command it has no alias of that name for: existing
    aliases (written by hand) are kept as they are. Written by the YAML serializer, and
    validated as shpc-lite will load it before anyone writes it."""
    import yaml

    from shpc_lite.recipe import generated_commands, recipe_from_dict

    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of fields")
    aliases = dict(data.get("aliases") or {})
    taken = set(generated_commands(str(data.get("name"))))
    added = tuple(c.name for c in found if c.name not in aliases and c.name not in taken)
    if not added:
        return RecipeChange(path, text, text, ())
    by_name = {c.name: c for c in found}
    aliases.update({name: by_name[name].path for name in added})
    new = {**data, "aliases": aliases}
    recipe_from_dict(new, path)
    after = _leading_comments(text) + yaml.safe_dump(new, sort_keys=False, width=100, allow_unicode=True)
    return RecipeChange(path, text, after, added)
