"""``shpc-lite show NAME [--json]``: the recipe, and which versions are installed."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="recipe name")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def describe(recipe, records, locked: dict) -> dict:
    """The recipe, with every version it offers: pinned, locked (chosen by ``resolve``) or installed."""
    from shpc_lite.versions import version_key

    by_version = {r.version: r for r in records}
    offered = {pin.version: (pin.tag, pin.digest) for pin in recipe.versions}
    offered.update({v: (lv.tag, lv.digest) for v, lv in locked.items()})
    offered.update({v: (r.tag, r.digest) for v, r in by_version.items() if v not in offered})
    versions = []
    for version in sorted(offered, key=version_key, reverse=True):
        tag, digest = offered[version]
        rec = by_version.get(version)
        versions.append({"version": version, "tag": rec.tag if rec else tag,
                         "digest": (rec.digest if rec else digest) or None, "locked": version in locked,
                         "installed": rec is not None, "modulefile": rec.modulefile if rec else None})
    return {
        "name": recipe.name,
        "image": recipe.image,
        "description": recipe.description,
        "url": recipe.url,
        "maintainer": recipe.maintainer,
        "features": {"gpu": recipe.features.gpu, "x11": recipe.features.x11, "home": recipe.features.home,
                     "mpi": recipe.features.mpi},  # None: config mpi decides
        "aliases": {a.name: list(a.argv) for a in recipe.aliases},
        "env": dict(recipe.env),
        "bind": list(recipe.bind),
        "source": recipe.source,
        "versions": versions,
    }


def run(args: argparse.Namespace, config) -> int:
    import json

    from shpc_lite.modules import installed
    from shpc_lite.recipe import recipe_index, split_spec

    from shpc_lite.lock import load_lock

    name, _ = split_spec(args.name)
    lock = load_lock(config.layout.lock_file)
    info = describe(recipe_index(config).get(name), installed(config.layout, name),
                    lock.versions(name) if lock is not None else {})
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['name']}: {info['description']}")
    print(f"  image:    {info['image']}")
    if info["url"]:
        print(f"  url:      {info['url']}")
    print(f"  gpu:      {info['features']['gpu']}")
    print(f"  commands: {' '.join(info['aliases'])}")
    print("  versions:")
    for v in info["versions"]:
        mark = " (installed)" if v["installed"] else " (locked)" if v["locked"] else ""
        print(f"    {v['version']:<10} {v['tag']}{mark}")
    return 0
