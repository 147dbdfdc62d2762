"""A real single-node Slurm for the tests (``scripts/slurm-single-node.sh``).

The session fixture ``slurm`` makes sure the node answers ``sinfo`` (starting it with the script
when it does not; bounded) and yields a :class:`Slurm` helper::

    def test_x(slurm, tmp_path):
        job = slurm.submit(["--array=0-5%2"], "#!/bin/sh\\necho $SLURM_ARRAY_TASK_ID > ...\\n")
        dep = slurm.submit([f"--dependency=afterany:{job}"], "echo done")   # --wrap (runs in /bin/sh)
        states = slurm.wait([job, dep], timeout=60)   # {"12_0": "COMPLETED", ..., "13": "COMPLETED"}

No slurmdbd, so no ``sacct``: states come from ``scontrol show job -o`` (MinJobAge=3600 keeps
finished jobs there for an hour). Skips when Slurm cannot be started (binaries missing, not root)
and says what failed; with ``CI=true`` and the binaries present, a failure to start fails instead.
If the fixture started the daemons, it stops them at session end, unless another test session
still uses them (shared flock on ``/run/shpc-lite-slurm/users.lock``).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable, Sequence, Union

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm-single-node.sh"
RUN_DIR = Path("/run/shpc-lite-slurm")
USERS_LOCK = RUN_DIR / "users.lock"
STARTED_MARK = RUN_DIR / "fixture-started"
BINARIES = ("sbatch", "squeue", "scontrol", "sinfo", "slurmctld", "slurmd", "munged")
START_TIMEOUT = 150.0  # the script itself waits at most 60 s for the node
TERMINAL = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
})
USABLE_NODE_STATES = ("idle", "mix", "alloc", "comp")
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)")

ScriptOrWrap = Union[str, Path]


def _path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _run(cmd: Sequence[str], timeout: float = 30.0, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": _path()}
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, **kw)


def parse_scontrol_line(line: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` (one ``scontrol show -o`` record) as a dict."""
    return {m.group(1): m.group(2) for m in _FIELD.finditer(line.strip())}


def _job_key(rec: dict[str, str]) -> str:
    task = rec.get("ArrayTaskId")
    if task is None:
        return rec.get("JobId", "?")
    if task.isdigit():
        return f"{rec['ArrayJobId']}_{task}"
    return f"{rec['ArrayJobId']}_[{task}]"  # a still-pending range such as 2-5%2


class Slurm:
    """Submit jobs to the single node and wait for them."""

    def __init__(self, partition: str, workdir: Path, started: bool, startup_seconds: float):
        self.partition = partition
        self.workdir = workdir          # default --chdir: slurm-%j.out files land here
        self.started = started          # True when this session started the daemons
        self.startup_seconds = startup_seconds

    def submit(self, args: Sequence[str], script_or_wrap: ScriptOrWrap, *, timeout: float = 30.0) -> str:
        """``sbatch --parsable [--partition P] [--chdir WORKDIR] ARGS ...``; returns the job id.

        ``script_or_wrap``: a :class:`Path` is a batch script file; a ``str`` starting with ``#!``
        is a batch script's text (given on stdin); any other ``str`` is a ``--wrap`` command
        (sbatch runs it with ``/bin/sh``, dash on Debian). For an array this is the array job id.
        """
        args = [str(a) for a in args]
        cmd = ["sbatch", "--parsable"]
        if not any(a == "-p" or a.startswith("--partition") or (a.startswith("-p") and not a.startswith("--"))
                   for a in args):
            cmd.append(f"--partition={self.partition}")
        if not any(a in ("-D", "--chdir") or a.startswith("--chdir=") or a.startswith("-D") for a in args):
            cmd.append(f"--chdir={self.workdir}")
        cmd += args
        stdin = None
        if isinstance(script_or_wrap, Path):
            cmd.append(str(script_or_wrap))
        elif script_or_wrap.startswith("#!"):
            stdin = script_or_wrap
        else:
            cmd += ["--wrap", script_or_wrap]
        proc = _run(cmd, timeout=timeout, input=stdin)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise RuntimeError(f"sbatch --parsable printed {proc.stdout!r}, not a job id")
        return job_id

    def show(self, job_id: Union[str, int]) -> list[dict[str, str]]:
        """``scontrol show job -o JOB``: one record per job (per array task / pending task range)."""
        proc = _run(["scontrol", "show", "job", "-o", str(job_id)])
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol show job -o {job_id} failed ({proc.returncode}): {proc.stderr.strip()}"
                               " (unknown job, or purged after MinJobAge)")
        return [parse_scontrol_line(line) for line in proc.stdout.splitlines() if line.strip()]

    def wait(self, job_ids: Union[str, int, Iterable[Union[str, int]]], timeout: float = 60.0,
             poll: float = 0.25) -> dict[str, str]:
        """Poll until every job (and every array task) is in a final state; bounded by ``timeout``.

        Returns ``{job key: JobState}`` where the key is ``"<id>"`` or ``"<array id>_<task>"``.
        Raises :class:`TimeoutError` (with squeue and scontrol output) when time runs out.
        """
        ids = [str(job_ids)] if isinstance(job_ids, (str, int)) else [str(j) for j in job_ids]
        deadline = time.monotonic() + timeout
        while True:
            records = [rec for job in ids for rec in self.show(job)]
            states = {_job_key(rec): rec.get("JobState", "?") for rec in records}
            if records and all(state in TERMINAL for state in states.values()):
                return states
            if time.monotonic() >= deadline:
                queue = _run(["squeue", "-a", "-l"]).stdout
                raise TimeoutError(f"Slurm jobs {ids} not finished after {timeout} s: {states}\n"
                                   f"squeue:\n{queue}")
            time.sleep(poll)

    def run(self, args: Sequence[str], script_or_wrap: ScriptOrWrap, timeout: float = 60.0) -> tuple[str, dict[str, str]]:
        """submit + wait: ``(job id, states)``."""
        job_id = self.submit(args, script_or_wrap)
        return job_id, self.wait(job_id, timeout=timeout)

    def cancel(self, job_ids: Union[str, int, Iterable[Union[str, int]]]) -> None:
        """``scancel`` (errors ignored: the job may be gone already)."""
        ids = [str(job_ids)] if isinstance(job_ids, (str, int)) else [str(j) for j in job_ids]
        if ids:
            _run(["scancel", *ids])

    def output(self, job_key: Union[str, int]) -> str:
        """The job's (or array task's, ``"12_0"``) StdOut file, as text ("" if there is none yet)."""
        (rec,) = self.show(job_key)[:1]
        path = Path(rec.get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else ""


def _node_partition() -> str | None:
    """The default (else first) partition with a usable node, when ``sinfo`` answers."""
    try:
        # scontrol ping answers at once; sinfo retries for ~10 s when no controller runs.
        ping = _run(["scontrol", "ping"], timeout=15)
        if ping.returncode != 0 or "is UP" not in ping.stdout:
            return None
        proc = _run(["sinfo", "-h", "-o", "%P %t"], timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    usable = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        # %t: short state plus flags; "*" = not responding.
        if len(parts) == 2 and not parts[1].endswith("*") and parts[1].rstrip("~#!%$@^-+") in USABLE_NODE_STATES:
            usable.append(parts[0])
    for name in usable:
        if name.endswith("*"):
            return name[:-1]
    return usable[0] if usable else None


def _cannot_start(reason: str, binaries_present: bool):
    from tests.needs import missing

    missing(f"no Slurm: {reason}" + ("" if binaries_present else " (slurm-wlm not installed)"))


def _lock_shared(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm")
    t0 = time.monotonic()
    missing = [b for b in BINARIES if shutil.which(b, path=_path()) is None]
    users_fd = None
    if os.geteuid() == 0 and not missing:
        # Held (shared) for the whole session so that a session that started the daemons does not
        # stop them under another session's feet.
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        users_fd = os.open(USERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if not _lock_shared(users_fd, START_TIMEOUT):
            os.close(users_fd)
            _cannot_start(f"{USERS_LOCK} stayed locked for {START_TIMEOUT} s (another session stopping Slurm?)", True)
    try:
        partition = _node_partition()
        started = False
        if partition is None:
            if missing:
                _cannot_start(f"no running Slurm answers and Slurm binaries are missing: {', '.join(missing)} "
                              "(apt-get install slurm-wlm munge)", False)
            if os.geteuid() != 0:
                _cannot_start(f"no running Slurm answers (scontrol ping, sinfo) and starting one needs root ({SCRIPT.name} start "
                              f"writes /etc/slurm/slurm.conf), but uid is {os.geteuid()}", True)
            STARTED_MARK.write_text(f"{os.getpid()}\n")  # before: a half-done start is undone at the end too
            try:
                proc = _run(["bash", str(SCRIPT), "start"], timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                _cannot_start(f"{SCRIPT.name} start did not finish in {START_TIMEOUT} s", True)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
                _cannot_start(f"{SCRIPT.name} start failed (exit {proc.returncode}):\n{tail}", True)
            started = True
            partition = _node_partition()
            if partition is None:
                _cannot_start(f"{SCRIPT.name} start succeeded but sinfo shows no usable node:\n"
                              f"{_run(['sinfo', '-N', '-l']).stdout}", True)
        yield Slurm(partition, workdir, started, time.monotonic() - t0)
    finally:
        if users_fd is not None:
            try:
                # Last session out stops daemons that a fixture started (never ones running before).
                fcntl.flock(users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if STARTED_MARK.exists():
                    _run(["bash", str(SCRIPT), "stop"], timeout=120)
                    STARTED_MARK.unlink(missing_ok=True)
            except BlockingIOError:
                pass  # another session still uses the node
            finally:
                os.close(users_fd)
