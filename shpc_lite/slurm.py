"""Scale a batch install out on Slurm: a job array pulls (one task per image, throttled), then a
dependent job (``afterany``) generates the modules and indexes.

Everything a job needs is in a plan directory under ``<root>/batch/``: the tasks, the config
values given on the command line (so the jobs see the same root and settings), the job ids and
one result file per task. The compute nodes share the store and its locks, so an image is pulled
once even if two tasks share it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from shpc_lite.config import Config
from shpc_lite.errors import SiteError
from shpc_lite.fsutil import atomic_write
from shpc_lite.site import Outcome, Task, task_from_json, task_to_json


@dataclass(frozen=True)
class Submission:
    directory: Path
    array_job: str
    finish_job: str
    tasks: int


def batch_root(config: Config) -> Path:
    return config.layout.batches


def _sbatch(argv: list[str]) -> str:
    if not shutil.which("sbatch"):
        raise SiteError("--slurm needs sbatch on PATH (load the Slurm module or run on a login node)")
    proc = subprocess.run(["sbatch", "--parsable", *argv], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SiteError(f"sbatch failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return proc.stdout.strip().split(";")[0]


def _cli(flags: dict[str, Any], *args: str) -> str:
    """The shell command a job runs: this Python, this package, the same config flags."""
    words = [sys.executable, "-m", "shpc_lite"]
    for key, value in sorted(flags.items()):
        words += ["--set", f"{key}={','.join(value) if isinstance(value, list) else value}"]
    return " ".join(shlex.quote(w) for w in [*words, *args])


def submit(config: Config, tasks: list[Task], sbatch_options: str, throttle: int) -> Submission:
    if not tasks:
        raise SiteError("nothing to submit: every module of the manifest is installed")
    root = batch_root(config)
    directory = root / time.strftime("%Y%m%d-%H%M%S") / str(os.getpid())
    directory.mkdir(parents=True)
    flags = {k: config[k] for k, source in config.sources.items() if source.startswith("flag ")}
    flags["root"] = str(config.layout.root)
    plan_file = directory / "plan.json"
    atomic_write(plan_file, json.dumps({"tasks": [task_to_json(t) for t in tasks], "flags": flags}, indent=2))
    options = shlex.split(sbatch_options or "")
    array = _sbatch([
        *options, f"--array=0-{len(tasks) - 1}%{max(1, throttle)}", "--job-name=shpc-lite-pull",
        f"--output={directory}/pull-%a.out",
        "--wrap", _cli(flags, "batch", "task", str(directory), "--index") + ' "$SLURM_ARRAY_TASK_ID"',
    ])
    finish = _sbatch([
        *options, f"--dependency=afterany:{array}", "--job-name=shpc-lite-index",
        f"--output={directory}/finish.out",
        "--wrap", _cli(flags, "batch", "finish", str(directory)),
    ])
    atomic_write(directory / "jobs.json", json.dumps({"array": array, "finish": finish, "tasks": len(tasks)}))
    atomic_write(root / "latest", str(directory))
    return Submission(directory, array, finish, len(tasks))


def load_plan(directory: Path) -> tuple[list[Task], dict]:
    try:
        data = json.loads((Path(directory) / "plan.json").read_text())
    except (OSError, ValueError) as err:
        raise SiteError(f"{directory}: no readable plan.json ({err})") from None
    return [task_from_json(t) for t in data["tasks"]], data.get("flags", {})


def record_result(directory: Path, index: int, outcome: Outcome) -> None:
    atomic_write(Path(directory) / f"task-{index}.json", json.dumps(outcome.to_json()))


def results(directory: Path, count: int) -> list[Optional[dict]]:
    out = []
    for i in range(count):
        try:
            out.append(json.loads((Path(directory) / f"task-{i}.json").read_text()))
        except (OSError, ValueError):
            out.append(None)
    return out


def job_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job (array tasks expanded) from squeue, then scontrol for finished ones,
    then sacct for those Slurm no longer holds in memory."""
    states: dict[str, str] = {}
    if shutil.which("squeue"):
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids)],
                              capture_output=True, text=True, timeout=60)
        for line in proc.stdout.splitlines():
            job, _, state = line.partition(" ")
            states[job] = state
    if shutil.which("scontrol"):
        for job in job_ids:
            proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
            for line in proc.stdout.splitlines():
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                jid = fields.get("JobId", job)
                if fields.get("ArrayTaskId") and fields.get("ArrayJobId"):
                    jid = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
                states.setdefault(jid, fields.get("JobState", "UNKNOWN"))
    missing = [job for job in job_ids if not any(k == job or k.startswith(job + "_") for k in states)]
    if missing and shutil.which("sacct"):
        # scontrol forgets finished jobs after MinJobAge (300 s by default); sites with
        # accounting still know them. Without slurmdbd sacct fails: nothing is added.
        proc = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing)],
                              capture_output=True, text=True, timeout=60)
        for line in proc.stdout.splitlines() if proc.returncode == 0 else ():
            job, _, state = line.partition("|")
            if job and state:
                states.setdefault(job, state.split()[0])
    return states


def latest(config: Config) -> Path:
    marker = batch_root(config) / "latest"
    if not marker.exists():
        raise SiteError(f"no Slurm batch has been submitted from {config.layout.root}")
    return Path(marker.read_text().strip())
