"""``shpc-lite batch install|sync|status MANIFEST``: a whole site stack at once."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("install", help="install everything the manifest lists (idempotent)")
    p.add_argument("manifest")
    p.add_argument("--jobs", type=int, help="images handled at once (default: config jobs)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.add_argument("--slurm", nargs="?", const="", metavar="SBATCH_OPTIONS",
                   help='submit the pulls as a Slurm job array; sbatch options as one string: '
                        '--slurm="--partition=x --time=1:00:00"')
    p = sub.add_parser("sync", help="install what the manifest lists and uninstall what it no longer lists")
    p.add_argument("manifest")
    p.add_argument("--jobs", type=int)
    p.add_argument("--yes", action="store_true", help="do not ask before uninstalling")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("status", help="progress of the last Slurm batch")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("task")  # run by a Slurm array task (not listed in help)
    p.add_argument("directory")
    p.add_argument("--index", type=int, required=True)
    p = sub.add_parser("finish")  # run by the dependent Slurm job (not listed in help)
    p.add_argument("directory")


def _print(args, outcomes, extra_lines=()):
    from shpc_lite.site import outcomes_json, summary_table

    if args.json:
        print(outcomes_json(outcomes))
    elif not args.quiet:
        print(summary_table(outcomes))
        for line in extra_lines:
            print(line)


def _failed(outcomes) -> int:
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _refresh(config) -> list[str]:
    from shpc_lite.install import after_change

    message = after_change(config)
    return [message] if message else []


def run(args: argparse.Namespace, config) -> int:
    from shpc_lite import site

    if args.action == "task":
        return _task(args, config)
    if args.action == "finish":
        return _finish(args, config)
    if args.action == "status":
        return _status(args, config)
    jobs = args.jobs or config["jobs"]
    entries = site.load_manifest(args.manifest)
    slurm_options = getattr(args, "slurm", None)  # install only
    if slurm_options is None and not args.dry_run:  # install, sync
        outcomes = site.install(config, entries, jobs=jobs, quiet=args.quiet or args.json)
        if args.action == "sync":
            outcomes += _remove_unlisted(args, config, outcomes)
        return _report(args, config, outcomes)
    the_plan = site.plan(config, entries)
    if slurm_options is not None:
        return _submit(args, config, the_plan, jobs)
    outcomes = site.dry_run(config, the_plan, jobs=jobs)
    if args.action == "sync":
        removals = site.unlisted(config, [*the_plan.errors, *(site.Outcome(t, t.label, "") for t in the_plan.tasks)])
        outcomes += [site.Outcome(None, f"{r.name}/{r.version}", "would-remove") for r in removals]
    _print(args, outcomes)
    return _failed(outcomes)


def _report(args, config, outcomes) -> int:
    """After a batch changed the tree: the indexes refreshed once, the summary printed."""
    changed = any(o.status in ("installed", "updated", "removed") for o in outcomes)
    extra = _refresh(config) if changed else []
    if not changed and not _failed(outcomes):
        extra.append("nothing to do: everything in the manifest is installed")
    _print(args, outcomes, extra)
    return _failed(outcomes)


def _remove_unlisted(args, config, outcomes):
    import sys

    from shpc_lite import site
    from shpc_lite.install import uninstall

    removals = site.unlisted(config, outcomes)
    if not removals:
        return []
    names = ", ".join(f"{r.name}/{r.version}" for r in removals)
    if not args.yes:
        if not sys.stdin.isatty():
            from shpc_lite.errors import SiteError

            raise SiteError(f"sync would uninstall {names}: confirm with --yes")
        answer = input(f"uninstall {names}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return [site.Outcome(None, f"{r.name}/{r.version}", "kept", "not confirmed") for r in removals]
    out = []
    for r in removals:
        uninstall(config, r.name, r.version)
        out.append(site.Outcome(None, f"{r.name}/{r.version}", "removed"))
    return out


def _submit(args, config, the_plan, jobs) -> int:
    import json

    from shpc_lite import site, slurm

    outcomes = site.dry_run(config, the_plan, jobs=jobs)
    todo = [o.task for o in outcomes if o.task is not None and o.status.startswith("would-")]
    if args.dry_run or not todo:
        _print(args, outcomes, [] if todo else ["nothing to do: everything in the manifest is installed"])
        return _failed(outcomes)
    sub = slurm.submit(config, todo, args.slurm, throttle=jobs)
    info = {"directory": str(sub.directory), "array_job": sub.array_job, "finish_job": sub.finish_job,
            "tasks": sub.tasks, "failed": [o.to_json() for o in outcomes if o.status == "failed"]}
    if args.json:
        print(json.dumps(info, indent=2))
    elif not args.quiet:
        print(f"submitted {sub.tasks} pull task(s) as job array {sub.array_job} and module generation as job "
              f"{sub.finish_job} (after the array); follow with: shpc-lite batch status")
        for o in outcomes:
            if o.status == "failed":
                print(f"not submitted: {o.label}: {o.detail}")
    return _failed(outcomes)


def _task(args, config) -> int:
    """One array task: pull its image into the shared store (modules come in ``finish``)."""
    import time
    from pathlib import Path

    from shpc_lite import site, slurm
    from shpc_lite.errors import ShpcLiteError
    from shpc_lite.puller import pull

    tasks, _ = slurm.load_plan(args.directory)
    task = tasks[args.index]
    start = time.monotonic()
    try:
        if task.sif is not None:  # a SIF file: stored once, as ``install --sif`` does
            from shpc_lite.store import import_sif

            path, _ = import_sif(config, Path(task.sif))
        else:
            path = pull(config, task.choice.ref, task.digest, quiet=True).path
        outcome = site.Outcome(task, task.label, "pulled", str(path), time.monotonic() - start)
    except ShpcLiteError as err:
        outcome = site.Outcome(task, task.label, "failed", str(err), time.monotonic() - start)
    slurm.record_result(args.directory, args.index, outcome)
    print(f"{task.label}: {outcome.status} {outcome.detail}")
    return 0 if outcome.status != "failed" else 1


def _finish(args, config) -> int:
    """The dependent job: generate modules for the pulled images (pulls again only what failed)."""
    from pathlib import Path

    from shpc_lite import site, slurm
    from shpc_lite.fsutil import atomic_write

    tasks, _ = slurm.load_plan(args.directory)
    outcomes = site.run(config, site.Plan(tasks=tasks), jobs=config["jobs"], quiet=True)
    extra = _refresh(config)
    atomic_write(Path(args.directory) / "finish.json", site.outcomes_json(outcomes))
    _print(argparse.Namespace(json=False, quiet=args.quiet), outcomes, extra)
    return _failed(outcomes)


def _status(args, config) -> int:
    import json

    from shpc_lite import slurm

    directory = slurm.latest(config)
    jobs = json.loads((directory / "jobs.json").read_text())
    states = slurm.job_states([jobs["array"], jobs["finish"]])
    tasks, _ = slurm.load_plan(directory)
    results = slurm.results(directory, len(tasks))
    finish_state = states.get(jobs["finish"], "UNKNOWN")
    rows = []
    for i, task in enumerate(tasks):
        state = states.get(f"{jobs['array']}_{i}", "")
        result = results[i]
        rows.append({"module": task.label, "job": f"{jobs['array']}_{i}", "state": state or "UNKNOWN",
                     "result": result["status"] if result else "", "detail": result["detail"] if result else ""})
    if args.json:
        print(json.dumps({"directory": str(directory), "finish_job": jobs["finish"], "finish_state": finish_state,
                          "tasks": rows}, indent=2))
        return 0
    print(f"batch {directory}")
    for row in rows:
        print(f"  {row['module']:<28} {row['job']:<12} {row['state']:<11} {row['result']} {row['detail']}")
    done = sum(1 for r in rows if r["result"])
    print(f"  pulls: {done}/{len(rows)} finished; module generation job {jobs['finish']}: {finish_state}")
    return 0
