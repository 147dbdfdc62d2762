"""``shpc-lite check [NAME] [--json]``: are installed and locked versions still what the registry has?

Exit codes: 0 everything is up to date; 100 something is out of date (a tag was re-pushed, or
the recipe's select rule now chooses a newer version), as ``dnf check-update`` does; 1 an error
(a registry could not be asked, a bad lock file ...), which wins over 100. argparse uses 2.
"""

from __future__ import annotations

import argparse

OUT_OF_DATE = 100


EPILOG = """\
Compares the digest of every installed module version and every locked version with what its
tag points at now (HEAD requests only), and asks each recipe's select rule whether it now
chooses a version newer than the newest installed (or, with none installed, locked) one.

--json prints {"out_of_date": bool, "findings": [{"name", "version", "kind", "source", "tag",
"recorded", "current", "detail"}], "errors": [{"name", "error"}]}, where kind is up-to-date,
repushed (same tag, new digest), newer, or not-compared (installed from a SIF file), and
source is installed or lock.

Exit codes: 0 all up to date, 100 something is out of date (as dnf check-update),
1 an error (wins over 100), 2 bad usage.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("name", nargs="?", help="check only this module (default: all installed or locked)")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument("--jobs", type=int, help="registry requests at once (default: config jobs)")


def _line(f) -> str:
    where = f"{f.name} {f.version} ({f.source})"
    if f.kind == "repushed":
        return f"{where}: tag {f.tag} was re-pushed: {f.recorded} -> {f.current}"
    if f.kind == "newer":
        return f"{f.name} {f.version}: newer version available, tag {f.tag} ({f.detail})"
    if f.kind == "not-compared":
        return f"{where}: not compared: {f.detail}"
    return f"{where}: up to date ({f.tag} {f.recorded})"


def run(args: argparse.Namespace, config) -> int:
    import json
    import sys

    from shpc_lite.errors import NotFoundError, ShpcLiteError
    from shpc_lite.lock import Lock, load_lock
    from shpc_lite.modules import installed
    from shpc_lite.recipe import recipe_index, split_spec
    from shpc_lite.resolve import check, client_from_config, report_to_json

    layout = config.layout
    name = split_spec(args.name)[0] if args.name else None
    records = installed(layout, name)
    lock = load_lock(layout.lock_file)
    if lock is not None and name:
        lock = Lock(tuple(r for r in lock.recipes if r.name == name))
    names = {r.name for r in records} | set(lock.names() if lock else ())
    index = recipe_index(config)
    if name and name not in names:
        index.get(name)  # unknown recipe: NotFoundError
        raise NotFoundError(f"{name}: nothing installed or locked to check (run shpc-lite resolve {name})")
    recipes = {}
    for each in sorted(names):
        try:
            recipes[each] = index.get(each)
        except ShpcLiteError:
            pass  # installed from a recipe that is gone: its digests can still be compared
    with client_from_config(config) as client:
        report = check(recipes, records, lock, client, jobs=args.jobs or config["jobs"])

    if args.json:
        print(json.dumps(report_to_json(report), indent=2))
    elif not args.quiet:
        for f in report.findings:
            print(_line(f))
        counts: dict[str, int] = {}
        for f in report.findings:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing to check"
        print(f"checked {len(names)} module(s): {summary}")
    for failure in report.failures:
        print(f"shpc-lite: error: {failure.error}", file=sys.stderr)
    if report.failures:
        return 1
    return OUT_OF_DATE if report.out_of_date else 0
