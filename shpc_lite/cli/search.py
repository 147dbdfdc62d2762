"""``shpc-lite search TERM [--json]``: recipes and installed modules, and why each matched."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("term", help="part of a name, alias, keyword or package (case-insensitive)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, config) -> int:
    """Exit 0 with hits, 1 without (as grep does), so scripts can test for a match."""
    import json
    import sys
    from dataclasses import asdict

    from shpc_lite.errors import RecipeError
    from shpc_lite.modules import installed
    from shpc_lite.recipe import recipe_index
    from shpc_lite.search import search

    recipes = []
    for _name, recipe in recipe_index(config).all():
        if isinstance(recipe, RecipeError):
            print(f"shpc-lite: warning: skipped {recipe}", file=sys.stderr)
        else:
            recipes.append(recipe)
    found = search(args.term, sorted(recipes, key=lambda r: r.name), installed(config.layout))
    if args.json:
        print(json.dumps([asdict(m) for m in found], indent=2))
    else:
        for match in found:
            print(match.line())
    return 0 if found else 1
