"""``shpc-lite install NAME[:VERSION] [--sif PATH]``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="NAME[:VERSION]", help="recipe name and module version")
    parser.add_argument("--sif", metavar="PATH", help="install this existing SIF file instead of pulling")


def run(args: argparse.Namespace, config) -> int:
    from shpc_lite.errors import NotFoundError
    from shpc_lite.install import install_sif
    from shpc_lite.recipe import split_spec

    name, version = split_spec(args.spec)
    if args.sif:
        if version is None:
            raise NotFoundError(f"{name}: --sif needs a version (NAME:VERSION)")
        record = install_sif(config, name, version, args.sif)
    else:
        from shpc_lite.install import install_pull

        record = install_pull(config, name, version, quiet=args.quiet)
    if not args.quiet:
        print(f"installed {record.name}/{record.version} -> {record.modulefile}")
    from shpc_lite.install import after_change

    message = after_change(config)
    if message and not args.quiet:
        print(message)
    return 0
