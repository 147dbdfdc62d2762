"""Issue 12, ``shpc-lite discover``: commands on an image's PATH from its file tree alone."""

from __future__ import annotations

import json
import shutil

import yaml

from shpc_lite.discover import Command, add_aliases, commands, explore, propose, read_tree, resolve
from shpc_lite.imagetree import Entry
from tests import imagetools as it
from tests.needs import requires

COREUTILS = ("ls", "cat", "cp", "sh")


def _base_entries():
    return [it.Dir("usr"), it.Dir("usr/bin"), it.Dir("usr/local"), it.Dir("usr/local/bin"),
            it.Symlink("bin", "usr/bin"), *(it.File(f"usr/bin/{n}", "#!\n", 0o755) for n in COREUTILS),
            it.File("usr/bin/README", "not a command\n", 0o644)]


def _top_entries():
    return [it.File("usr/local/bin/mytool", "#!\n", 0o755), it.File("usr/bin/python3.11", "#!\n", 0o755),
            it.Symlink("usr/bin/python", "python3.11"), it.Symlink("usr/local/bin/loop-a", "loop-b"),
            it.Symlink("usr/local/bin/loop-b", "loop-a"), it.Symlink("usr/local/bin/dangling", "/nowhere/x"),
            it.Symlink("usr/local/bin/up", "../../../../usr/bin/cat")]


def test_resolve_inside_the_image():
    links = {"/bin": "usr/bin", "/usr/bin/python": "python3.11", "/a": "/b", "/b": "/a", "/up": "../../etc"}
    assert resolve(links, "/bin/python") == "/usr/bin/python3.11"
    assert resolve(links, "/a") is None  # loop
    assert resolve(links, "/up") == "/etc"  # .. stops at the image's root


def _tree(entries):
    return read_tree(entries)


def test_commands_rank_own_tools_first_and_survive_bad_links():
    tree = _tree([
        Entry("/bin", "l", target="usr/bin"), Entry("/usr/bin/ls", "f", True), Entry("/usr/bin/README", "f"),
        Entry("/usr/bin/python3.11", "f", True), Entry("/usr/bin/python", "l", target="python3.11"),
        Entry("/usr/local/bin/mytool", "f", True), Entry("/usr/local/bin/x", "l", target="x"),
        Entry("/usr/local/bin/gone", "l", target="/nowhere"), Entry("/usr/bin/we ird", "f", True),
    ])
    found = propose(commands(tree, "/usr/local/bin:/usr/bin:/bin"), None)
    assert [c.name for c in found] == ["mytool", "ls", "python", "python3.11"]
    assert found[2] == Command("python", "/usr/bin/python", "/usr/bin/python3.11", True)
    base = commands(_tree([Entry("/usr/bin/ls", "f", True)]), "/usr/bin")
    assert [c.name for c in propose(commands(tree, "/usr/bin:/usr/local/bin"), base)] == [
        "mytool", "python", "python3.11"]


def test_add_aliases_keeps_hand_written_ones(tmp_path):
    text = ("# hand-written header\nname: box\nimage: docker.io/library/box\ndescription: d\n"
            "versions:\n  '1.0': '1.0'\naliases:\n  python: [python3, -I]\n")
    found = [Command("mytool", "/usr/local/bin/mytool", "/usr/local/bin/mytool", False),
             Command("python", "/usr/bin/python", "/usr/bin/python3.11", True),
             Command("box-run", "/usr/bin/box-run", "/usr/bin/box-run", True)]
    change = add_aliases("box.yaml", text, yaml.safe_load(text), found)
    assert change.added == ("mytool",)
    assert change.after.startswith("# hand-written header\n")
    assert yaml.safe_load(change.after)["aliases"] == {"python": ["python3", "-I"], "mytool": "/usr/local/bin/mytool"}
    assert "+  mytool: /usr/local/bin/mytool" in change.diff()
    again = add_aliases("box.yaml", change.after, yaml.safe_load(change.after), found)
    assert again.added == () and again.after == change.after


@requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed")
def test_discover_on_installed_images(site, registry, unique_repo):
    base_layer = it.make_layer(_base_entries())
    env = ["PATH=/usr/local/bin:/usr/bin:/bin"]
    pusher = registry.pusher()
    pusher.push_image(unique_repo, it.make_image([base_layer], env=env), tags=["base"])
    pusher.push_image(unique_repo, it.make_image([base_layer, it.make_layer(_top_entries())], env=env), tags=["top"])
    image = f"{registry.host}/{unique_repo}"
    site.write_recipe("base", f"name: base\nimage: {image}\ndescription: d\nversions:\n  '1': base\n")
    recipe = site.write_recipe("top", f"# the top image\nname: top\nimage: {image}\ndescription: d\n"
                               "versions:\n  '1': top\naliases:\n  python: [python3.11, -I]\n")
    site.cli("install", "top:1", check=True)
    # without a base (none installed yet): the image's own tools first; loops and dangling links skipped
    data = json.loads(site.cli("discover", "top", "--json", check=True).stdout)
    names = [c["name"] for c in data["commands"]]
    assert names[0] == "mytool" and set(names) == {"mytool", "up", *COREUTILS, "python", "python3.11"}, names
    assert {"name": "python", "path": "/usr/bin/python", "target": "/usr/bin/python3.11", "system": True} in data["commands"]
    site.cli("install", "base:1", check=True)
    # base installed: found by its layers, which top starts with
    data = json.loads(site.cli("discover", "top", "--json", check=True).stdout)
    assert data["base"]["label"] == "base/1" and [c["name"] for c in data["commands"]] == [
        "mytool", "python", "python3.11", "up"]
    # with --base (an installed module, or its SIF): only the new tools
    base_sif = json.loads(site.cli("inspect", "base", "--json", check=True).stdout)["sif"]
    for base in ("base:1", base_sif):
        data = json.loads(site.cli("discover", "top", "--base", base, "--json", check=True).stdout)
        assert [c["name"] for c in data["commands"]] == ["mytool", "python", "python3.11", "up"]
    # --write adds the new ones, keeps the hand-written python alias, and shows the change
    proc = site.cli("discover", "top", "--base", "base", "--write", check=True)
    assert "+  mytool: /usr/local/bin/mytool" in proc.stdout, proc.stdout
    written = yaml.safe_load(recipe.read_text())
    assert written["aliases"]["python"] == ["python3.11", "-I"] and written["aliases"]["up"] == "/usr/local/bin/up"
    assert recipe.read_text().startswith("# the top image\n")
    assert "no new aliases" in site.cli("discover", "top", "--base", "base", "--write", check=True).stdout
    # the built-in recipes belong to the package: refused in one line, nothing written
    bad = site.cli("discover", "python", "--sif", base_sif, "--write")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "writable registry" in bad.stderr, bad.stderr


def test_explore_lists_only_what_path_and_its_links_need():
    image = [Entry("/bin", "l", target="usr/bin"), Entry("/usr/bin/ls", "f", True),
             Entry("/usr/bin/python", "l", target="/opt/py/bin/python3"), Entry("/opt", "l", target="data/opt"),
             Entry("/data/opt/py/bin/python3", "f", True), Entry("/usr/bin/loop", "l", target="/l1"),
             Entry("/l1", "l", target="/l2"), Entry("/l2", "l", target="/l1"),
             Entry("/usr/bin/gone", "l", target="/nowhere/x"), Entry("/big/file", "f", True)]
    asked: list[list[str]] = []

    def list_paths(paths):
        asked.append(paths)
        if not paths:
            return image
        return [e for e in image if any(e.path == p or e.path.startswith(p + "/") or p.startswith(e.path + "/")
                                        for p in paths)]

    path_var = "/bin:/usr/local/bin"
    found = commands(explore(list_paths, path_var), path_var)
    assert [(c.name, c.target) for c in found] == [("ls", "/usr/bin/ls"), ("python", "/data/opt/py/bin/python3")]
    assert [] not in asked and all("/big" not in p for ps in asked for p in ps)
    assert len(asked) <= 5, asked
    # too many paths to ask for: one listing of the whole image, same answer
    asked.clear()
    assert commands(explore(list_paths, path_var, max_paths=1), path_var) == found and asked == [[]]
    asked.clear()
    assert commands(explore(list_paths, "/"), "/") == [] and asked == [[]]  # "/" on PATH: one full listing
