"""``shpc-lite install NAME[:VERSION] [--sif PATH | --from SOURCE]``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="NAME[:VERSION]", help="recipe name and module version")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sif", metavar="PATH", help="install this existing SIF file instead of pulling")
    source.add_argument(
        "--from", dest="source", metavar="SOURCE",
        help="build from an image the site already has, without a registry: oci:DIR[:TAG] (an OCI "
             "image layout), oci-archive:PATH[:TAG] (the same as a tar) or docker-archive:PATH[:NAME:TAG] "
             "(docker/podman save); layers are verified and stored as a pull stores them "
             "(needs NAME:VERSION of a known recipe)")


def run(args: argparse.Namespace, config) -> int:
    from shpc_lite.errors import NotFoundError
    from shpc_lite.recipe import split_spec

    name, version = split_spec(args.spec)
    if args.sif or args.source:
        if version is None:
            raise NotFoundError(f"{name}: {'--sif' if args.sif else '--from'} needs a version (NAME:VERSION)")
    if args.sif:
        from shpc_lite.install import install_sif

        record = install_sif(config, name, version, args.sif)
    elif args.source:
        from shpc_lite.install import install_from

        record = install_from(config, name, version, args.source, quiet=args.quiet)
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
