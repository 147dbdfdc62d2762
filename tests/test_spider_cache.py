"""The Lmod spider cache, refreshed by name after each change, is what a full walk writes (issue 13).

A refresh walks only the module names whose directory changed and splices their entries into the
old cache (shpc_lite/index.py). Each step below is checked against Lmod's own full spider run on
the same tree, byte for byte, and real Lmod answers ``avail``, ``spider``, ``keyword`` and ``load``
from the cache exactly as it does walking the tree. Between a change and its refresh (a batch, a
crash) Lmod must never trust the old cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from shpc_lite.config import load_config
from shpc_lite.index import refresh
from shpc_lite.install import install_sif, uninstall
from tests.modsys import have, run_bash
from tests.needs import requires

pytestmark = requires(have("lmod"), reason="Debian lmod not installed")

SPIDER = Path("/usr/share/lmod/lmod/libexec/spider")
# Lmod quotes some of these keys and sorts them as bytes: digits, upper case, then lower case
NAMES = ["alpha", "Beta-2", "gamma.x", "Zeta", "b+c", "9lives"]
RECIPE = """name: {name}
image: docker.io/library/busybox
description: '{name}: a tool with [[brackets]], ]] and "quotes"'
url: https://example.org/{name}
keywords: [spidertest, {name}-kw]
versions:
  '1.0': '1.36'
  '2.0': '1.36'
  '10.0': '1.36'
aliases:
  {name}-sh: /bin/sh
"""


def _setup(site) -> None:
    for name in NAMES:
        site.write_recipe(name, RECIPE.format(name=name))


def _config(site):
    return load_config({"spider_cache": True}, environ=site.env)


def _install(site, spec: str, sif: Path) -> None:
    site.cli("--set", "spider_cache=true", "install", spec, "--sif", str(sif), check=True)


def _cache(site) -> bytes:
    return (site.root / "cache" / "lmod" / "spiderT.lua").read_bytes()


def _walked(site):
    state = site.root / "cache" / "lmod" / "shpc-lite-names.json"
    return json.loads(state.read_text())["walked"]


def _full_walk(site) -> bytes:
    """What Lmod's own spider writes for the whole tree (update_lmod_system_cache_files runs this)."""
    return subprocess.run([str(SPIDER), "-o", "spiderT", str(site.root / "modules")], check=True,
                          capture_output=True).stdout


def _module(site, command: str, cached: bool) -> str:
    """One module command's output in a fresh shell, reading the cache or walking the tree."""
    env = {**site.env, "LMOD_SHORT_TIME": "86400"}  # no per-user cache
    env.update({"LMOD_RC": str(site.root / "lmodrc.lua"), "LMOD_CACHED_LOADS": "yes"} if cached
               else {"LMOD_IGNORE_CACHE": "yes"})
    proc = run_bash("lmod", f"module use {site.root}/modules\n{command} 2>&1", env)
    return proc.stdout.decode()


def test_refresh_by_name_writes_what_a_full_walk_writes(site, small_sif, tmp_path):
    _setup(site)
    other = tmp_path / "other.sif"
    other.write_bytes(small_sif.read_bytes() + b"\0")  # another image: the module's paths change
    _install(site, "alpha:1.0", small_sif)
    assert _walked(site) is None and _cache(site) == _full_walk(site)  # the first refresh walks all
    for name in NAMES[1:]:
        _install(site, f"{name}:1.0", small_sif)
        assert _walked(site) == [name] and _cache(site) == _full_walk(site), name
    steps = [
        (lambda: _install(site, "alpha:2.0", small_sif), ["alpha"]),   # a new version, now the default
        (lambda: _install(site, "alpha:10.0", small_sif), ["alpha"]),  # 10.0 sorts above 2.0
        (lambda: site.cli("--set", "spider_cache=true", "uninstall", "Beta-2", check=True), ["Beta-2"]),
        (lambda: site.cli("--set", "spider_cache=true", "uninstall", "alpha:10.0", check=True), ["alpha"]),
        (lambda: _install(site, "gamma.x:1.0", other), ["gamma.x"]),  # reinstalled from another image
    ]
    for change, walked in steps:
        change()
        assert _walked(site) == walked and _cache(site) == _full_walk(site), walked
    # the default set by hand (a batch manifest's default: true), in process, then one refresh
    import dataclasses

    from shpc_lite.modules import installed, write_defaults

    config = _config(site)
    layout = config.layout
    first = [r for r in installed(layout, "alpha") if r.version == "1.0"][0]
    layout.record("alpha", "1.0").write_text(json.dumps({**dataclasses.asdict(first), "default": True}))
    write_defaults(layout, "alpha", config)
    refresh(config)
    assert _walked(site) == ["alpha"] and _cache(site) == _full_walk(site)
    assert 'module_version("alpha/1.0", "default")' in (site.root / "modules/alpha/.modulerc.lua").read_text()


def test_lmod_answers_from_the_cache_as_from_the_tree(site, small_sif):
    _setup(site)
    for spec in ("alpha:1.0", "alpha:2.0", "Zeta:1.0", "9lives:10.0", "gamma.x:1.0"):
        _install(site, spec, small_sif)
    site.cli("--set", "spider_cache=true", "uninstall", "gamma.x", check=True)
    assert _walked(site) == ["gamma.x"]
    commands = ["module -t avail", "module avail", "module spider alpha", "module spider alpha/1.0",
                "module spider 9lives", "module keyword spidertest", "module keyword Zeta-kw",
                "module load alpha && module -t list && echo $PATH", "module load Zeta/1.0 && module -t list",
                "module spider gamma.x"]
    for command in commands:
        assert _module(site, command, cached=True) == _module(site, command, cached=False), command
    assert "alpha/2.0" in _module(site, "module -t avail", cached=True)
    # and the answers really came from the cache: a modulefile taken away behind Lmod's back
    # (no shpc-lite, so the cache is not marked stale) is still listed from it
    os.rename(site.root / "modules/Zeta/1.0.lua", site.tmp / "hidden.lua")
    assert "Zeta/1.0" in _module(site, "module -t avail", cached=True)
    assert "Zeta/1.0" not in _module(site, "module -t avail", cached=False)


def test_a_change_is_never_hidden_by_a_stale_cache(site, small_sif):
    """install and uninstall refresh the cache before they return; a module written without a
    refresh (mid-batch, or killed before it) is seen because Lmod stops trusting the cache."""
    _setup(site)
    _install(site, "alpha:1.0", small_sif)
    assert "alpha/1.0" in _module(site, "module -t avail", cached=True)  # right after install
    config = _config(site)
    install_sif(config, "Zeta", "1.0", small_sif)  # no refresh after it
    assert b"Zeta" not in _cache(site)  # the cache is stale ...
    assert "Zeta/1.0" in _module(site, "module -t avail", cached=True)  # ... and not used
    assert "Zeta/1.0" in _module(site, "module spider Zeta", cached=True)
    uninstall(config, "alpha", "1.0")
    assert "alpha/1.0" not in _module(site, "module -t avail", cached=True)
    refresh(config)
    assert sorted(_walked(site)) == ["Zeta", "alpha"] and _cache(site) == _full_walk(site)
    os.rename(site.root / "modules/Zeta/1.0.lua", site.tmp / "hidden.lua")  # the cache is read again
    assert "Zeta/1.0" in _module(site, "module -t avail", cached=True)


def test_a_crash_mid_write_leaves_the_cache_distrusted(site, small_sif, monkeypatch):
    """A process killed while it writes a module (after its first step) leaves Lmod walking."""
    from shpc_lite import publish

    _setup(site)
    _install(site, "alpha:1.0", small_sif)
    config = _config(site)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for the kill: nothing after the cache is marked is written

    monkeypatch.setattr(publish, "render_modulefile", killed)
    with pytest.raises(KeyboardInterrupt):
        install_sif(config, "alpha", "2.0", small_sif)
    timestamp = site.root / "cache" / "lmod" / "timestamp"
    cache = site.root / "cache" / "lmod" / "spiderT.luac_5.3"
    assert int(timestamp.stat().st_mtime) > int(cache.stat().st_mtime)  # Lmod's test: cache older
    monkeypatch.undo()
    install_sif(config, "alpha", "2.0", small_sif)  # the rerun
    assert "alpha/2.0" in _module(site, "module -t avail", cached=True)
    refresh(config)
    assert _cache(site) == _full_walk(site)
    assert int(timestamp.stat().st_mtime) <= int(cache.stat().st_mtime)


@pytest.mark.parametrize("extra", ["an alias in a .modulerc.lua", "a file beside the module dirs"])
def test_a_tree_with_more_than_modules_is_walked_whole(site, small_sif, extra):
    _setup(site)
    _install(site, "alpha:1.0", small_sif)
    _install(site, "Zeta:1.0", small_sif)
    # written as shpc-lite and editors such as sed -i write: a new file renamed into place
    # (a file rewritten in place leaves its directory's mtime alone: docs/site.md says to touch it)
    from shpc_lite.fsutil import atomic_write

    if extra.startswith("an alias"):
        atomic_write(site.root / "modules/Zeta/.modulerc.lua", 'module_alias("zz", "Zeta/1.0")\n')
    else:
        atomic_write(site.root / "modules/README", "site notes\n")
    _install(site, "alpha:2.0", small_sif)
    assert not (site.root / "cache/lmod/shpc-lite-names.json").exists()  # no splicing next time
    assert _cache(site) == _full_walk(site)
    _install(site, "alpha:10.0", small_sif)
    assert _cache(site) == _full_walk(site)
    if extra.startswith("an alias"):
        assert "zz" in _module(site, "module -t avail", cached=True)


def test_a_module_written_while_lmod_walks_is_not_lost(site, small_sif, monkeypatch):
    """Another install lands while the refresh runs Lmod's spider: the refresh sees the tree moved
    and walks that name again, so the cache it leaves valid has the module."""
    from shpc_lite import index

    _setup(site)
    _install(site, "alpha:1.0", small_sif)
    config = _config(site)
    walk, landed = index._walk, []

    def walk_while_installing(layout, lmod, only):
        result = walk(layout, lmod, only)
        if not landed:
            landed.append(install_sif(config, "Zeta", "1.0", small_sif))
        return result

    monkeypatch.setattr(index, "_walk", walk_while_installing)
    install_sif(config, "alpha", "2.0", small_sif)
    refresh(config)
    assert landed and _walked(site) == ["Zeta"] and _cache(site) == _full_walk(site)
    timestamp = site.root / "cache" / "lmod" / "timestamp"
    assert int(timestamp.stat().st_mtime) <= int((site.root / "cache/lmod/spiderT.luac_5.3").stat().st_mtime)


def test_the_printed_line_keeps_a_per_user_cache_from_hiding_a_module(site, small_sif):
    """Lmod saves a per-user cache after a slow walk (here forced: LMOD_SHORT_TIME=0) and trusts
    it whenever the system cache is marked stale. With the environment shpc-lite prints, none is
    saved, so a module installed after the refresh shows up; without it, it stays hidden."""
    _setup(site)
    printed = site.cli("--set", "spider_cache=true", "install", "alpha:1.0", "--sif", str(small_sif),
                       check=True).stdout
    line = next(line for line in printed.splitlines() if "export LMOD_RC=" in line)
    exported = dict(word.split("=", 1) for word in line.split("export ", 1)[1].split())
    config = _config(site)

    def avail(extra: dict) -> str:
        env = {**site.env, "LMOD_CACHED_LOADS": "yes", **extra}
        return run_bash("lmod", f"module use {site.root}/modules\nmodule -t avail 2>&1", env).stdout.decode()

    for user_env, hidden in (({**exported}, False), ({**exported, "LMOD_SHORT_TIME": "0"}, True)):
        home = site.tmp / f"home-{hidden}"
        env = {**user_env, "HOME": str(home)}
        install_sif(config, "Zeta", "1.0", small_sif)  # the cache is stale: the user walks ...
        assert "Zeta/1.0" in avail({**env, "LMOD_SHORT_TIME": env["LMOD_SHORT_TIME"]})  # ... (and may save)
        refresh(config)
        time.sleep(1.1)  # Lmod compares whole seconds
        install_sif(config, "gamma.x", "1.0", small_sif)  # marked stale again, no refresh yet
        assert ("gamma.x/1.0" not in avail(env)) == hidden, (user_env, hidden)
        uninstall(config, "gamma.x", "1.0")
        uninstall(config, "Zeta", "1.0")
        refresh(config)


def test_the_last_module_gone_and_back(site, small_sif):
    _setup(site)
    _install(site, "alpha:1.0", small_sif)
    site.cli("--set", "spider_cache=true", "uninstall", "alpha", check=True)
    assert _cache(site) == _full_walk(site) and b"alpha" not in _cache(site)
    _install(site, "alpha:1.0", small_sif)
    assert _cache(site) == _full_walk(site) and b"alpha/1.0" in _cache(site)


def test_doctor_sees_a_stale_cache_and_clean_refreshes_it(site, small_sif):
    """An install interrupted before its refresh leaves the cache marked stale (right, but Lmod
    walks the tree): doctor says so, and ``clean`` brings it up to date."""
    _setup(site)
    _install(site, "alpha:1.0", small_sif)
    doctor = site.cli("--set", "spider_cache=true", "doctor", "--offline").stdout
    assert "up to date" in doctor, doctor
    install_sif(_config(site), "Zeta", "1.0", small_sif)  # no refresh after it
    doctor = site.cli("--set", "spider_cache=true", "doctor", "--offline").stdout
    assert "marked stale" in doctor and "shpc-lite clean" in doctor, doctor
    site.cli("--set", "spider_cache=true", "clean", check=True)
    assert _walked(site) == ["Zeta"] and _cache(site) == _full_walk(site)
    assert "up to date" in site.cli("--set", "spider_cache=true", "doctor", "--offline").stdout


@pytest.mark.parametrize("seed", [1, 2])
def test_random_changes_keep_what_a_full_walk_writes(site, small_sif, tmp_path, seed):
    """Installs, reinstalls onto another image and uninstalls of random versions (1.10 against
    1.0, a pre-release) in random batches, each followed by one refresh by name."""
    import random

    from shpc_lite.modules import installed

    versions = ["1.0", "1.10", "2.0-rc1", "2.0"]
    for name in NAMES:
        site.write_recipe(name, RECIPE.format(name=name).replace("  '10.0': '1.36'\n", "".join(
            f"  '{v}': '1.36'\n" for v in versions if v not in ("1.0", "2.0"))))
    other = tmp_path / "other.sif"
    other.write_bytes(small_sif.read_bytes() + b"\0")
    config = _config(site)
    rng = random.Random(seed)
    for step in range(12):
        for _ in range(rng.randint(1, 4)):
            name, version = rng.choice(NAMES), rng.choice(versions)
            if version in [r.version for r in installed(config.layout, name)] and rng.random() < 0.5:
                uninstall(config, name, version)
            else:
                install_sif(config, name, version, rng.choice([small_sif, other]))
        refresh(config)
        assert _cache(site) == _full_walk(site)
        assert step == 0 or isinstance(_walked(site), list)  # by name after the first
