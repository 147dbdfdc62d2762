"""``shpc-lite doctor [--json] [--offline]``: exit 1 if any check found an error."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--offline", action="store_true", help="skip the registry check")


def run(args: argparse.Namespace, config) -> int:
    import json

    from shpc_lite.doctor import run_checks

    findings = run_checks(config, network=not args.offline)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        for f in findings:
            print(f"[{f.level:>5}] {f.check}: {f.detail}")
            if f.fix:
                print(f"        fix: {f.fix}")
    return 1 if any(f.level == "error" for f in findings) else 0
