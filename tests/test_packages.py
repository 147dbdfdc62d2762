"""Issue 12, packages: found in the image's directory table at install, declared to Lmod as
extensions (``module spider torch``), to Environment Modules in whatis; recipe keywords in whatis.
"""

from __future__ import annotations

import json
import shutil

import pytest

from shpc_lite.errors import RecipeError
from shpc_lite.imagetree import Entry, parse_line
from shpc_lite.packages import MAX_PACKAGES, Package, find_packages, package_from_path
from shpc_lite.recipe import recipe_from_dict
from tests import imagetools as it
from tests.modsys import run_bash
from tests.needs import need_system, requires

SP = "/usr/lib/python3/dist-packages"


@pytest.mark.parametrize("path, expected", [
    (f"{SP}/torch-2.2.1.dist-info", Package("torch", "2.2.1")),
    ("/opt/conda/lib/python3.11/site-packages/Foo_Bar.baz-1.0rc1.dist-info", Package("foo-bar-baz", "1.0rc1")),
    (f"{SP}/six-1.16.0-py3.11.egg-info", Package("six", "1.16.0")),
    ("/opt/conda/conda-meta/numpy-1.26.4-py311h64a7726_0.json", Package("numpy", "1.26.4", "conda")),
    ("/opt/conda/conda-meta/_libgcc_mutex-0.1-main.json", None),  # a name starting with _ normalises to -
    (f"{SP}/torch-2.2.1.dist-info/METADATA", None),
    (f"{SP}/nested/x-1.dist-info", None),
    (f"{SP}/noversion.egg-info", None),
    (f"{SP}/evil-1\");os.exit()--.dist-info", None),
    (f"{SP}/evil-1.0 x.dist-info", None),
    (f"{SP}/{'a' * 101}-1.0.dist-info", None),
    (f"{SP}/a-{'1' * 65}.dist-info", None),
    ("/opt/conda/conda-meta/history", None),
])
def test_package_from_path(path, expected):
    assert package_from_path(path) == expected


def test_find_packages_is_sorted_distinct_and_bounded():
    paths = [f"{SP}/torch-2.2.1.dist-info", f"{SP}/numpy-1.26.4.dist-info", f"/usr/lib/py/site-packages/torch-2.2.1.dist-info"]
    assert [p.spec for p in find_packages(paths)] == ["numpy/1.26.4", "torch/2.2.1"]
    many = (f"{SP}/p{i}-1.0.dist-info" for i in range(MAX_PACKAGES * 2))
    assert len(find_packages(many)) == MAX_PACKAGES


@pytest.mark.parametrize("line, expected", [
    ("drwxr-xr-x 0/0 26 2026-11-30 02:31 squashfs-root", None),
    ("-rwxr-xr-x 0/0 2 2026-11-30 02:31 squashfs-root/usr/bin/tool", Entry("/usr/bin/tool", "f", True)),
    ("-rw-r--r-- 0/0 0 2026-11-30 02:31 squashfs-root/usr/bin/we ird", Entry("/usr/bin/we ird", "f", False)),
    ("lrwxrwxrwx 0/0 5 2026-11-30 02:31 squashfs-root/usr/bin/python -> python3.11",
     Entry("/usr/bin/python", "l", target="python3.11")),
    ("crw-r--r-- 0/0 1,  3 2026-11-30 02:31 squashfs-root/dev/null", Entry("/dev/null", "o")),
    ("second line of a name with a newline", None),
])
def test_parse_listing_line(line, expected):
    assert parse_line(line) == expected


def test_keywords_are_validated():
    base = {"name": "x", "image": "docker.io/library/x", "description": "d", "versions": {"1": "1"}}
    assert recipe_from_dict({**base, "keywords": ["gpu", "ml"]}, "x.yaml").keywords == ("gpu", "ml")
    for bad in (["gpu\n"], ["a b"], ['"); os.exit() --'], "gpu", ["x"] * 2):
        with pytest.raises(RecipeError, match="keywords"):
            recipe_from_dict({**base, "keywords": bad}, "x.yaml")


def _image():
    base = it.make_layer([it.Dir("usr"), it.Dir("usr/bin"), it.File("usr/bin/python3.11", "#!\n", 0o755)])
    top = it.make_layer([
        it.Dir("usr/lib"), it.Dir("usr/lib/python3"), it.Dir("usr/lib/python3/dist-packages"),
        it.Dir(f"{SP[1:]}/torch-2.2.1.dist-info"), it.File(f"{SP[1:]}/torch-2.2.1.dist-info/METADATA", "Name: torch\n"),
        it.Dir(f"{SP[1:]}/numpy-1.26.4.dist-info"),
        it.Dir(f"{SP[1:]}/bad name-1.0.dist-info"),
        it.Dir("opt"), it.Dir("opt/conda"), it.Dir("opt/conda/conda-meta"),
        it.File("opt/conda/conda-meta/zlib-1.2.13-h5eee18b_0.json", "{}"),
    ])
    return it.make_image([base, top], env=["PATH=/usr/bin:/bin"])


@requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed")
def test_spider_and_keyword_find_installed_packages(site, registry, unique_repo, tmp_path):
    need_system("lmod")
    need_system("tcl")
    registry.pusher().push_image(unique_repo, _image(), tags=["1.0"])
    site.write_recipe("mlbox", f"name: mlbox\nimage: {registry.host}/{unique_repo}\ndescription: test image\n"
                      "keywords: [deeplearning, gpu]\nversions:\n  '1.0': '1.0'\n")
    site.cli("install", "mlbox:1.0", check=True)
    record = json.loads((site.root / "wrappers/mlbox/1.0/install.json").read_text())
    assert record["packages"] == ["numpy/1.26.4", "torch/2.2.1", "zlib/1.2.13"]
    modules = site.root / "modules"
    script = (f"module use {modules}\nmodule spider torch\nmodule spider numpy\nmodule keyword deeplearning\n"
              "module spider zlib\n")
    res = run_bash("lmod", script, site.env)
    out = (res.stdout + res.stderr).decode()
    assert res.returncode == 0, out
    assert out.count("mlbox/1.0") >= 4, out  # each search names the module
    assert "torch: torch/2.2.1" in out and "numpy: numpy/1.26.4" in out, out
    # shpc-lite search finds the module by a package of its image
    assert "module  mlbox/1.0" in site.cli("search", "NumPy", check=True).stdout
    # the cap: none declared, the record keeps them
    site.cli("--set", "package_cap=0", "install", "mlbox:1.0", check=True)
    assert "extensions(" not in (modules / "mlbox/1.0.lua").read_text()
    # Environment Modules: whatis shows packages and keywords
    tcl_root = tmp_path / "tcl-root"
    site.cli("--module-system", "tcl", "install", "mlbox:1.0", check=True, extra_env={"SHPC_LITE_ROOT": str(tcl_root)})
    res = run_bash("tcl", f"module use {tcl_root}/modules\nmodule whatis mlbox\n", site.env)
    out = (res.stdout + res.stderr).decode()
    assert "Packages: numpy/1.26.4 torch/2.2.1 zlib/1.2.13" in out, out
    assert "Keywords: deeplearning, gpu" in out, out


@requires(shutil.which("unsquashfs"), reason="squashfs-tools not installed")
def test_listing_a_damaged_sif_is_one_error(small_sif, tmp_path):
    from shpc_lite.errors import SifError
    from shpc_lite.imagetree import list_sif
    from shpc_lite.sif import partition_offset, read_sif

    assert "/hello.txt" in {e.path for e in list_sif(small_sif)}
    bad = tmp_path / "bad.sif"
    data = bytearray(small_sif.read_bytes())
    offset = partition_offset(read_sif(str(small_sif)))
    data[offset:offset + 96] = b"\xff" * 96  # the squashfs superblock
    bad.write_bytes(bytes(data))
    with pytest.raises(SifError, match="unsquashfs cannot list the image") as err:
        list(list_sif(bad))
    assert "\n" not in str(err.value)


def test_hundreds_of_packages_load_and_spider_in_lmod(tmp_path):
    """Past ~250 arguments a Lua call fails to compile: the cap (500) must still load."""
    need_system("lmod")
    from shpc_lite.config import load_config
    from shpc_lite.module_systems import LMOD
    from shpc_lite.modules import make_spec, render_modulefile
    from shpc_lite.recipe import RecipeIndex
    from shpc_lite.resources import builtin_registry

    config = load_config({"root": str(tmp_path)}, environ={})
    recipe = RecipeIndex([builtin_registry()]).get("python")
    packages = tuple(Package(f"pkg{i:03d}", "1.0") for i in range(600))
    spec = make_spec(recipe, "3.12", "t", "", tmp_path / "a.sif", config.layout, config, packages=packages)
    (tmp_path / "modules/python").mkdir(parents=True)
    (tmp_path / "modules/python/3.12.lua").write_text(render_modulefile(spec, LMOD))
    res = run_bash("lmod", f"module use {tmp_path}/modules\nmodule load python\nmodule spider pkg499\n", {})
    out = (res.stdout + res.stderr).decode()
    assert res.returncode == 0 and "error" not in out.lower(), out
    assert "pkg499: pkg499/1.0" in out and "python/3.12" in out, out
    res = run_bash("lmod", f"module use {tmp_path}/modules\nmodule spider pkg500\n", {})
    assert 'Unable to find: "pkg500"' in (res.stdout + res.stderr).decode()  # past the cap
