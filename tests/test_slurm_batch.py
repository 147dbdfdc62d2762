"""Issue 5: `batch install --slurm` on a real single-node Slurm (tests/slurm_fixture.py).

The pulls run as a job array on the node, the module generation as a dependent job; afterwards
the modules load in real Lmod. The runtime would be the recording stand-in; nothing execs it here.
"""

from __future__ import annotations

import json
import os
import shutil


from tests.modsys import have, run_bash
from tests.test_site import _manifest, stack  # noqa: F401  (fixture)
from tests.needs import requires

pytestmark = requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed")


def test_batch_on_slurm(site, stack, slurm):  # noqa: F811
    manifest = _manifest(site, ["alpha", "bravo", "charlie", "share-one", "share-two"])
    proc = site.cli("batch", "install", str(manifest), "--jobs", "2", "--json",
                    "--slurm", f"--partition={slurm.partition} --time=10")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["tasks"] == 6  # alpha has two versions
    states = slurm.wait([info["array_job"], info["finish_job"]], timeout=240)
    assert all(state == "COMPLETED" for state in states.values()), states
    # the array ran one task per module version, throttled to 2 at once
    assert sum(1 for key in states if key.startswith(f"{info['array_job']}_")) == 6
    status = json.loads(site.cli("batch", "status", "--json", check=True).stdout)
    assert status["finish_state"] == "COMPLETED"
    assert {t["result"] for t in status["tasks"]} == {"pulled"}
    # one SIF per distinct digest: alpha 1.0/2.0 share one, share-one/share-two share one
    assert len(list((site.root / "containers").glob("*.sif"))) == 4
    for module in ("alpha/1.0", "alpha/2.0", "bravo/1.0", "charlie/1.0", "share-one/1.0", "share-two/1.0"):
        assert (site.root / "modules" / f"{module}.lua").is_file(), module
    if have("lmod"):
        out = run_bash("lmod", f"module use {site.root}/modules\nmodule load alpha\nmodule list 2>&1\n"
                               "command -v alpha-tool", site.env)
        assert out.returncode == 0, out.stderr.decode()
        assert "alpha/2.0" in out.stdout.decode()
        assert str(site.root / "wrappers" / "alpha" / "2.0" / "bin" / "alpha-tool") in out.stdout.decode()
    again = site.cli("batch", "install", str(manifest), f"--slurm=--partition={slurm.partition}")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_wrappers_under_srun_and_sbatch_wrap(site, small_sif, slurm):
    """Wrapper scripts are plain sh: they work under `sbatch --wrap` (dash) and `srun`."""
    import subprocess

    from tests.conftest import read_record

    site.cli("install", "python:3.12", "--sif", str(small_sif), check=True)
    wrapper = site.root / "wrappers" / "python" / "3.12" / "bin" / "python"
    stored = next((site.root / "containers").glob("*.sif"))
    env = {**site.env, "PATH": site.env["PATH"] + ":/usr/sbin:/sbin"}
    job = subprocess.run(["sbatch", "--parsable", f"--partition={slurm.partition}", f"--chdir={site.tmp}",
                          "--wrap", f"{wrapper} -c 'print(1)' 'two words' '$HOME'"],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert slurm.wait([job], timeout=120)[job] == "COMPLETED"
    argv, _ = read_record(site)
    assert argv == [b"exec", str(stored).encode(), b"python", b"-c", b"print(1)", b"two words", b"$HOME"]
    subprocess.run(["srun", f"--partition={slurm.partition}", "--ntasks=1", str(wrapper), "-V", "x y"],
                   env=env, capture_output=True, timeout=120, check=True)
    argv, _ = read_record(site)
    assert argv == [b"exec", str(stored).encode(), b"python", b"-V", b"x y"]


def test_status_asks_sacct_for_jobs_slurm_has_forgotten(tmp_path, monkeypatch):
    """scontrol drops finished jobs after MinJobAge; accounting (sacct) still knows them. Slurm
    commands are stand-ins here: the single-node Slurm of the tests has no slurmdbd."""
    from shpc_lite.slurm import job_states

    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, script in {
        "squeue": "exit 0",
        "scontrol": "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
        "sacct": "printf '42_0|COMPLETED\\n42_1|FAILED\\n43|CANCELLED by 0\\n'",
    }.items():
        (bindir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert job_states(["42", "43"]) == {"42_0": "COMPLETED", "42_1": "FAILED", "43": "CANCELLED"}
    (bindir / "sacct").write_text("#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2; exit 1\n")
    assert job_states(["42", "43"]) == {}
