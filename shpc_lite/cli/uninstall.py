"""``shpc-lite uninstall NAME[:VERSION]``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="NAME[:VERSION]", help="a module, or one version of it")


def run(args: argparse.Namespace, config) -> int:
    from shpc_lite.install import uninstall
    from shpc_lite.recipe import split_spec

    name, version = split_spec(args.spec)
    for record in uninstall(config, name, version):
        if not args.quiet:
            print(f"uninstalled {record.name}/{record.version}")
    from shpc_lite.install import after_change

    message = after_change(config)
    if message and not args.quiet:
        print(message)
    return 0
