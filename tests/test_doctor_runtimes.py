"""``doctor`` checks what the configured runtime kind needs, each finding with its fix: through
the CLI with PATH pointing at directories that have (or lack) the tools, and the kernel and
/etc files pointed at test copies."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from shpc_lite import doctor
from tests.needs import requires


def _findings(site, bindir: Path, *flags: str) -> dict[str, dict]:
    proc = site.cli(*flags, "doctor", "--offline", "--json", extra_env={"PATH": str(bindir)})
    return {f["check"]: f for f in json.loads(proc.stdout)}


def _bin(tmp_path: Path, name: str, **tools: str) -> Path:
    """A directory holding only ``tools`` (name -> sh script body, or a real program's path)."""
    directory = tmp_path / name
    directory.mkdir()
    for tool, body in tools.items():
        if body.startswith("/"):
            os.symlink(body, directory / tool)
        else:
            (directory / tool).write_text("#!/bin/sh\n" + body + "\n")
            (directory / tool).chmod(0o755)
    return directory


def test_charliecloud_without_its_tools(site, tmp_path):
    found = _findings(site, _bin(tmp_path, "empty"), "--runtime", "ch-run")
    assert found["runtime kind"]["level"] == "ok" and found["runtime kind"]["detail"].startswith("charliecloud")
    assert found["runtime"]["level"] == "error" and "charliecloud-runtime" in found["runtime"]["fix"]
    for tool, fix in (("squashfuse", "apt-get install squashfuse"), ("fusermount3", "apt-get install fuse3"),
                      ("flock", "util-linux"), ("setsid", "util-linux")):
        assert found[tool]["level"] == "error" and fix in found[tool]["fix"], found[tool]
    assert "fusermount3 or fusermount" in found["fusermount3"]["detail"]


@requires(all(shutil.which(t) for t in ("ch-run", "squashfuse", "fusermount3", "flock")),
          reason="Charliecloud, squashfuse, fuse3 or flock not installed (scripts/test.sh installs them)")
def test_charliecloud_with_its_tools(site, tmp_path):
    tools = {t: shutil.which(t) for t in ("ch-run", "squashfuse", "fusermount3", "flock", "setsid")}
    found = _findings(site, _bin(tmp_path, "full", **tools), "--runtime-kind", "charliecloud", "--runtime", "ch-run")
    for check in ("runtime", "squashfuse", "fusermount3", "flock", "setsid"):
        assert found[check]["level"] == "ok", found[check]
    assert found["fuse device"]["level"] == ("ok" if os.access("/dev/fuse", os.R_OK | os.W_OK) else "error")
    assert found["user namespaces"]["check"] == "user namespaces"


def test_podman_storage_failure_is_reported_with_podmans_words(site, tmp_path):
    bindir = _bin(tmp_path, "pm", podman='[ "$1" = info ] && { echo "Error: database is locked" >&2; exit 125; }')
    found = _findings(site, bindir, "--runtime", "podman")
    assert found["runtime"]["level"] == "ok"
    assert found["podman storage"] == {
        "level": "error", "check": "podman storage", "detail": "podman info failed: Error: database is locked",
        "fix": found["podman storage"]["fix"]}
    assert "storage.conf" in found["podman storage"]["fix"]


def test_podman_missing_says_how_to_install_it(site, tmp_path):
    found = _findings(site, _bin(tmp_path, "empty"), "--runtime-kind", "podman", "--runtime", "podman")
    assert found["runtime"]["level"] == "error" and "install podman" in found["runtime"]["fix"]
    assert "podman storage" not in found


@requires(shutil.which("podman"), reason="podman not installed (scripts/test.sh installs it)")
def test_real_podman_info_works(site, tmp_path):
    found = _findings(site, _bin(tmp_path, "real", podman=shutil.which("podman")), "--runtime", "podman")
    assert found["podman storage"]["level"] == "ok", found["podman storage"]


@pytest.mark.parametrize("have_shifterimg", [False, True])
def test_shifter_needs_shifterimg(site, tmp_path, have_shifterimg):
    tools = {"shifter": "exit 0", **({"shifterimg": "exit 0"} if have_shifterimg else {})}
    found = _findings(site, _bin(tmp_path, "sh", **tools), "--runtime", "shifter")
    assert found["runtime"]["level"] == "ok"
    assert found["shifterimg"]["level"] == ("ok" if have_shifterimg else "error")
    if not have_shifterimg:
        assert "shifter module" in found["shifterimg"]["fix"]


def test_a_runtime_of_no_known_kind(site, tmp_path):
    proc = site.cli("--runtime", "no-such-runtime", "doctor", "--offline", "--json")
    found = {f["check"]: f for f in json.loads(proc.stdout)}
    assert proc.returncode == 1
    assert found["runtime kind"]["level"] == "error" and "runtime_kind" in found["runtime kind"]["fix"]


@pytest.mark.parametrize("limit, clone, level, says", [
    ("15000", "1", "ok", "max 15000"),
    ("15000", None, "ok", "max 15000"),
    ("0", "1", "error", "max_user_namespaces is 0"),
    ("15000", "0", "error", "unprivileged_userns_clone is 0"),
    (None, None, "warn", "cannot read"),
])
def test_user_namespaces(tmp_path, monkeypatch, limit, clone, level, says):
    for name, value in (("USERNS_MAX", limit), ("USERNS_CLONE", clone)):
        path = tmp_path / getattr(doctor, name).name
        if value is not None:
            path.write_text(value + "\n")
        monkeypatch.setattr(doctor, name, path)
    finding = doctor.check_userns()
    assert finding.level == level and says in finding.detail
    assert (finding.fix != "") == (level != "ok")


def test_subordinate_ids_for_rootless_podman(tmp_path, monkeypatch):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("someone:100000:65536\n54321:165536:65536\n")
    subgid.write_text("someone:100000:65536\n")
    monkeypatch.setattr(doctor, "SUBID_FILES", (subuid, subgid))
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 54321)  # no passwd entry: matched by uid
    found = {f.check: f for f in doctor.check_subids()}
    assert found["subuid"].level == "ok"
    assert found["subgid"].level == "error" and "usermod --add-subuids" in found["subgid"].fix
