"""``shpc-lite use``: print the ``module use`` line(s) for this root (and the central one)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--view", help="print the line for a view instead")


def run(args: argparse.Namespace, config) -> int:
    from shpc_lite import views
    from shpc_lite.quoting import sh_quote

    paths = config.paths
    if args.view:
        print(f"module use {sh_quote(str(views.view_dir(paths, args.view)))}")
        return 0
    central = config["central_root"]
    if central:
        # `module use` prepends: the line printed last ends up first in MODULEPATH and wins.
        from pathlib import Path

        print(f"module use {sh_quote(str(Path(central) / 'modules'))}")
    print(f"module use {sh_quote(str(paths.modules))}")
    return 0
