"""Recipes: what a container offers as a module. Loaded from YAML, validated, frozen.

A recipe names an image and the module versions built from it (pinned tags, or a ``select``
rule that picks tags, see docs/recipes.md), the commands users run (aliases) and how the runtime
must start it (GPU, binds, env). Nothing here touches the network or the module tree.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from shpc_lite.errors import NotFoundError, RecipeError
from shpc_lite.fsutil import identity

# Names and versions become file names and words of generated code. Anchored with \A and \Z,
# not ^ and $: Python's $ also matches before a final "\n" (and callers use .match).
SAFE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
SAFE_VERSION = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")


@dataclass(frozen=True)
class Alias:
    """A command on the user's PATH that runs ``argv`` inside the container."""

    name: str
    argv: tuple[str, ...]
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Features:
    gpu: str = "none"  # nvidia | amd | none
    x11: bool = False
    home: bool | str = True  # True: runtime default, False: --no-home, str: --home PATH
    jupyter: bool = False  # the module carries a kernelspec and puts it on JUPYTER_PATH
    mpi: Optional[str] = None  # host: bind the host's MPI (config mpi_binds/mpi_env); None: config ``mpi``


@dataclass(frozen=True)
class VersionPin:
    """A module version and the image tag (and optionally digest) it comes from."""

    version: str
    tag: str
    digest: Optional[str] = None


@dataclass(frozen=True)
class SelectRule:
    """Pick module versions from a registry's tag list (see shpc_lite.tags)."""

    pattern: str
    version: str = "{version}"
    versions: str = ""
    newest: int = 3
    per: str = "version"
    prefer: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


# Every module gets <name>-shell, <name>-exec and <name>-run besides its aliases.
GENERATED = ("shell", "exec", "run")


def generated_commands(name: str) -> tuple[str, ...]:
    """The commands shpc-lite writes for every module: not aliases, never proposed or matched."""
    return tuple(f"{name}-{sub}" for sub in GENERATED)


@dataclass(frozen=True)
class Recipe:
    name: str
    image: str
    description: str
    url: str = ""
    maintainer: str = ""
    keywords: tuple[str, ...] = ()  # what users search for besides the name (``module keyword gpu``)
    versions: tuple[VersionPin, ...] = ()
    select: Optional[SelectRule] = None
    aliases: tuple[Alias, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    features: Features = field(default_factory=Features)
    bind: tuple[str, ...] = ()
    source: str = ""

    def version(self, version: str) -> VersionPin:
        for pin in self.versions:
            if pin.version == version:
                return pin
        known = ", ".join(p.version for p in self.versions) or "none"
        raise NotFoundError(f"{self.name}: unknown version {version!r} (known: {known})")


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads((Path(__file__).parent / "schemas" / "recipe.json").read_text())


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(_schema())


@functools.lru_cache(maxsize=1)
def _fast_validator() -> Any:
    import fastjsonschema

    # no defaults written into the document; no rule copied into each (caught) exception
    return fastjsonschema.compile(_schema(), use_default=False, detailed_exceptions=False)


def _schema_errors(data: Any) -> list:
    """The schema's errors for ``data``, most useful first (empty: valid).

    A batch validates hundreds of recipes: the schema compiled to Python (fastjsonschema) says
    yes about four times faster than jsonschema walks it. Only a yes is taken from it: on
    anything else jsonschema decides, so the verdict and the error message are jsonschema's
    (tests/test_recipe_schema.py checks that the fast one never accepts what jsonschema refuses)."""
    try:
        _fast_validator()(data)
        return []
    except Exception:  # noqa: BLE001 - JsonSchemaException, or a value it cannot handle
        return sorted(_validator().iter_errors(data), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))


_PLAIN_KEY = re.compile(r"[\w.+-]+")


def _path(parts: Iterable[Any]) -> str:
    """A field path for an error line: ``aliases.tool.command[1]``; odd keys (newlines, spaces)
    as repr, so the message stays one line."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            out += ("." if out else "") + (text if _PLAIN_KEY.fullmatch(text) else repr(text))
    return out or "(top level)"


def _field(error: Any) -> str:
    return _path(error.absolute_path)


def _strings(data: Any, where: tuple = ()) -> Iterator[tuple[tuple, str, bool]]:
    """Every string of a parsed document, keys included: (path, string, is_key)."""
    if isinstance(data, str):
        yield where, data, False
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str):
                yield where, key, True
            yield from _strings(value, where + (str(key),))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _strings(value, where + (i,))


def _check_text(data: Any, source: str) -> None:
    """Refuse what no generated file can carry faithfully: a NUL byte (dropped by sh, cut short by
    C strings: a command or bind would silently change) and lone surrogates (not UTF-8)."""
    for where, text, is_key in _strings(data):
        problem = "a NUL byte" if "\0" in text else None
        if problem is None:
            try:
                text.encode("utf-8")
                continue
            except UnicodeEncodeError:
                problem = "a character that is not valid Unicode (a lone surrogate)"
        what = f"{_path(where)}: name {text!r}" if is_key else _path(where)
        raise RecipeError(f"{source}: {what}: contains {problem}, which recipe text cannot hold")


def _explain(error: Any) -> str:
    """One short sentence for the most useful jsonschema error."""
    kind = error.validator
    where = _field(error)
    if kind == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown field {'.'.join(filter(None, [where if where != '(top level)' else '', extra[0]]))!r}"
    if kind == "required":
        missing = [r for r in error.validator_value if r not in error.instance][0]
        prefix = "" if where == "(top level)" else where + "."
        return f"missing field {prefix + missing!r}"
    if kind == "propertyNames" or "propertyNames" in error.schema_path:
        bad = error.instance
        for sub in error.context or []:
            bad = sub.instance
        label = {"aliases": "alias name", "versions": "version", "env": "env name"}.get(where, "key")
        allowed = "letters, digits and _, not first a digit" if where == "env" else "letters, digits and . _ + -"
        return f"{where}: unsafe {label} {bad!r} (allowed: {allowed})"
    if kind == "pattern":
        return f"{where}: {error.instance!r} has characters that are not allowed"
    if kind == "enum":
        return f"{where}: {error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if kind == "type":
        return f"{where}: expected {error.validator_value}, got {type(error.instance).__name__}"
    if kind == "oneOf":
        return f"{where}: invalid value {error.instance!r}"
    return f"{where}: {error.message}"


# What makes shlex.split differ from str.split on ASCII text: quotes, backslashes, and the
# whitespace str.split splits on and shlex does not (\v, \f, \x1c-\x1f).
_NOT_PLAIN = re.compile(r"['\"\\\x0b\x0c\x1c-\x1f]")


def _words(value: str | list[str], what: str, source: str) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(value)
    if value.isascii() and not _NOT_PLAIN.search(value):  # most aliases: shlex's answer, 20x faster
        return tuple(value.split())
    try:
        return tuple(shlex.split(value))
    except ValueError as err:
        raise RecipeError(f"{source}: {what}: cannot split {value!r}: {err}") from None


def recipe_from_dict(data: Any, source: str) -> Recipe:
    """Validate one parsed recipe document; errors name the file and the field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    _check_text(data, source)
    errors = _schema_errors(data)
    if errors:
        raise RecipeError(f"{source}: {_explain(errors[0])}")
    versions = []
    for version, spec in (data.get("versions") or {}).items():
        spec = {"tag": spec} if isinstance(spec, str) else spec
        versions.append(VersionPin(str(version), spec["tag"], spec.get("digest")))
    aliases = []
    for name, spec in (data.get("aliases") or {}).items():
        spec = spec if isinstance(spec, dict) else {"command": spec}
        argv = _words(spec["command"], f"aliases.{name}.command", source)
        if not argv:
            raise RecipeError(f"{source}: aliases.{name}: empty command")
        options = _words(spec.get("options", []), f"aliases.{name}.options", source)
        if name in generated_commands(data["name"]):
            # the generated wrapper of that name would silently replace the alias
            raise RecipeError(f"{source}: aliases.{name}: the name is taken by the generated {name} command")
        aliases.append(Alias(name, argv, options))
    select = None
    if "select" in data:
        rule = dict(data["select"])
        try:
            re.compile(rule["pattern"])
        except re.error as err:
            raise RecipeError(f"{source}: select.pattern: invalid regular expression: {err}") from None
        select = SelectRule(
            pattern=rule["pattern"],
            version=rule.get("version", "{version}"),
            versions=rule.get("versions", ""),
            newest=rule.get("newest", 3),
            per=rule.get("per", "version"),
            prefer=tuple(rule.get("prefer", ())),
            exclude=tuple(rule.get("exclude", ())),
        )
    if not versions and select is None:
        raise RecipeError(f"{source}: missing field 'versions' (or a 'select' rule)")
    features = Features(**_features(data, source))
    env = tuple((k, _env_value(v)) for k, v in (data.get("env") or {}).items())
    return Recipe(
        name=data["name"],
        image=data["image"],
        description=data["description"],
        url=data.get("url", ""),
        maintainer=data.get("maintainer", ""),
        keywords=tuple(data.get("keywords") or ()),
        versions=tuple(versions),
        select=select,
        aliases=tuple(aliases),
        env=env,
        features=features,
        bind=tuple(data.get("bind") or ()),
        source=source,
    )


# Top-level fields that are shorthands for a feature (issue 11 spells ``mpi: host`` and
# ``jupyter: true``; shpc's recipes keep such settings under ``features``).
_FEATURE_SHORTHANDS = ("mpi", "jupyter")


def _features(data: dict, source: str) -> dict:
    features = dict(data.get("features") or {})
    for key in _FEATURE_SHORTHANDS:
        if key in data:
            if key in features and features[key] != data[key]:
                raise RecipeError(f"{source}: {key}: {data[key]!r} contradicts features.{key}: {features[key]!r}")
            features[key] = data[key]
    return features


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _yaml_load(text: str, source: str) -> Any:
    from shpc_lite.yamlio import YamlRefused, load

    try:
        return load(text)
    except YamlRefused as err:
        where = f" line {err.line}" if err.line else ""
        raise RecipeError(f"{source}:{where}: malformed YAML: {err.problem}") from None


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    try:
        key = identity(path)
        if key in _LOADED:  # a batch asks for each recipe more than once (plan, install)
            return _LOADED[key]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read recipe: {getattr(err, 'strerror', None) or err}") from None
    recipe = _load_text(path, text)
    if key is not None:
        _LOADED[key] = recipe
    return recipe


# Recipes read by this process, by file identity: an edited file is read again.
_LOADED: dict[tuple, Recipe] = {}


def _load_text(path: Path, text: str) -> Recipe:
    recipe = recipe_from_dict(_yaml_load(text, str(path)), str(path))
    if recipe.name != path.stem:
        raise RecipeError(f"{path}: name {recipe.name!r} does not match the file name {path.stem!r}")
    return recipe


class RecipeIndex:
    """Recipes found in an ordered list of directories; earlier directories win."""

    def __init__(self, dirs: Iterable[Path]):
        self.dirs = [Path(d).expanduser() for d in dirs]

    def _files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for directory in self.dirs:
            if not directory.is_dir():
                continue
            for path in sorted(directory.glob("*.yaml")):
                found.setdefault(path.stem, path)
        return found

    def names(self) -> list[str]:
        return sorted(self._files())

    def path(self, name: str) -> Path:
        if not SAFE_NAME.match(name):
            raise NotFoundError(f"unknown recipe {name!r}")
        for directory in self.dirs:
            candidate = directory / f"{name}.yaml"
            if candidate.is_file():
                return candidate
        raise NotFoundError(f"unknown recipe {name!r} (searched: {', '.join(map(str, self.dirs))})")

    def get(self, name: str) -> Recipe:
        return load_recipe(self.path(name))

    def all(self) -> Iterator[tuple[str, Recipe | RecipeError]]:
        """Every recipe or its error: one broken file must not hide the others."""
        for name, path in sorted(self._files().items()):
            try:
                yield name, load_recipe(path)
            except RecipeError as err:
                yield name, err


def recipe_index(config: Any) -> RecipeIndex:
    from shpc_lite.resources import builtin_registry

    return RecipeIndex([*config["registry"], builtin_registry()])


def split_spec(spec: str) -> tuple[str, Optional[str]]:
    """``NAME[:VERSION]`` -> (name, version or None), checked for safe characters."""
    name, _, version = spec.partition(":")
    if not SAFE_NAME.match(name):
        raise NotFoundError(f"invalid module name {name!r} (allowed: letters, digits and . _ + -)")
    if version and not SAFE_VERSION.match(version):
        raise NotFoundError(f"invalid version {version!r} (allowed: letters, digits and . _ + -)")
    return name, version or None
