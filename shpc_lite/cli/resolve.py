"""``shpc-lite resolve [NAME...] [--json] [--explain] [--dry-run]``: choose versions, write the lock.

All or nothing: the lock file is updated only when every named recipe (default: all) resolved.
When one fails, each failure is one line on stderr, the others are still resolved and shown, the
lock is left exactly as it was, and the exit code is 1.
"""

from __future__ import annotations

import argparse


EPILOG = """\
The lock file is <root>/shpc-lite.lock (JSON, see shpc_lite/lock.py). It is updated only when
every recipe asked for resolved; the recipes named are replaced whole, the others are kept.
If any recipe fails, each failure is one line on stderr, the rest are still shown, the lock is
left unchanged and the exit code is 1.

--json prints, per recipe:
  {"python": {"image": "docker.io/library/python",
              "versions": [{"version": "3.12", "tag": "3.12-bookworm",
                            "digest": "sha256:...", "pinned": false}],
              "warnings": []},
   "broken": {"error": "broken: ..."}}
With --explain each recipe also has "tags": [{"tag", "chosen", "version", "reason"}].

Exit codes: 0 resolved (and locked unless --dry-run), 1 an error, 2 bad usage.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("names", nargs="*", metavar="NAME", help="recipes to resolve (default: all)")
    parser.add_argument("--json", action="store_true", help="print the chosen versions as JSON")
    parser.add_argument("--explain", action="store_true", help="say for every tag why it was chosen or not")
    parser.add_argument("--dry-run", action="store_true", help="resolve and show, but do not write the lock")
    parser.add_argument("--jobs", type=int, help="registry requests at once (default: config jobs)")


def _load(config, names):
    from shpc_lite.errors import ShpcLiteError
    from shpc_lite.recipe import recipe_index
    from shpc_lite.resolve import ResolveFailure

    index = recipe_index(config)
    recipes, failures = [], []
    if names:
        for name in dict.fromkeys(names):
            try:
                recipes.append(index.get(name))
            except ShpcLiteError as err:
                failures.append(ResolveFailure(name, str(err)))
    else:
        for name, recipe in index.all():
            if isinstance(recipe, ShpcLiteError):
                failures.append(ResolveFailure(name, str(recipe)))
            else:
                recipes.append(recipe)
    return recipes, failures


def _print_text(result, explain: bool) -> None:
    for recipe in result.recipes:
        print(f"{recipe.name} ({recipe.image})")
        width = max(len(v.version) for v in recipe.versions)
        twidth = max(len(v.tag) for v in recipe.versions)
        for v in recipe.versions:
            pin = "  (pinned)" if v.pinned else ""
            print(f"  {v.version:<{width}}  {v.tag:<{twidth}}  {v.digest}{pin}")
        if explain and recipe.decisions:
            print("  tags:")
            twidth = max(len(d.tag) for d in recipe.decisions)
            for d in recipe.decisions:
                print(f"    {'+' if d.chosen else '-'} {d.tag:<{twidth}}  {d.reason}")


def run(args: argparse.Namespace, config) -> int:
    import json
    import sys
    from dataclasses import replace

    from shpc_lite.lock import update_lock
    from shpc_lite.resolve import ResolveResult, client_from_config, resolve, result_to_json

    recipes, failures = _load(config, args.names)
    jobs = args.jobs or config["jobs"]
    if recipes:
        with client_from_config(config) as client:
            result = resolve(recipes, client, jobs=jobs)
    else:
        result = ResolveResult()
    result = replace(result, failures=tuple(sorted(failures + list(result.failures), key=lambda f: f.name)))

    if args.json:
        print(json.dumps(result_to_json(result, explain_tags=args.explain), indent=2))
    elif not args.quiet:
        _print_text(result, args.explain)
    for recipe in result.recipes:
        for warning in recipe.warnings:
            print(f"shpc-lite: warning: {warning}", file=sys.stderr)
    for failure in result.failures:
        print(f"shpc-lite: error: {failure.error}", file=sys.stderr)

    lock_file = config.layout.lock_file
    if result.failures:
        total = len(result.recipes) + len(result.failures)
        print(
            f"shpc-lite: lock not written: {len(result.failures)} of {total} recipes failed "
            f"({lock_file} is unchanged)",
            file=sys.stderr,
        )
        return 1
    if args.dry_run:
        if not args.quiet and not args.json:
            print(f"dry run: {lock_file} not written")
        return 0
    update_lock(lock_file, result.locked(), mode=config.file_mode)
    if not args.quiet and not args.json:
        print(f"locked {len(result.recipes)} recipe(s) in {lock_file}")
    return 0
