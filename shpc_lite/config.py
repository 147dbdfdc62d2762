"""Layered settings: package defaults < system file < user file < SHPC_LITE_<KEY> env < flags.

Every value remembers where it came from, so ``config show`` can answer "why is it set so?".
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from shpc_lite.errors import ConfigError
from shpc_lite.module_systems import DEFAULT as DEFAULT_MODULE_SYSTEM, MODULE_SYSTEMS
from shpc_lite.runtimes import CHOICES as RUNTIME_KIND_CHOICES

if TYPE_CHECKING:
    from shpc_lite.layout import Layout

SYSTEM_CONFIG = "/etc/shpc-lite/config.yaml"
ENV_PREFIX = "SHPC_LITE_"


def _default_root() -> str:
    # Lazy: platformdirs is cheap, but keep it off the import path of modules that never need it.
    import platformdirs

    return platformdirs.user_data_dir("shpc-lite")


# key -> (default, kind, choices). Kinds: str, int, bool, list, map.
KEYS: dict[str, tuple[Any, str, tuple[str, ...]]] = {
    "root": (None, "str", ()),
    "central_root": ("", "str", ()),
    "module_system": (DEFAULT_MODULE_SYSTEM.name, "str", tuple(MODULE_SYSTEMS)),
    "runtime": ("singularity", "str", ()),
    "runtime_kind": ("auto", "str", RUNTIME_KIND_CHOICES),
    "runtime_module": ("", "str", ()),
    "bind_paths": ([], "list", ()),
    "gpu": ("auto", "str", ("auto", "always", "never")),
    "default_version": ("newest", "str", ("newest", "none")),
    "registry": ([], "list", ()),
    "mirrors": ({}, "map", ()),
    "insecure_registries": ([], "list", ()),
    "platform": ("", "str", ()),
    "puller": ("auto", "str", ("auto", "apptainer", "builtin")),
    "squashfs_compression": ("zstd", "str", ("zstd", "gzip", "xz", "lz4", "lzo")),
    "squashfs_level": (0, "int", ()),  # 0: the compressor's own default (zstd 3, gzip 9)
    # who writes the squashfs: auto (native for zstd and gzip, else mksquashfs), native, mksquashfs
    "squashfs_writer": ("auto", "str", ("auto", "native", "mksquashfs")),
    "group": ("", "str", ()),
    "file_mode": ("0644", "str", ()),
    "lustre_stripe_count": (0, "int", ()),
    "jobs": (4, "int", ()),
    "timeout": (60, "int", ()),
    "retries": (4, "int", ()),
    "spider_cache": (False, "bool", ()),
    "keep_blobs": (True, "bool", ()),  # false: layers are fetched into the pull's scratch dir, gone after it
    "lock_lease": (120, "int", ()),
    "package_cap": (500, "int", ()),
    # MPI with the host's stack (docs/environments.md): the site default a recipe's
    # ``features.mpi`` overrides, the host paths bound in and the env set inside for it.
    "mpi": ("none", "str", ("none", "host")),
    "mpi_binds": ([], "list", ()),
    "mpi_env": ({}, "map", ()),
    "batch_chunk": (256, "int", ()),
    "batch_workers": (0, "int", ()),  # 0: one per usable core (large batches only)
}

# Smallest sensible value of whole-number keys: a lease of 0 s would be lost at once, a timeout
# of 0 s fails every request; a negative package cap means nothing.
_MINIMUM = {"lock_lease": 1, "timeout": 1, "package_cap": 0, "batch_chunk": 1, "batch_workers": 0}

_ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check one value against its key's kind; strings from env/flags are parsed."""
    default, kind, choices = KEYS[key]
    bad = f"config: {where}: {key}: "
    if kind == "str":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(bad + f"expected a string, got {type(value).__name__}")
        value = str(value)
        if key == "root" and not value.strip():
            raise ConfigError(bad + "is empty (set it to a directory; it would be the current one)")
        if choices and value not in choices:
            raise ConfigError(bad + f"{value!r} is not one of {', '.join(choices)}")
        if key == "file_mode":
            try:
                int(value, 8)
            except ValueError:
                raise ConfigError(bad + f"{value!r} is not an octal mode such as 0644") from None
        return value
    if kind == "int":
        try:
            if isinstance(value, bool):
                raise ValueError(value)
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(bad + f"{value!r} is not a whole number") from None
        if key in _MINIMUM and number < _MINIMUM[key]:
            raise ConfigError(bad + f"{number} is too small: it must be at least {_MINIMUM[key]}")
        return number
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ConfigError(bad + f"{value!r} is not true or false")
    if kind == "list":
        if isinstance(value, str):
            seps = ",:" if key == "registry" else ","
            for sep in seps[1:]:
                value = value.replace(sep, seps[0])
            return [item.strip() for item in value.split(seps[0]) if item.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(bad + "expected a list of strings")
        return list(value)
    if kind == "map":
        if isinstance(value, str):  # env and --set: "host=url,host2=url2"
            pairs = [item.partition("=") for item in value.split(",") if item.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ConfigError(bad + "expected KEY=VALUE pairs separated by commas")
            return {k.strip(): v.strip() for k, _, v in pairs}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(bad + "expected a mapping of strings to strings")
        if key == "mpi_env":
            wrong = [name for name in value if not _ENV_NAME.match(name)]
            if wrong:
                raise ConfigError(bad + f"{wrong[0]!r} is not an environment variable name "
                                  "(letters, digits and _, not first a digit)")
        return dict(value)
    raise AssertionError(kind)


def _read_file(path: Path) -> dict[str, Any]:
    from shpc_lite.yamlio import YamlRefused, load

    try:
        with open(path, encoding="utf-8") as fh:
            data = load(fh.read())
    except FileNotFoundError:
        return {}
    except PermissionError:
        raise ConfigError(f"config: {path}: permission denied") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config: {path}: not UTF-8 text (byte {err.start})") from None
    except YamlRefused as err:
        line = f" line {err.line}" if err.line else ""
        raise ConfigError(f"config: {path}:{line}: invalid YAML: {err.problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path}: expected a mapping of keys to values")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"config: {path}: unknown key {unknown[0]!r}")
    return data


def user_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "shpc-lite" / "config.yaml"


def system_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("SHPC_LITE_SYSTEM_CONFIG") or SYSTEM_CONFIG)


@dataclass(frozen=True)
class Config:
    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @functools.cached_property
    def layout(self) -> "Layout":
        """Every on-disk name under this config's root, for its module system (made once: a
        batch asks for it thousands of times)."""
        from shpc_lite.layout import Layout

        return Layout(Path(self.values["root"]).expanduser(), MODULE_SYSTEMS[self.values["module_system"]])

    @property
    def central_layout(self) -> Optional["Layout"]:
        """The site's central tree a user's private tree reuses images from, if any."""
        central = self.values["central_root"]
        return self.layout.with_root(Path(central).expanduser()) if central else None

    @property
    def file_mode(self) -> int:
        return int(self.values["file_mode"], 8)

    def with_overrides(self, overrides: Mapping[str, Any], source: str) -> "Config":
        values, sources = dict(self.values), dict(self.sources)
        for key, value in overrides.items():
            values[key] = _coerce(key, value, source)
            sources[key] = source
        return Config(values, sources)

    def to_json(self) -> str:
        return json.dumps({k: {"value": self.values[k], "source": self.sources[k]} for k in KEYS}, indent=2)


def load_config(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ
) -> Config:
    """Merge all layers; ``flags`` maps config keys to command-line values (None = not given)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (default, _, _) in KEYS.items():
        values[key] = _default_root() if key == "root" else default
        sources[key] = "default"
    site_root = None
    for path in (system_config_path(environ), user_config_path(environ)):
        for key, value in _read_file(path).items():
            values[key] = _coerce(key, value, str(path))
            sources[key] = str(path)
        if site_root is None and sources["root"] != "default":
            site_root = values["root"]  # the system file's root is the site's central tree
    for key in KEYS:
        env = ENV_PREFIX + key.upper()
        if env in environ:
            values[key] = _coerce(key, environ[env], f"env {env}")
            sources[key] = f"env {env}"
    for key, value in (flags or {}).items():
        if value is not None and key != "user":
            values[key] = _coerce(key, value, f"flag --{key.replace('_', '-')}")
            sources[key] = f"flag --{key.replace('_', '-')}"
    if flags and flags.get("user"):
        # --user: a private tree in the user's data dir; the configured root becomes central.
        site_root = values["root"]
        values["root"], sources["root"] = _default_root(), "flag --user"
    root = Path(os.path.expanduser(values["root"]))
    if not root.is_absolute():
        values["root"] = str(root.resolve())
    if not values["central_root"] and site_root and Path(site_root) != Path(values["root"]):
        values["central_root"], sources["central_root"] = site_root, "the system config's root"
    _register_secrets(values)
    return Config(values, sources)


def _register_secrets(values: Mapping[str, Any]) -> None:
    """Mirror URLs may carry ``user:password@``: the scrubber knows the password from now on."""
    from shpc_lite.scrub import register_url

    for url in values["mirrors"].values():
        register_url(url)
