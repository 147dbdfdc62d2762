"""``shpc-lite list [--json] [--available]``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--available", action="store_true", help="list recipes instead of installed modules")


def run(args: argparse.Namespace, config) -> int:
    import json
    import sys

    from shpc_lite.errors import RecipeError
    from shpc_lite.modules import installed
    from shpc_lite.recipe import recipe_index

    if args.available:
        rows, failed = [], 0
        for name, recipe in recipe_index(config).all():
            if isinstance(recipe, RecipeError):
                print(f"shpc-lite: warning: skipped {recipe}", file=sys.stderr)
                failed += 1
                continue
            rows.append({"name": name, "image": recipe.image, "versions": [p.version for p in recipe.versions],
                         "description": recipe.description})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(f"{row['name']:<20} {' '.join(row['versions']):<28} {row['description']}")
        return 1 if failed else 0
    records = installed(config.layout)
    if args.json:
        print(json.dumps([{"name": r.name, "version": r.version, "image": r.image, "tag": r.tag,
                           "digest": r.digest, "sif": r.sif, "modulefile": r.modulefile} for r in records], indent=2))
        return 0
    for record in records:
        print(f"{record.name}/{record.version}")
    return 0
