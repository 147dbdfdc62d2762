"""Untrusted YAML (recipes, manifests, config) cannot crash or hang the process (issue 9)."""

from __future__ import annotations

import pytest

from shpc_lite.yamlio import MAX_DEPTH, YamlRefused, load


@pytest.mark.parametrize("text", [
    "[" * 200_000 + "]" * 200_000,  # libyaml's loader segfaults on this
    "a:\n" + "".join(" " * i + "- \n" for i in range(1, MAX_DEPTH + 5)),
    "- " * (MAX_DEPTH + 2) + "x\n",
])
def test_deep_documents_are_refused(text: str) -> None:
    with pytest.raises(YamlRefused, match="nested too deeply"):
        load(text)


def test_aliases_are_refused_with_their_line() -> None:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
    with pytest.raises(YamlRefused, match="aliases") as info:
        load(laughs)
    assert info.value.line == 2
    with pytest.raises(YamlRefused, match="aliases"):
        load("a: &a [*a]\n")  # a list that contains itself


def test_ordinary_documents_load() -> None:
    assert load("name: x\nversions: {'1.0': {tag: '1.0'}}\n") == {"name": "x", "versions": {"1.0": {"tag": "1.0"}}}
    assert load("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None


def test_a_deep_recipe_is_one_line_not_a_crash(site) -> None:
    site.write_recipe("deep", "name: deep\nimage: x\ndescription: " + "[" * 200_000 + "]" * 200_000 + "\n")
    proc = site.cli("list", "--available")
    assert proc.returncode != -11, "segmentation fault"
    assert "deep.yaml" in proc.stderr and "nested too deeply" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
