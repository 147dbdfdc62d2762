"""``shpc-lite discover NAME[:VERSION] | --sif PATH [--base NAME[:VERSION]|SIF] [--json] [--write]``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", metavar="NAME[:VERSION]",
                        help="an installed module (its newest version by default); with --sif, the recipe --write edits")
    parser.add_argument("--sif", metavar="PATH", help="a SIF file instead of an installed module")
    parser.add_argument("--base", metavar="NAME[:VERSION]|SIF",
                        help="leave out the commands of this image (an installed module or a SIF file)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--write", action="store_true",
                        help="add the commands as aliases to the recipe NAME (aliases it already has are kept)")


def _sif_of(config, spec: str) -> str:
    """A SIF path given as such, or the SIF of an installed module."""
    import os

    from shpc_lite.modules import find_installed
    from shpc_lite.recipe import split_spec

    if os.sep in spec or spec.endswith(".sif"):
        return spec
    name, version = split_spec(spec)
    return find_installed(config.layout, name, version)[-1].sif


def run(args: argparse.Namespace, config) -> int:
    import json
    from dataclasses import asdict

    from shpc_lite.discover import image_commands, propose
    from shpc_lite.errors import NotFoundError
    from shpc_lite.scrub import printable

    if not args.spec and not args.sif:
        raise NotFoundError("discover: name an installed module (NAME[:VERSION]) or a SIF file (--sif PATH)")
    if args.write and not args.spec:
        raise NotFoundError("discover --write: name the recipe to add aliases to (NAME)")
    sif = args.sif or _sif_of(config, args.spec)
    base = image_commands(_sif_of(config, args.base)) if args.base else None
    found = propose(image_commands(sif), base)
    change = _write(config, args.spec, found) if args.write else None
    if args.json:
        out = {"sif": sif, "commands": [asdict(c) for c in found]}
        if change is not None:
            out.update(recipe=change.path, added=list(change.added))
        print(json.dumps(out, indent=2))
        return 0
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
