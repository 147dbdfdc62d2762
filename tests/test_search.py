"""Issue 12, ``shpc-lite search``: recipes and installed modules, one line each saying why."""

from __future__ import annotations

import json

from shpc_lite.modules import Installed
from shpc_lite.recipe import Alias, Recipe
from shpc_lite.search import Match, search

RECIPES = [
    Recipe("pytorch", "docker.io/pytorch/pytorch", "d", keywords=("ml", "GPU"),
           aliases=(Alias("torchrun", ("torchrun",)),)),
    Recipe("python", "docker.io/library/python", "d", aliases=(Alias("pip", ("pip",)),)),
]
RECORDS = [
    Installed("pytorch", "2.2.1", "i", "t", "", "/s.sif", "lmod", "/m", commands=("torchrun",),
              packages=("numpy/1.26.4", "torch/2.2.1")),
    Installed("python", "3.12", "i", "t", "", "/s.sif", "lmod", "/m", commands=("pip",), packages=("pip/24.0",)),
]


def test_search_says_why_each_matched():
    assert search("TORCH", RECIPES, RECORDS) == [
        Match("recipe", "pytorch", "name", "pytorch"),
        Match("module", "pytorch/2.2.1", "name", "pytorch"),
    ]
    assert search("numpy", RECIPES, RECORDS) == [Match("module", "pytorch/2.2.1", "package", "numpy/1.26.4")]
    assert search("gpu", RECIPES, RECORDS) == [Match("recipe", "pytorch", "keyword", "GPU"),
                                               Match("module", "pytorch/2.2.1", "keyword", "GPU")]
    assert [m.why for m in search("pip", RECIPES, RECORDS)] == ["alias", "alias"]
    assert search("tensorflow", RECIPES, RECORDS) == []
    generated = Installed("box", "1", "i", "t", "", "/s.sif", "lmod", "/m", commands=("box-shell", "box-run"))
    assert search("shell", [], [generated]) == []  # every module has one: not a reason


def test_search_cli(site):
    site.write_recipe("mlbox", "name: mlbox\nimage: docker.io/library/mlbox\ndescription: d\n"
                      "keywords: [deeplearning]\nversions:\n  '1.0': '1.0'\naliases:\n  mytool: /bin/mytool\n")
    proc = site.cli("search", "DeepLearn", check=True)
    assert "recipe  mlbox" in proc.stdout and "keyword: deeplearning" in proc.stdout
    data = json.loads(site.cli("search", "mytool", "--json", check=True).stdout)
    assert {"kind": "recipe", "name": "mlbox", "why": "alias", "value": "mytool"} in data
    missing = site.cli("search", "no-such-thing")
    assert missing.returncode == 1 and missing.stdout == "" and missing.stderr == ""
