"""Hostile recipes: recipe text (ours, or an imported shpc registry's) never becomes code.

Every recipe is either refused by ``install`` with one line (non-zero exit, nothing written
under the root) or installed and then loaded by real Lmod and real Environment Modules
(``module avail/whatis/help/load``, every wrapper called) without anything running on the host:
payloads in every field try to create a sentinel file, and it must never appear. The wrappers
still reach the recording runtime stand-in with the exact argv and environment.

The regression tests at the top reproduce the defects of issue 9 one by one; the property tests
below draw arbitrary text (braces, brackets, quotes, $, backslashes, newlines, control
characters, unicode, NUL) for every field, through ``install --sif`` and through
``import-shpc``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shlex
import signal
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shpc_lite.cli.main import main
from shpc_lite.errors import ResolveError
from shpc_lite.lock import parse_lock
from shpc_lite.recipe import SAFE_NAME, SAFE_VERSION, recipe_from_dict
from shpc_lite.shpc_import import convert
from shpc_lite.tags import is_signature_tag
from tests.conftest import read_record
from tests.modsys import run_bash
from tests.needs import need_system
from tests.test_cli_errors import _assert_one_line_error

SENTINEL = Path(tempfile.gettempdir()) / f"shpc-lite-hostile-sentinel-{os.getpid()}"
S = str(SENTINEL)
# Each would create SENTINEL if it reached a Tcl, Lua, sh or YAML parser as code.
PAYLOADS = [
    f"harmless }} ; exec touch {S} ; list {{",
    f"}}\nexec touch {S}\nproc x {{}} {{",
    f"\\\n}}\nexec touch {S}\n#",
    f"[exec touch {S}]",
    f"[open {S} w]",
    f'"; exec touch {S}; puts "',
    f"\nexec touch {S}\n",
    f'") os.execute("touch {S}") --',
    f'" .. os.execute("touch {S}") .. "',
    f"]] os.execute('touch {S}') --[[",
    f"\nos.execute('touch {S}')\n",
    f"\rio.open('{S}', 'w')\r",
    f"$(touch {S})",
    f"`touch {S}`",
    f"'; touch {S}; '",
    f'"; touch {S}; "',
    f"\ntouch {S}\n",
    f"$(touch${{IFS}}{S})",
    "\nbind: ['/:/hostroot']\n#",
]
SYSTEMS = ["lmod", "tcl"]


@pytest.fixture(autouse=True)
def _no_sentinel():
    SENTINEL.unlink(missing_ok=True)
    yield
    created = SENTINEL.exists()
    SENTINEL.unlink(missing_ok=True)
    assert not created, "recipe text ran on the host: the sentinel file was created"


def _recipe_text(**fields: Any) -> str:
    data = {"name": "demo", "image": "docker.io/library/demo", "description": "demo",
            "versions": {"1.0": "1.0"}, **fields}
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def _session(system: str, modules: Path, module: str, commands: list[str], env: dict,
             args: tuple[str, ...] = ()) -> tuple[bytes, list[Path]]:
    """avail, whatis, help, load, then each command (found on PATH, never a shell builtin) with
    ``args``, each recording to its own file; returns the output and the record paths."""
    records = [Path(env["SHPC_LITE_TEST_RECORD"] + f".{i}") for i in range(len(commands))]
    calls = "".join(f"SHPC_LITE_TEST_RECORD={shlex.quote(str(rec))} env {shlex.quote(cmd)} \"$@\" || exit 4\n"
                    for cmd, rec in zip(commands, records))
    script = (f"module use {shlex.quote(str(modules))}\nmodule avail 2>&1\n"
              f"module whatis {module} 2>&1\nmodule help {module} 2>&1\n"
              f"module load {module} || exit 3\n{calls}")
    proc = run_bash(system, script, env, args)
    assert proc.returncode == 0, (system, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert not SENTINEL.exists(), (system, "the sentinel was created", proc.stdout[-2000:])
    return proc.stdout, records


# ---------------------------------------------------------------------------------------------
# Regression tests, one per defect


@pytest.mark.parametrize("system", SYSTEMS)
def test_brace_in_text_fields_stays_text(site, small_sif, system):
    """Defect 1: a } in description, url or an alias command closed ``proc ModulesHelp {} {``."""
    need_system(system)
    payload = f"harmless }} ; exec touch {S} ; list {{"
    site.write_recipe("demo", _recipe_text(description=payload, url=payload,
                                           aliases={"tool": ["/bin/tool", payload]}))
    site.cli("--module-system", system, "install", "demo:1.0", "--sif", str(small_sif), check=True)
    out, records = _session(system, site.root / "modules", "demo/1.0", ["tool"], site.env, ("x",))
    assert f"Description: {payload}".encode() in out  # whatis shows it, literally
    argv, _ = read_record(SimpleNamespace(env={"SHPC_LITE_TEST_RECORD": str(records[0])}))
    assert argv[2:] == [b"/bin/tool", payload.encode(), b"x"]


TRAILING_NEWLINE = {
    "env-name": (dict(env={"FOO\n": "1"}), "unsafe env name 'FOO\\n'"),
    "version": (dict(versions={"1.0\n": "1.0"}), "unsafe version '1.0\\n'"),
    "alias-name": (dict(aliases={"tool\n": "tool"}), "unsafe alias name 'tool\\n'"),
    "name": (dict(name="demo\n"), "name: 'demo\\n'"),
    "tag": (dict(versions={"1.0": "1.0\n"}), "versions.1.0"),
    "digest": (dict(versions={"1.0": {"tag": "1.0", "digest": "sha256:" + "a" * 64 + "\n"}}), "versions.1.0"),
    "image": (dict(image="docker.io/library/demo\n"), "image: 'docker.io/library/demo\\n'"),
}


@pytest.mark.parametrize("case", sorted(TRAILING_NEWLINE))
def test_trailing_newline_in_names_is_refused(site, small_sif, case):
    """Defect 2: ``^...$`` let a final newline through (an env name made a wrapper line '=...')."""
    fields, message = TRAILING_NEWLINE[case]
    path = site.write_recipe("demo", _recipe_text(**fields))
    proc = site.cli("install", "demo:1.0", "--sif", str(small_sif))
    _assert_one_line_error(proc, str(path), message)
    assert site.files() == set()


def test_trailing_newline_in_cli_spec_is_refused(site, small_sif):
    site.write_recipe("demo", _recipe_text())
    for spec in ("demo\n:1.0", "demo:1.0\n"):
        _assert_one_line_error(site.cli("install", spec, "--sif", str(small_sif)), "invalid")
    assert site.files() == set()


def test_lock_and_tags_refuse_trailing_newline():
    """Defect 2 in the lock file and the tag rules."""
    good = {"version": "1.0", "tag": "1.0", "digest": "sha256:" + "a" * 64, "resolved_at": "2024-01-01T00:00:00Z"}
    lock = {"lockfile_version": 1, "recipes": {"demo": {"image": "docker.io/library/demo", "versions": [good]}}}
    parse_lock(json.dumps(lock), "site.lock")
    for key in good:
        bad = json.loads(json.dumps(lock))
        bad["recipes"]["demo"]["versions"][0][key] += "\n"
        with pytest.raises(ResolveError, match=f"versions\\[0\\].{key}"):
            parse_lock(json.dumps(bad), "site.lock")
    with pytest.raises(ResolveError, match="invalid recipe name"):
        parse_lock(json.dumps({**lock, "recipes": {"demo\n": lock["recipes"]["demo"]}}), "site.lock")
    assert is_signature_tag("sha256-" + "a" * 64 + ".sig") and not is_signature_tag("sha256-" + "a" * 64 + ".sig\n")
    assert not SAFE_NAME.match("demo\n") and not SAFE_VERSION.match("1.0\n")


def _shpc_recipe(tmp: Path, doc: dict, sub: str = "x") -> Path:
    path = tmp / "shpc" / sub / "container.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


def _comment_and_yaml(text: str) -> tuple[list[str], str]:
    """The leading comment lines and the rest of a written recipe file."""
    lines = text.splitlines(keepends=True)
    head = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
    return head, "".join(lines[len(head):])


def test_import_tag_name_cannot_add_yaml(site):
    """Defect 3: a dropped tag name went raw into the '# Note:' header and added a bind: line."""
    hostile = "x\nbind: ['/:/hostroot']\n#"
    doc = {"docker": "library/python", "description": "d",
           "tags": {"3.11": "sha256:" + "a" * 64, hostile: "sha256:" + "b" * 64}}
    _shpc_recipe(site.tmp, doc)
    out = site.tmp / "imported"
    proc = site.cli("import-shpc", str(site.tmp / "shpc"), "--out", str(out), check=True)
    assert "'/:/hostroot'" in proc.stdout  # the note names the tag, escaped, on one line
    text = (out / "python.yaml").read_text()
    head, body = _comment_and_yaml(text)
    data = yaml.safe_load(text)
    assert "bind" not in data and data["versions"] == {"3.11": {"tag": "3.11", "digest": "sha256:" + "a" * 64}}
    assert len(head) == 2 and yaml.safe_load(body) == data  # comments, then only what safe_dump wrote


@pytest.mark.parametrize("fields, field", [
    (dict(aliases={"tool": ["/bin/tool", "a\0b"]}), "aliases.tool[1]"),
    (dict(aliases={"tool": "/bin/tool a\0b"}), "aliases.tool"),
    (dict(aliases={"tool": {"command": "/bin/tool", "options": ["--x\0"]}}), "aliases.tool.options[0]"),
    (dict(bind=["/data\0/evil"]), "bind[0]"),
    (dict(description="d\0"), "description"),
    (dict(env={"A": "1\0"}), "env.A"),
])
def test_nul_is_refused_naming_the_field(site, small_sif, fields, field):
    """Defect 4: NUL bytes in aliases or binds were silently dropped (sh drops them)."""
    path = site.write_recipe("demo", _recipe_text(**fields))
    proc = site.cli("install", "demo:1.0", "--sif", str(small_sif))
    _assert_one_line_error(proc, str(path), f"{field}: contains a NUL byte")
    assert site.files() == set()


def test_nul_in_shpc_alias_skips_the_recipe(site):
    source = _shpc_recipe(site.tmp, {"docker": "library/python", "tags": {"3.11": "x"},
                                     "aliases": {"python": "/usr/bin/python\0 -x"}})
    out = site.tmp / "imported"
    proc = site.cli("import-shpc", str(site.tmp / "shpc"), "--out", str(out))
    assert proc.returncode == 1 and not list(out.glob("*.yaml"))
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(source) in lines[0] and "aliases.python: contains a NUL byte" in lines[0]


def test_alias_named_like_a_generated_command_is_refused(site, small_sif):
    path = site.write_recipe("demo", _recipe_text(aliases={"demo-run": "/bin/tool"}))
    _assert_one_line_error(site.cli("install", "demo:1.0", "--sif", str(small_sif)), str(path), "aliases.demo-run")


# ---------------------------------------------------------------------------------------------
# Property tests: arbitrary text in every field, through real Lmod and Environment Modules

# Anything a YAML file can carry, NUL included (NUL must be refused, so it comes more rarely).
PLAIN = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=16)
ANY = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=16)
PAYLOAD = st.sampled_from(PAYLOADS)
# Never empty: an empty description, bind or command is refused, which would hide the rest.
HOSTILE = st.one_of(PLAIN.filter(bool), PAYLOAD, st.builds(lambda a, p, b: a + p + b, PLAIN, PAYLOAD, PLAIN), ANY)
ARGS = st.lists(st.one_of(PLAIN, PAYLOAD), max_size=3)  # argv cannot carry NUL


# Fields whose text is checked (names, versions, tags, the image): at most one of them is drawn
# hostile per recipe, so that most recipes install and the free text fields reach the modules.
CHECKED = [None] * 6 + ["name", "image", "version", "tag", "alias", "env"]


def _checker(draw: Any) -> Callable[[str, str], str]:
    """``checked(field, safe)``: hostile text for the one field drawn to be hostile, else ``safe``."""
    bad = draw(st.sampled_from(CHECKED))
    return lambda field, safe: draw(HOSTILE) if bad == field else safe


@st.composite
def recipes(draw: Any) -> dict:
    """One recipe document with hostile text in every free text field and maybe one checked one."""
    checked = _checker(draw)
    words = st.lists(HOSTILE, min_size=1, max_size=3)
    command = st.one_of(words, words.map(shlex.join), HOSTILE)  # a string is split like sh does
    alias = st.one_of(command, st.fixed_dictionaries({"command": command},
                                                     optional={"options": st.lists(HOSTILE, max_size=2)}))
    env = draw(st.lists(HOSTILE, max_size=2))
    return {
        "name": checked("name", "demo"),
        "image": checked("image", "docker.io/library/demo"),
        "description": draw(HOSTILE),
        "url": draw(HOSTILE),
        "maintainer": draw(HOSTILE),
        "versions": {checked("version", "1.0"): checked("tag", "1.0")},
        "aliases": {checked("alias", "tool"): draw(alias), "tool2": draw(alias)},
        "env": {checked("env", f"DEMO_{i}"): value for i, value in enumerate(env)},
        "bind": draw(st.lists(HOSTILE, max_size=2)),
        "features": draw(st.fixed_dictionaries({}, optional={
            "gpu": st.sampled_from(["none", "nvidia", "amd"]), "x11": st.booleans(),
            "home": st.one_of(st.booleans(), HOSTILE)})),
    }


@st.composite
def shpc_recipes(draw: Any) -> dict:
    """One shpc ``container.yaml`` with hostile values (tags, aliases, env, text)."""
    checked = _checker(draw)
    aliases = {checked("alias", "tool"): draw(HOSTILE), "tool2": draw(HOSTILE)}
    if draw(st.booleans()):  # shpc also writes aliases as a list of {name, command}
        aliases = [{"name": k, "command": v} for k, v in aliases.items()]
    tags = {checked("tag", "1.0"): draw(HOSTILE), **draw(st.dictionaries(HOSTILE, HOSTILE, max_size=2))}
    env = draw(st.lists(HOSTILE, max_size=2))
    return {
        "docker": checked("image", "library/demo"),
        "description": draw(HOSTILE),
        "url": draw(HOSTILE),
        "maintainer": draw(HOSTILE),
        "tags": tags,
        "aliases": aliases,
        "env": {checked("env", f"DEMO_{i}"): value for i, value in enumerate(env)},
        "features": draw(st.fixed_dictionaries({}, optional={
            "gpu": st.booleans(), "x11": st.booleans(), "home": st.one_of(st.booleans(), HOSTILE)})),
    }


def _cli(env: dict, *args: str) -> tuple[int, str]:
    """The real CLI entry point, in this process: a Python start per example would dominate the
    run time. Returns the exit code and stderr."""
    err = io.StringIO()
    term = signal.getsignal(signal.SIGTERM)
    try:
        with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            code = main(list(args))
    finally:
        signal.signal(signal.SIGTERM, term)
    return code, err.getvalue()


class Example:
    """A fresh root, recipe directory and record file for one example (examples share a site)."""

    counter = itertools.count()

    def __init__(self, site: Any, system: str):
        self.dir = site.tmp / f"example-{next(self.counter)}"
        self.root = self.dir / "root"
        self.recipes = self.dir / "recipes"
        self.recipes.mkdir(parents=True)
        self.system = system
        self.env = {**site.env, "SHPC_LITE_ROOT": str(self.root), "SHPC_LITE_REGISTRY": str(self.recipes),
                    "SHPC_LITE_TEST_RECORD": str(self.dir / "record")}

    def files(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*")} if self.root.exists() else set()

    def install(self, name: str, version: str, sif: Path) -> Optional[str]:
        """Install ``name:version``; None if installed, else the one-line refusal (checked)."""
        before = self.files()
        code, err = _cli(self.env, "--module-system", self.system, "install", f"{name}:{version}", "--sif", str(sif))
        if code == 0:
            return None
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shpc-lite: error: "), err
        assert self.files() == before, "a refused install wrote under the root"
        return lines[0]

    def check_loaded(self, recipe_path: Path, version: str, args: list[str]) -> None:
        """Load the installed module in the real module system, call every alias and the
        generated NAME-exec/-run/-shell, and compare what the runtime stand-in received with the
        recipe as the file holds it."""
        recipe = recipe_from_dict(yaml.safe_load(recipe_path.read_text(encoding="utf-8")), str(recipe_path))
        sif = json.loads((self.root / "wrappers" / recipe.name / version / "install.json").read_text())["sif"]
        options: list[str] = []
        for path in recipe.bind:
            options += ["-B", path]
        home = recipe.features.home
        options += ["--no-home"] if home is False else ["--home", home] if isinstance(home, str) else []
        expected = {a.name: ["exec", *options, *a.options, sif, *a.argv, *args] for a in recipe.aliases}
        expected.update({f"{recipe.name}-{sub}": [sub, *options, sif, *args] for sub in ("exec", "run", "shell")})
        _, records = _session(self.system, self.root / "modules", f"{recipe.name}/{version}", list(expected),
                              self.env, tuple(args))
        for (command, want), record in zip(expected.items(), records):
            argv, env = read_record(SimpleNamespace(env={"SHPC_LITE_TEST_RECORD": str(record)}))
            assert argv == [a.encode() for a in want], command
            for key, value in recipe.env:
                assert env[f"SINGULARITYENV_{key}".encode()] == value.encode(), key


def _spec_for(data: dict) -> tuple[str, str]:
    """The file name and version to install: hostile names fall back to demo (then the name in
    the file does not match it, or is refused on load, or by the CLI: all refusals)."""
    name = data["name"] if isinstance(data["name"], str) and SAFE_NAME.match(data["name"]) else "demo"
    version = next(iter(data["versions"]))
    return name, version if "\0" not in version else "1.0"


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


def _property(site: Any, sif: Path, system: str, strategy: st.SearchStrategy,
              write: Callable[[Example, Any], Optional[tuple[Path, str]]]) -> None:
    """For each drawn document: ``write`` makes a recipe file (or returns None: refused on the
    way), which is installed and loaded, or refused with one line."""
    need_system(system)
    loaded = []

    @SETTINGS
    @given(drawn=strategy, args=ARGS)
    def check(drawn: Any, args: list[str]) -> None:
        example = Example(site, system)
        written = write(example, drawn)
        if written is not None and example.install(written[0].stem, written[1], sif) is None:
            example.check_loaded(written[0], written[1], args)
            loaded.append(written)

    check()
    assert len(loaded) >= 5, f"only {len(loaded)} hostile recipes installed: the strategy refuses too much"


@pytest.mark.parametrize("system", SYSTEMS)
def test_hostile_recipes_install_or_refuse(site, small_sif, system):
    """Through ``install --sif``: refused with one line, or loaded and run without host code."""
    def write(example: Example, data: dict) -> tuple[Path, str]:
        name, version = _spec_for(data)
        path = example.recipes / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        return path, version

    _property(site, small_sif, system, recipes(), write)


@pytest.mark.parametrize("system", SYSTEMS)
def test_hostile_shpc_recipes_import_then_install_or_refuse(site, small_sif, system):
    """Through ``import-shpc``: a hostile container.yaml is skipped with one line, or converted
    into a file holding exactly what ``convert`` made (comments add nothing), which installs or
    is refused, and loads without host code."""
    def write(example: Example, doc: dict) -> Optional[tuple[Path, str]]:
        source = _shpc_recipe(example.dir, doc)
        code, err = _cli(example.env, "import-shpc", str(source), "--out", str(example.recipes))
        written = list(example.recipes.glob("*.yaml"))
        if code != 0:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("shpc-lite: "), err
            assert not written
            return None
        [path] = written
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert data == {"name": path.stem, **convert(yaml.safe_load(source.read_text()), str(source)).data}
        return path, next(iter(data["versions"]))

    _property(site, small_sif, system, shpc_recipes(), write)
