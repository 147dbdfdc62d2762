"""``shpc-lite import-shpc PATH... --out DIR``: shpc ``container.yaml`` recipes to shpc-lite recipes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="shpc container.yaml files, or directories searched for them (an shpc registry)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="recipe directory to write (add it to config registry)")
    parser.add_argument("--gpu-vendor", choices=("nvidia", "amd"), default="nvidia",
                        help="what shpc's `gpu: true` means at this site (default nvidia)")
    parser.add_argument("--force", action="store_true", help="replace recipes already in DIR")
    parser.add_argument("--dry-run", action="store_true", help="convert and check, write nothing")


def _sources(paths: list[str]) -> list[Path]:
    from shpc_lite.errors import NotFoundError

    found = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found += sorted(path.rglob("container.yaml"))
        elif path.is_file():
            found.append(path)
        else:
            raise NotFoundError(f"{path}: no such file or directory")
    return found


def run(args: argparse.Namespace, config) -> int:
    import yaml

    from shpc_lite import shpc_import
    from shpc_lite.errors import RecipeError
    from shpc_lite.fsutil import atomic_write

    out = Path(args.out)
    converted, skipped = [], 0

    def skip(message: str) -> None:
        nonlocal skipped
        skipped += 1
        print(f"shpc-lite: skipped {message}", file=sys.stderr)

    for source in _sources(args.paths):
        try:
            doc = yaml.safe_load(source.read_text(encoding="utf-8"))
            converted.append(shpc_import.convert(doc, str(source), args.gpu_vendor))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            skip(f"{source}: invalid YAML{f' at line {mark.line + 1}' if mark else ''}")
        except (OSError, UnicodeDecodeError) as err:
            skip(f"{source}: cannot read: {err}")
        except RecipeError as err:
            skip(str(err))
    written: dict[str, str] = {}
    for name, recipe in shpc_import.assign_names(converted):
        target = out / f"{name}.yaml"
        if name in written:
            skip(f"{recipe.source}: {recipe.image} again (already imported as {name} from {written[name]})")
            continue
        if target.exists() and not args.force:
            skip(f"{recipe.source}: {target} exists (--force replaces it)")
            continue
        try:
            data = shpc_import.finish(name, recipe)
        except RecipeError as err:
            skip(str(err))
            continue
        written[name] = recipe.source
        if not args.dry_run:
            atomic_write(target, shpc_import.document(recipe, data))
        if not args.quiet:
            print(f"{'would import' if args.dry_run else 'imported'} {name} ({recipe.image}, "
                  f"{len(data['versions'])} versions) from {recipe.source}")
            for note in recipe.notes:
                print(f"  note: {note}")
    if not args.quiet:
        print(f"{len(written)} recipe(s) {'checked' if args.dry_run else 'written to ' + str(out)}; {skipped} skipped")
    return 1 if skipped else 0
