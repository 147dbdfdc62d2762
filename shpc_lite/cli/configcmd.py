"""``shpc-lite config [show] [KEY] [--json]``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="show", choices=["show", "get", "paths"])
    parser.add_argument("key", nargs="?", help="only this key")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, config) -> int:
    import json

    from shpc_lite.config import KEYS, system_config_path, user_config_path
    from shpc_lite.errors import ConfigError

    if args.action == "paths":
        layout = config.layout
        rows = {
            "system_config": str(system_config_path()),
            "user_config": str(user_config_path()),
            "root": str(layout.root),
            "modules": str(layout.modules),
            "containers": str(layout.containers),
            "wrappers": str(layout.wrappers),
            "lock_file": str(layout.lock_file),
        }
        print(json.dumps(rows, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in rows.items()))
        return 0
    keys = list(KEYS)
    if args.key:
        if args.key not in KEYS:
            raise ConfigError(f"unknown config key {args.key!r}")
        keys = [args.key]
    if args.action == "get":
        value = config[keys[0]]
        print(json.dumps(value) if isinstance(value, (list, dict, bool)) else value)
        return 0
    if args.json:
        print(json.dumps({k: {"value": config[k], "source": config.sources[k]} for k in keys}, indent=2))
        return 0
    width = max(map(len, keys))
    for key in keys:
        value = config[key]
        shown = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
        print(f"{key:<{width}}  {shown}  ({config.sources[key]})")
    return 0
