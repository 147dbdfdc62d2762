"""``shpc-lite clean``: remove the layer blob cache and Apptainer's cache of this root, refs that
interrupted installs left and the images no module uses; refresh the spider cache if one is kept."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="show what would be removed")


def run(args: argparse.Namespace, config) -> int:
    from shpc_lite.clean import clean

    result = clean(config.layout, config["lock_lease"], dry_run=args.dry_run)
    for reason in result.busy:
        print(f"shpc-lite: {reason}")
    if not args.quiet:
        verb = "would free" if args.dry_run else "freed"
        print(f"{verb} {result.freed / 1e6:.1f} MB in {len(result.removed)} cache entries under {config.layout.cache}")
        swept = result.sweep
        if swept.refs or swept.images:
            drop = "would drop" if args.dry_run else "dropped"
            print(f"{drop} {len(swept.refs)} stale image refs (left by interrupted installs) and "
                  f"{len(swept.images)} images no module uses ({swept.freed / 1e6:.1f} MB)")
    if not args.dry_run:  # also what brings a spider cache up to date after an interrupted change
        from shpc_lite.install import after_change

        message = after_change(config)
        if message and not args.quiet:
            print(message)
    refused = result.sweep.refused
    if refused:  # one line: the first reason says what to look at
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        print(f"shpc-lite: stale image refs not swept: {refused[0]}{more}", file=sys.stderr)
    return 1 if result.busy or refused else 0
