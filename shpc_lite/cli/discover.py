"""``shpc-lite discover NAME[:VERSION] | IMAGE_REF | --sif PATH [--base NAME[:VERSION]|SIF|IMAGE_REF] [--json] [--write]``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shpc_lite.discover import BaseUsed, Image


FORMS = """\
IMAGE is read as: a path ending in .sif, or any existing file -> that SIF file;
else an installed module NAME[:VERSION]; else, when it has a tag or a digest (python:3.12,
host:5000/team/tool:1.0, repo@sha256:...), that image in its registry, read from its layers'
tar headers without installing it. Without --base, an installed module whose layers are the
first layers of the image (the longest such prefix) is the base, and is named."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = FORMS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("spec", nargs="?", metavar="NAME[:VERSION]|IMAGE_REF",
                        help="an installed module (its newest version by default) or an image reference "
                             "with a tag or digest; with --sif, the recipe --write edits")
    parser.add_argument("--sif", metavar="PATH", help="a SIF file instead of an installed module")
    parser.add_argument("--base", metavar="NAME[:VERSION]|SIF|IMAGE_REF",
                        help="leave out the commands of this image (an installed module, a SIF file or an "
                             "image reference); default: the installed module sharing the most leading layers")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--write", action="store_true",
                        help="add the commands as aliases to the recipe NAME (aliases it already has are kept)")


def _is_sif_path(spec: str) -> bool:
    import os

    return spec.endswith(".sif") or os.path.isfile(spec)


def _read(config, spec: str) -> "Image":
    """The image ``spec`` names, by the rule of FORMS: a SIF file, an installed module, or an
    image in its registry (its download shown on a terminal only: scripts get one line or none)."""
    import sys

    from shpc_lite.discover import as_reference, registry_image, sif_image
    from shpc_lite.errors import NotFoundError, RegistryError
    from shpc_lite.modules import find_installed
    from shpc_lite.recipe import split_spec

    if _is_sif_path(spec):
        return sif_image(spec)
    ref = as_reference(spec)
    try:
        name, version = split_spec(spec)
        record = find_installed(config.layout, name, version)[-1]
    except NotFoundError as missing:
        if ref is None:
            raise
        try:
            return registry_image(config, ref, quiet=not sys.stderr.isatty())
        except RegistryError as err:
            if "/" in spec:  # only an image reference: the registry's answer says it all
                raise
            # NAME:TAG may be a module name mistyped: say both what was tried
            raise type(err)(f"{missing}; as an image: {err}") from None
    return sif_image(record.sif, f"{record.name}/{record.version}", record.layers)


def _base(config, args: argparse.Namespace, image: "Image") -> "BaseUsed | None":
    """--base, else the installed module sharing the most leading layers with the image, else none."""
    from shpc_lite.discover import BaseUsed, layer_base, sif_image
    from shpc_lite.modules import installed

    if args.base:
        base = _read(config, args.base)
        return BaseUsed(base.label, "--base", base.commands)
    found = layer_base(image.layers, installed(config.layout))
    if found is None:
        return None
    return BaseUsed(f"{found.name}/{found.version}", "shared layers", sif_image(found.sif).commands, found.shared)


def run(args: argparse.Namespace, config) -> int:
    import json
    import sys
    from dataclasses import asdict

    from shpc_lite.discover import propose, sif_image
    from shpc_lite.errors import NotFoundError
    from shpc_lite.scrub import printable

    if not args.spec and not args.sif:
        raise NotFoundError("discover: name an installed module (NAME[:VERSION]), an image (IMAGE_REF) "
                            "or a SIF file (--sif PATH)")
    if args.write and not args.spec:
        raise NotFoundError("discover --write: name the recipe to add aliases to (NAME)")
    image = sif_image(args.sif) if args.sif else _read(config, args.spec)
    base = _base(config, args, image)
    found = propose(list(image.commands), list(base.commands) if base else None)
    change = _write(config, args.spec, found) if args.write else None
    if args.json:
        out = {"image": image.label, "sif": image.sif, "base": base.summary() if base else None, "commands": [asdict(c) for c in found]}
        if change is not None:
            out.update(recipe=change.path, added=list(change.added))
        print(json.dumps(out, indent=2))
        return 0
    if base is not None and base.how == "shared layers":
        print(printable(f"discover: without the commands of {base.label}, whose {base.shared_layers} "
                        f"layer(s) {image.label} starts with"), file=sys.stderr)
    for command in found:
        arrow = f" -> {command.target}" if command.target != command.path else ""
        print(printable(f"{command.name:<24} {command.path}{arrow}"))
    if change is not None and not change.added:
        print(printable(f"{change.path}: no new aliases"))
    elif change is not None:
        for line in change.diff().splitlines():
            print(printable(line))
    return 0


def _write(config, spec: str, found):
    """Add the aliases to the recipe's file, which must be in a registry dir of the config
    (the built-in recipes belong to the installed package, not to the site)."""
    import os

    from shpc_lite.discover import add_aliases
    from shpc_lite.errors import RecipeError
    from shpc_lite.fsutil import atomic_write
    from shpc_lite.recipe import recipe_index, split_spec
    from shpc_lite.resources import builtin_registry
    from shpc_lite.yamlio import YamlRefused, load

    name, _version = split_spec(spec)
    path = recipe_index(config).path(name)
    if path.parent.resolve() == builtin_registry().resolve() or not os.access(path.parent, os.W_OK):
        raise RecipeError(f"{path}: not in a writable registry dir; copy it into one (config registry) first")
    text = path.read_text(encoding="utf-8")
    try:
        data = load(text)
    except YamlRefused as err:
        raise RecipeError(f"{path}: {err.problem}") from None
    change = add_aliases(str(path), text, data, found)
    if change.added:
        atomic_write(path, change.after, mode=path.stat().st_mode & 0o777)
    return change
