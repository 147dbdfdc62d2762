"""``shpc-lite venv create|list|remove``: personal venvs run with a module's container Python."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("create", help="create a venv at PATH with the module's Python (in its container) and "
                                      "a module that runs it; again on an existing one: refresh its module")
    p.add_argument("path", metavar="PATH", help="where the venv goes (host file system, e.g. shared storage)")
    p.add_argument("--module", required=True, metavar="NAME[:VERSION]", help="the installed module whose image runs it")
    p.add_argument("--name", dest="module_name", metavar="MODULE",
                   help="the venv module's NAME[/VERSION] (default: <name>-venv/<version>)")
    p = sub.add_parser("list", help="venv modules of this tree and their venvs")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("remove", help="remove a venv module (its venv stays unless --delete)")
    p.add_argument("spec", metavar="NAME[:VERSION]")
    p.add_argument("--delete", action="store_true",
                   help="also delete the venv directory (only one shpc-lite created for this module)")


def run(args: argparse.Namespace, config) -> int:
    import json

    from shpc_lite import venvs
    from shpc_lite.install import after_change
    from shpc_lite.recipe import split_spec

    say = (lambda *a: None) if args.quiet else print
    if args.action == "list":
        found = venvs.venvs(config.layout)
        if args.json:
            print(json.dumps([{"module": f"{r.name}/{r.version}", "venv": r.venv, "base": r.base} for r in found],
                             indent=2))
        else:
            for r in found:
                print(f"{r.name}/{r.version}\t{r.venv}\t{r.base}")
        return 0
    if args.action == "create":
        name, version = split_spec(args.module)
        record = venvs.create(config, args.path, name, version, args.module_name)
        say(f"venv {record.venv} -> module {record.name}/{record.version} ({record.modulefile}); "
            f"commands: {' '.join(record.commands)}")
    else:
        name, version = split_spec(args.spec)
        for record in venvs.remove(config, name, version, delete=args.delete):
            say(f"removed {record.name}/{record.version}" + (f" and {record.venv}" if args.delete else ""))
    message = after_change(config)
    if message:
        say(message)
    return 0
