"""The ``slurm`` fixture drives a real single-node Slurm: arrays, dependencies, --wrap jobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.slurm_fixture import parse_scontrol_line


def _times(path: Path) -> float:
    return float(path.read_text().strip())


def test_array_dependency_and_wrap(slurm, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    array_script = f"""#!/bin/sh
set -e
out='{out}'
date +%s.%N > "$out/start.$SLURM_ARRAY_TASK_ID"
echo "$SLURM_ARRAY_TASK_ID" > "$out/task.$SLURM_ARRAY_TASK_ID"
sleep 1
date +%s.%N > "$out/end.$SLURM_ARRAY_TASK_ID"
"""
    array = slurm.submit(["--array=0-2%2", "--job-name=shpc-array"], array_script)
    dep = slurm.submit(
        [f"--dependency=afterany:{array}", "--job-name=shpc-after"],
        f"""#!/bin/sh
date +%s.%N > '{out}/after.start'
cat '{out}'/task.* > '{out}/after.seen'
""",
    )
    # --wrap: sbatch makes a "#!/bin/sh" script of the command (dash on Debian).
    wrap = slurm.submit(["--job-name=shpc-wrap"],
                        f"readlink /proc/$$/exe > '{out}/wrap.shell'; echo \"${{BASH_VERSION:-nobash}}\" >> '{out}/wrap.shell'")

    states = slurm.wait([array, dep, wrap], timeout=90)
    assert states == {
        f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED", f"{array}_2": "COMPLETED",
        dep: "COMPLETED", wrap: "COMPLETED",
    }, states

    # Every task wrote its SLURM_ARRAY_TASK_ID.
    assert sorted((out / f"task.{i}").read_text().strip() for i in range(3)) == ["0", "1", "2"]
    # %2: never more than two tasks at once, and the throttle is recorded.
    spans = [(_times(out / f"start.{i}"), _times(out / f"end.{i}")) for i in range(3)]
    for start, _ in spans:
        assert sum(1 for s, e in spans if s <= start < e) <= 2, spans
    assert {rec.get("ArrayTaskThrottle") for rec in slurm.show(array)} == {"2"}
    # afterany: the dependent job started after the last task ended and saw all three files.
    assert _times(out / "after.start") >= max(e for _, e in spans), (spans, _times(out / "after.start"))
    assert sorted((out / "after.seen").read_text().split()) == ["0", "1", "2"]
    # The --wrap job ran under /bin/sh, not bash.
    shell, marker = (out / "wrap.shell").read_text().split("\n")[:2]
    assert shell == os.path.realpath("/bin/sh"), shell
    assert marker == "nobash"


def test_failed_job_state_and_output(slurm):
    job, states = slurm.run([], "echo to-stdout; exit 3", timeout=60)
    assert states == {job: "FAILED"}
    (rec,) = slurm.show(job)
    assert rec["ExitCode"] == "3:0"
    assert slurm.output(job) == "to-stdout\n"
    # Default --chdir is the session's slurm work dir (nothing lands in the checkout).
    assert Path(rec["StdOut"]).parent == slurm.workdir


def test_wait_times_out_with_details(slurm):
    job = slurm.submit([], "sleep 30")
    try:
        with pytest.raises(TimeoutError, match=job):
            slurm.wait(job, timeout=0.5)
    finally:
        slurm.cancel(job)
    assert slurm.wait(job, timeout=30) == {job: "CANCELLED"}


def test_parse_scontrol_line():
    rec = parse_scontrol_line("JobId=7 ArrayJobId=5 ArrayTaskId=1-2%2 JobState=PENDING Reason=JobArrayTaskLimit "
                              "AllocNode:Sid=vm:1 ReqB:S:C:T=0:0:*:* Socks/Node=* Power=")
    assert rec["ArrayTaskId"] == "1-2%2"
    assert rec["AllocNode:Sid"] == "vm:1"
    assert rec["Socks/Node"] == "*"
    assert rec["Power"] == ""
