"""``shpc-lite inspect NAME[:VERSION] [--json]``: the SIF's header, objects, labels and env."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="NAME[:VERSION]", help="an installed module (default: its newest version)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _show(line: str) -> None:
    """One line of text: labels, env and names come from the image, so escapes are shown, not run."""
    from shpc_lite.scrub import printable

    print(printable(line))


def run(args: argparse.Namespace, config) -> int:
    import json

    from shpc_lite.inspect import inspect_sif
    from shpc_lite.modules import find_installed
    from shpc_lite.recipe import split_spec

    name, version = split_spec(args.spec)
    record = find_installed(config.layout, name, version)[-1]
    info = {"module": f"{record.name}/{record.version}", "image": f"{record.image}:{record.tag}",
            "digest": record.digest, **inspect_sif(record.sif)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    header = info["header"]
    _show(f"{info['module']}  {info['image']}  {info['digest']}")
    _show(f"SIF {info['sif']}")
    _show(f"  version {header['version']}  arch {header['arch']}  id {header['id']}  created {header['created']}")
    _show(f"  launch script {header['launch_script']!r}  size {header['data_size']} bytes of data")
    _show("  objects:")
    for obj in info["objects"]:
        extra = f" {obj['fs_type']} {obj['partition_type']} {obj['arch']}" if obj["type"] == "Partition" else ""
        _show(f"    {obj['id']:>3} {obj['type']:<12} {obj['name'] or '-':<18} offset {obj['offset']:>10} "
               f"size {obj['size']:>12}{extra}")
    if info["labels"]:
        _show("  labels:")
        for key, value in sorted(info["labels"].items()):
            _show(f"    {key}={value}")
    if info["env"]:
        _show("  env:")
        for key, value in info["env"].items():
            _show(f"    {key}={value}")
    return 0
