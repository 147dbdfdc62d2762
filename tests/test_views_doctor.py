"""Views (module subsets under short names, real Lmod) and doctor's findings."""

from __future__ import annotations

import json


from tests.conftest import read_record
from tests.modsys import have, run_bash
from tests.needs import requires


@requires(have("lmod"), reason="Debian lmod not installed")
def test_view_lifecycle(site, small_sif):
    for spec in ("pytorch:2.2.1", "pytorch:2.8.0", "python:3.12"):
        site.cli("install", spec, "--sif", str(small_sif), check=True)
    site.cli("view", "create", "course", check=True)
    site.cli("view", "add", "course", "pytorch:2.2.1", "--as", "torch", check=True)
    site.cli("view", "add", "course", "python", check=True)
    listed = json.loads(site.cli("view", "list", "course", "--json", check=True).stdout)
    assert sorted((e["name"], e["version"]) for e in listed) == [("python", "3.12"), ("torch", "2.2.1")]
    use = site.cli("use", "--view", "course", check=True).stdout.strip()
    out = run_bash("lmod", f"{use}\nmodule avail 2>&1\nmodule load torch\ntorchrun x.py", site.env)
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr.decode()
    assert "torch/2.2.1" in text and "python/3.12" in text and "pytorch/2.8.0" not in text
    argv, _ = read_record(site)
    assert argv[-2:] == [b"torchrun", b"x.py"]
    assert len(list(site.root.glob("containers/*.sif"))) == 1  # a view copies nothing
    # uninstalling a module drops it from its views; remove and delete work
    site.cli("uninstall", "python:3.12", check=True)
    names = [e["name"] for e in json.loads(site.cli("view", "list", "course", "--json", check=True).stdout)]
    assert names == ["torch"]
    site.cli("view", "remove", "course", "torch", check=True)
    site.cli("view", "delete", "course", check=True)
    assert json.loads(site.cli("view", "list", "--json", check=True).stdout) == []
    bad = site.cli("view", "add", "nosuchview", "pytorch")
    assert bad.returncode == 1 and "no view named 'nosuchview'" in bad.stderr


def test_doctor_reports_problems_with_fixes(site):
    proc = site.cli("doctor", "--offline", "--json")
    findings = {f["check"]: f for f in json.loads(proc.stdout)}
    assert findings["runtime"]["level"] == "ok"  # the stand-in `singularity` is on PATH
    assert findings["MODULEPATH"]["level"] == "warn"
    assert f"module use {site.root / 'modules'}" in findings["MODULEPATH"]["fix"]
    missing = site.cli("--runtime", "no-such-runtime", "doctor", "--offline")
    assert missing.returncode == 1
    assert "'no-such-runtime' is not on PATH" in missing.stdout and "fix:" in missing.stdout
    ok = site.cli("doctor", "--offline", extra_env={"MODULEPATH": str(site.root / "modules")})
    assert "[   ok] MODULEPATH" in ok.stdout
