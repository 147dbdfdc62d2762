"""``shpc-lite clean``: remove the layer blob cache and Apptainer's cache of this root."""

from __future__ import annotations

import argparse


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
    return 1 if result.busy else 0
