"""resolve and check against a real docker-registry (tests/registry_fixture.py)."""

from __future__ import annotations

import json
import re

import pytest

from shpc_lite.cli.main import main
from shpc_lite.lock import read_lock
from shpc_lite.recipe import recipe_from_dict
from shpc_lite.resolve import check, resolve
from tests.imagetools import make_image, make_layer

PYTHON_TAGS = ["3.10-bookworm", "3.11-bookworm", "3.12-bookworm", "3.12-slim", "3.13-rc-bookworm",
               "3.13.0a4-bookworm", "latest"]
TORCH_TAGS = ["2.8.0-cuda12.8-cudnn9-runtime", "2.8.0-cuda12.9-cudnn9-runtime", "2.9.0-cuda13.0-cudnn9-runtime",
              "2.9.1-cuda12.6-cudnn9-runtime", "2.9.1-cuda12.8-cudnn9-runtime", "2.9.1-cuda12.8-cudnn9-devel",
              "sha256-" + "5" * 64 + ".sig", "latest"]


def image_for(tag: str, salt: str = ""):
    return make_image([make_layer({"tag": tag + salt}, compression=None)])


def push_tags(pusher, repo: str, tags, salt: str = "") -> dict[str, str]:
    return {tag: pusher.push_image(repo, image_for(tag, salt), tags=[tag]) for tag in tags}


def python_recipe(image: str, pins: str = "") -> str:
    return f"""name: python
image: {image}
description: Python for tests
versions:
  "3.11": {pins or "3.11-bookworm"}
select:
  pattern: '^(?P<version>3\\.\\d+)-bookworm$'
  versions: ">=3.11"
  newest: 3
aliases:
  python: python
"""


def torch_recipe(image: str) -> str:
    return f"""name: pytorch
image: {image}
description: PyTorch for tests
select:
  pattern: '^(?P<version>\\d+\\.\\d+\\.\\d+)-cuda(?P<cuda>12\\.\\d+)-cudnn(?P<cudnn>\\d+)-runtime$'
  newest: 2
"""


@pytest.fixture
def site(tmp_path, monkeypatch, registry, request):
    """A module root, an empty config, and a recipe directory with python and pytorch."""
    monkeypatch.setenv("SHPC_LITE_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("SHPC_LITE_SYSTEM_CONFIG", str(tmp_path / "none.yaml"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "home" / ".docker"))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    base = "test/" + request.node.name.lower().replace("_", "-")[:40]
    pusher = registry.pusher()
    py_repo, torch_repo = f"{base}/python", f"{base}/pytorch"
    digests = {"python": push_tags(pusher, py_repo, PYTHON_TAGS), "pytorch": push_tags(pusher, torch_repo, TORCH_TAGS)}
    (recipes / "python.yaml").write_text(python_recipe(f"{registry.host}/{py_repo}"))
    (recipes / "pytorch.yaml").write_text(torch_recipe(f"{registry.host}/{torch_repo}"))

    class Site:
        pass

    s = Site()
    s.root, s.recipes, s.registry, s.pusher, s.digests = tmp_path / "root", recipes, registry, pusher, digests
    s.repos = {"python": py_repo, "pytorch": torch_repo}
    s.lock = tmp_path / "root" / "shpc-lite.lock"
    return s


def cli(site, capsys, *argv):
    code = main(["--registry", str(site.recipes), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_resolve_json_and_lock(site, capsys):
    code, out, err = cli(site, capsys, "resolve", "python", "pytorch", "--json")
    assert code == 0, err
    data = json.loads(out)
    py, torch = site.digests["python"], site.digests["pytorch"]
    assert data == {
        "python": {
            "image": f"{site.registry.host}/{site.repos['python']}",
            "versions": [
                {"version": "3.12", "tag": "3.12-bookworm", "digest": py["3.12-bookworm"], "pinned": False},
                {"version": "3.11", "tag": "3.11-bookworm", "digest": py["3.11-bookworm"], "pinned": True},
            ],
            "warnings": [],
        },
        "pytorch": {
            "image": f"{site.registry.host}/{site.repos['pytorch']}",
            "versions": [
                {"version": "2.9.1", "tag": "2.9.1-cuda12.8-cudnn9-runtime",
                 "digest": torch["2.9.1-cuda12.8-cudnn9-runtime"], "pinned": False},
                {"version": "2.8.0", "tag": "2.8.0-cuda12.9-cudnn9-runtime",
                 "digest": torch["2.8.0-cuda12.9-cudnn9-runtime"], "pinned": False},
            ],
            "warnings": [],
        },
    }
    lock = read_lock(site.lock)
    assert lock.names() == ["python", "pytorch"]
    assert [(v.version, v.tag, v.digest) for v in lock.get("python").versions] == [
        ("3.12", "3.12-bookworm", py["3.12-bookworm"]), ("3.11", "3.11-bookworm", py["3.11-bookworm"])]

    # Up to date: exit 0. Resolving again changes nothing in the lock (resolved_at kept).
    before = site.lock.read_text()
    code, out, err = cli(site, capsys, "check")
    assert code == 0, err
    assert "4 up-to-date" in out
    assert cli(site, capsys, "resolve", "python")[0] == 0
    assert site.lock.read_text() == before


def test_check_reports_repushed_tag_and_newer_version(site, capsys):
    assert cli(site, capsys, "resolve", "python")[0] == 0
    old = site.digests["python"]["3.12-bookworm"]
    new = push_tags(site.pusher, site.repos["python"], ["3.12-bookworm"], salt="-rebuilt")["3.12-bookworm"]
    assert new != old
    code, out, err = cli(site, capsys, "check", "python", "--json")
    assert code == 100, err
    report = json.loads(out)
    assert report["out_of_date"] is True and report["errors"] == []
    repushed = [f for f in report["findings"] if f["kind"] == "repushed"]
    assert repushed == [{"name": "python", "version": "3.12", "kind": "repushed", "source": "lock",
                         "tag": "3.12-bookworm", "recorded": old, "current": new, "detail": None}]

    push_tags(site.pusher, site.repos["python"], ["3.13-bookworm"])
    code, out, err = cli(site, capsys, "check")
    assert code == 100
    assert f"python 3.12 (lock): tag 3.12-bookworm was re-pushed: {old} -> {new}" in out
    assert "python 3.13: newer version available, tag 3.13-bookworm (newer than 3.12 (lock))" in out

    # After resolving again the lock follows the registry and check is content.
    assert cli(site, capsys, "resolve", "python")[0] == 0
    assert cli(site, capsys, "check")[0] == 0


def test_check_compares_installed_records(site, capsys):
    """An installed module's record (install.json beside its wrappers) is compared by HEAD."""
    from dataclasses import asdict

    from shpc_lite.modules import Installed

    old = site.digests["pytorch"]["2.9.1-cuda12.8-cudnn9-runtime"]
    record = Installed(name="pytorch", version="2.9.1", image=f"{site.registry.host}/{site.repos['pytorch']}",
                       tag="2.9.1-cuda12.8-cudnn9-runtime", digest=old, sif="/x.sif", module_system="lmod",
                       modulefile="/x.lua")
    meta = site.root / "wrappers" / "pytorch" / "2.9.1" / "install.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps(asdict(record)))
    code, out, err = cli(site, capsys, "check", "pytorch")
    assert code == 0, out + err
    assert "pytorch 2.9.1 (installed): up to date" in out
    new = push_tags(site.pusher, site.repos["pytorch"], ["2.9.1-cuda12.8-cudnn9-runtime"], salt="x")
    code, out, err = cli(site, capsys, "check", "pytorch")
    assert code == 100
    assert f"re-pushed: {old} -> {new['2.9.1-cuda12.8-cudnn9-runtime']}" in out


def test_missing_image_is_one_clear_line_and_no_partial_lock(site, capsys, registry):
    (site.recipes / "ghost.yaml").write_text(
        f"name: ghost\nimage: {registry.host}/test/does-not-exist\ndescription: x\nselect:\n"
        "  pattern: '(?P<version>\\d+)'\n"
    )
    assert cli(site, capsys, "resolve", "python")[0] == 0
    before = site.lock.read_text()
    code, out, err = cli(site, capsys, "resolve", "pytorch", "ghost")
    assert code == 1
    lines = err.strip().splitlines()
    ghost = [line for line in lines if "ghost" in line]
    assert len(ghost) == 1 and ghost[0].startswith("shpc-lite: error: ghost: ")
    assert "not found" in ghost[0] and "test/does-not-exist" in ghost[0]
    assert lines[-1] == f"shpc-lite: lock not written: 1 of 2 recipes failed ({site.lock} is unchanged)"
    assert "pytorch (" in out  # the others were still resolved and shown
    assert site.lock.read_text() == before
    assert not [p for p in site.root.iterdir() if p.name.startswith(".shpc-lite-tmp")]


def test_unknown_recipe_and_bad_rule_fail_alone(site, capsys):
    (site.recipes / "norule.yaml").write_text(
        "name: norule\nimage: 127.0.0.1:1/x\ndescription: x\nselect:\n  pattern: '(\\d+)'\n"
    )
    code, out, err = cli(site, capsys, "resolve", "python", "norule", "nosuch", "--dry-run")
    assert code == 1
    assert "shpc-lite: error: norule: select.pattern: needs a named group 'version'" in err
    assert "shpc-lite: error: unknown recipe 'nosuch'" in err
    assert not site.lock.exists()


def test_pinned_digest_is_kept_and_drift_reported(site, capsys):
    pinned = "sha256:" + "7" * 64
    text = python_recipe(f"{site.registry.host}/{site.repos['python']}", pins="{tag: 3.11-bookworm, digest: %s}" % pinned)
    (site.recipes / "python.yaml").write_text(text)
    code, out, err = cli(site, capsys, "resolve", "python")
    assert code == 0
    actual = site.digests["python"]["3.11-bookworm"]
    assert f"warning: python 3.11: pinned tag 3.11-bookworm is now {actual} in the registry, not the pinned {pinned}" in err
    assert read_lock(site.lock).get("python").version("3.11").digest == pinned


def test_explain_and_dry_run(site, capsys):
    code, out, err = cli(site, capsys, "resolve", "pytorch", "--explain", "--dry-run")
    assert code == 0, err
    assert "+ 2.9.1-cuda12.8-cudnn9-runtime" in out
    assert re.search(r"- 2\.9\.1-cuda12\.6-cudnn9-runtime +2\.9\.1-cuda12\.8-cudnn9-runtime is preferred for module "
                     r"version 2\.9\.1\n", out), out
    assert f"- sha256-{'5' * 64}.sig" in out and "signature/attestation tag" in out
    assert "- latest" in out
    assert "dry run:" in out and not site.lock.exists()
    code, out, _ = cli(site, capsys, "resolve", "pytorch", "--explain", "--json", "--dry-run")
    tags = json.loads(out)["pytorch"]["tags"]
    assert {t["tag"] for t in tags} == set(TORCH_TAGS)


def test_requests_one_walk_per_repository_one_head_per_tag(site, registry_token):
    """Over Bearer auth: one token per scope, one tag list per repository, one HEAD per chosen tag."""
    pusher = registry_token.pusher()
    repo = site.repos["pytorch"].replace("test/", "tok/")
    push_tags(pusher, repo, TORCH_TAGS)
    push_tags(pusher, repo + "-py", PYTHON_TAGS)
    image = f"{registry_token.host}/{repo}"
    recipes = [
        recipe_from_dict({"name": "pytorch", "image": image, "description": "x",
                          "versions": {"2.9.1": "2.9.1-cuda12.8-cudnn9-runtime"},
                          "select": {"pattern": r"(?P<version>\d+\.\d+\.\d+)-cuda(?P<cuda>12\.\d+)-cudnn9-runtime"}}, "t"),
        recipe_from_dict({"name": "torch-again", "image": image, "description": "x",
                          "select": {"pattern": r"(?P<version>\d+\.\d+\.\d+)-cuda(?P<c>12\.\d+)-cudnn9-runtime", "newest": 1}}, "t"),
        recipe_from_dict({"name": "python", "image": image + "-py", "description": "x",
                          "select": {"pattern": r"(?P<version>3\.\d+)-bookworm", "newest": 2}}, "t"),
    ]
    registry_token.token_server.reset()
    client = registry_token.client()
    result = resolve(recipes, client, jobs=4)
    assert result.ok, result.failures
    assert [(r.name, [v.version for v in r.versions]) for r in result.recipes] == [
        ("python", ["3.12", "3.11"]), ("pytorch", ["2.9.1", "2.8.0"]), ("torch-again", ["2.9.1"])]
    stats = client.stats.snapshot()
    assert stats["tags"] == 2  # two repositories
    assert stats["manifest_head"] == 4  # 2.9.1 (shared by all three uses), 2.8.0, 3.12, 3.11
    assert stats["manifest_get"] == 0 and stats["blob"] == 0
    scopes = [s for r in registry_token.token_server.requests for s in r.scopes]
    assert sorted(scopes) == sorted({f"repository:{repo}:pull", f"repository:{repo}-py:pull"})

    # check asks HEAD only (plus one tag list per repository with a select rule).
    from shpc_lite.lock import Lock

    lock = Lock(tuple(result.locked()))
    client.stats.reset()
    report = check({r.name: r for r in recipes}, [], lock, client)
    assert not report.out_of_date and not report.failures
    stats = client.stats.snapshot()
    assert stats["manifest_head"] == 4 and stats["tags"] == 2 and stats["manifest_get"] == 0


def test_unparsable_image_fails_only_its_recipe(site, capsys):
    (site.recipes / "badref.yaml").write_text(
        "name: badref\nimage: 127.0.0.1:5000//x\ndescription: x\nversions:\n  '1': '1'\n"
    )
    code, out, err = cli(site, capsys, "resolve", "python", "badref", "--json")
    assert code == 1
    data = json.loads(out)
    assert "invalid image reference" in data["badref"]["error"] and data["python"]["versions"]
    assert not site.lock.exists()
