"""``shpc-lite use``: print the ``module use`` line(s) for this root (and the central one)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--view", help="print the line for a view instead")


def run(args: argparse.Namespace, config) -> int:
    from shpc_lite import views
    from shpc_lite.quoting import sh_quote

    layout = config.layout
    if args.view:
        print(f"module use {sh_quote(str(views.view_dir(layout, args.view)))}")
        return 0
    central = config.central_layout
    if central is not None:
        # `module use` prepends: the line printed last ends up first in MODULEPATH and wins.
        print(f"module use {sh_quote(str(central.modules))}")
    print(f"module use {sh_quote(str(layout.modules))}")
    return 0
