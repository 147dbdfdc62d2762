"""``shpc-lite view create|add|remove|list|delete``: named module subsets, no re-pull."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    sub.add_parser("create", help="create an empty view").add_argument("view")
    sub.add_parser("delete", help="delete a view (modules stay installed)").add_argument("view")
    p = sub.add_parser("add", help="add installed modules to a view")
    p.add_argument("view")
    p.add_argument("spec", metavar="NAME[:VERSION]")
    p.add_argument("--as", dest="short", metavar="SHORT", help="the module's name inside the view")
    p = sub.add_parser("remove", help="remove a module from a view")
    p.add_argument("view")
    p.add_argument("spec", metavar="NAME[:VERSION]", help="the name inside the view")
    p = sub.add_parser("list", help="list views, or the modules of one view")
    p.add_argument("view", nargs="?")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, config) -> int:
    import json

    from shpc_lite import views
    from shpc_lite.recipe import split_spec

    layout = config.layout
    say = (lambda *a: None) if args.quiet else print
    if args.action == "create":
        directory = views.create(layout, args.view)
        say(f"created view {args.view}; to use it: module use {directory}")
    elif args.action == "delete":
        views.delete(layout, args.view)
        say(f"deleted view {args.view}")
    elif args.action == "add":
        name, version = split_spec(args.spec)
        for entry in views.add(layout, config, args.view, name, version, args.short):
            say(f"{args.view}: {entry.name}/{entry.version} -> {entry.target}")
    elif args.action == "remove":
        name, version = split_spec(args.spec)
        for entry in views.remove(layout, config, args.view, name, version):
            say(f"{args.view}: removed {entry.name}/{entry.version}")
    elif args.view:
        items = views.entries(layout, args.view)
        if args.json:
            print(views.to_json(items))
        else:
            for entry in items:
                print(f"{entry.name}/{entry.version}")
    else:
        names = views.views(layout)
        print(json.dumps(names) if args.json else "\n".join(names))
    return 0
