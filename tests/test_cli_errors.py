"""Bad input: one clear line naming the problem, a non-zero exit, and nothing written."""

from __future__ import annotations

import pytest

GOOD = "name: {name}\nimage: docker.io/library/demo\ndescription: demo\nversions:\n  '1.0': '1.0'\n"

CASES = {
    "malformed-yaml": ("name: bad\nimage: [unclosed\n", "malformed YAML"),
    "unknown-field": (GOOD + "colour: red\n", "unknown field 'colour'"),
    "missing-field": ("name: {name}\nimage: docker.io/library/demo\nversions:\n  '1.0': '1.0'\n",
                      "missing field 'description'"),
    "unsafe-alias": (GOOD + "aliases:\n  'py;rm -rf ~': python\n", "unsafe alias name"),
    "unsafe-alias-slash": (GOOD + "aliases:\n  ../evil: python\n", "unsafe alias name"),
    "bad-gpu": (GOOD + "features:\n  gpu: intel\n", "features.gpu: 'intel' is not one of nvidia, amd, none"),
    "no-versions": ("name: {name}\nimage: docker.io/library/demo\ndescription: d\n", "missing field 'versions'"),
    "bad-select-regex": (GOOD + "select:\n  pattern: '(unclosed'\n", "select.pattern"),
    "wrong-name": ("name: other\nimage: docker.io/library/demo\ndescription: d\nversions:\n  '1.0': '1.0'\n",
                   "does not match the file name"),
}


def _assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_recipe(site, small_sif, case):
    text, message = CASES[case]
    path = site.write_recipe(case, text.format(name=case))
    proc = site.cli("install", f"{case}:1.0", "--sif", str(small_sif))
    _assert_one_line_error(proc, str(path), message)
    assert site.files() == set()


def test_not_a_sif(site, tmp_path):
    fake = tmp_path / "fake.sif"
    fake.write_text("#!/bin/sh\necho not an image\n")
    proc = site.cli("install", "python:3.11", "--sif", str(fake))
    _assert_one_line_error(proc, str(fake), "not a SIF")
    assert not (site.root / "modules").exists() and not list(site.root.rglob("*.sif"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuchrecipe:1.0", "unknown recipe 'nosuchrecipe'"),
        ("python:9.99", "unknown version '9.99'"),
        ("python:$(id)", "invalid version '$(id)'"),
        ("../python:3.11", "invalid module name"),
    ],
)
def test_unknown_or_unsafe_spec(site, small_sif, spec, message):
    proc = site.cli("install", spec, "--sif", str(small_sif))
    _assert_one_line_error(proc, message)
    assert site.files() == set()


def test_missing_sif_file(site, tmp_path):
    proc = site.cli("install", "python:3.11", "--sif", str(tmp_path / "nope.sif"))
    _assert_one_line_error(proc, "nope.sif")


def test_uninstall_unknown(site):
    _assert_one_line_error(site.cli("uninstall", "python:3.11"), "python:3.11 is not installed")


def test_one_broken_recipe_does_not_hide_the_others(site):
    site.write_recipe("broken", "name: broken\nimage: [\n")
    proc = site.cli("list", "--available")
    assert proc.returncode != 0
    assert "broken.yaml" in proc.stderr
    for name in ("python", "pytorch", "tensorflow", "ngc-pytorch", "ngc-tensorflow"):
        assert name in proc.stdout


def test_show_json_has_versions(site, small_sif):
    import json

    site.cli("install", "python:3.11", "--sif", str(small_sif), check=True)
    info = json.loads(site.cli("show", "python", "--json", check=True).stdout)
    versions = {v["version"]: v for v in info["versions"]}
    assert versions["3.11"]["installed"] and not versions["3.12"]["installed"]
    assert versions["3.11"]["tag"] == "3.11-bookworm"
    listed = json.loads(site.cli("list", "--json", check=True).stdout)
    assert [(r["name"], r["version"]) for r in listed] == [("python", "3.11")]
