"""``shpc-lite show NAME [--json]``: the recipe, and which versions are installed."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="recipe name")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def describe(recipe, records) -> dict:
    by_version = {r.version: r for r in records}
    versions = []
    for pin in recipe.versions:
        rec = by_version.pop(pin.version, None)
        versions.append({"version": pin.version, "tag": pin.tag, "digest": rec.digest if rec else pin.digest,
                         "installed": rec is not None, "modulefile": rec.modulefile if rec else None})
    for rec in by_version.values():  # installed from a select rule or an older recipe
        versions.append({"version": rec.version, "tag": rec.tag, "digest": rec.digest, "installed": True,
                         "modulefile": rec.modulefile})
    return {
        "name": recipe.name,
        "image": recipe.image,
        "description": recipe.description,
        "url": recipe.url,
        "maintainer": recipe.maintainer,
        "features": {"gpu": recipe.features.gpu, "x11": recipe.features.x11, "home": recipe.features.home},
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

    name, _ = split_spec(args.name)
    info = describe(recipe_index(config).get(name), installed(config.paths, name))
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
        mark = " (installed)" if v["installed"] else ""
        print(f"    {v['version']:<10} {v['tag']}{mark}")
    return 0
