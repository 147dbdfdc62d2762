"""``shpc-lite kernel install|list|remove``: Jupyter kernels that run a module's Python in its container."""

from __future__ import annotations

import argparse


def _where(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--user", dest="kernel_user", action="store_true",
                       help="your Jupyter data dir ($JUPYTER_DATA_DIR or ~/.local/share/jupyter)/kernels "
                            "(the default)")
    group.add_argument("--prefix", metavar="DIR", help="DIR/share/jupyter/kernels (e.g. a shared Jupyter's prefix)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("install", help="write a kernelspec that runs the module's python in its container")
    p.add_argument("spec", metavar="NAME[:VERSION]", help="an installed module (newest version by default)")
    _where(p)
    p.add_argument("--name", dest="kernel", metavar="KERNEL", help="kernel name (default: NAME-VERSION)")
    p.add_argument("--display-name", metavar="TEXT", help="the name Jupyter shows")
    p.add_argument("--no-check", action="store_true",
                   help="do not run the container once to check that the image has ipykernel")
    p = sub.add_parser("list", help="kernels shpc-lite wrote there")
    _where(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("remove", help="remove a kernel shpc-lite wrote")
    p.add_argument("kernel", metavar="KERNEL")
    _where(p)


def run(args: argparse.Namespace, config) -> int:
    import json
    from dataclasses import asdict

    from shpc_lite import kernels
    from shpc_lite.recipe import split_spec

    where = kernels.kernels_dir(args.prefix)
    if args.action == "install":
        name, version = split_spec(args.spec)
        kernel, path = kernels.install_kernel(config, name, version, where, kernel_name=args.kernel,
                                              display_name=args.display_name, check=not args.no_check)
        if not args.quiet:
            print(f"installed kernel {kernel.name} ({kernel.module}) -> {path}")
    elif args.action == "list":
        found = kernels.installed_kernels(where)
        if args.json:
            print(json.dumps([asdict(k) for k in found], indent=2))
        else:
            for k in found:
                print(f"{k.name}\t{k.module}\t{k.path}")
    else:
        path = kernels.remove_kernel(where, args.kernel)
        if not args.quiet:
            print(f"removed kernel {args.kernel} ({path})")
    return 0
