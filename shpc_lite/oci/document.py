"""Untrusted JSON documents from registries and images, parsed once and checked.

A registry (or a SIF someone handed us) decides what its manifests and image configs contain: a
document nested 200,000 deep, ``"Env": "x"`` or ``"Labels": [1, 2]`` must become one error line
naming the image or file, not a traceback from whatever code first touched the value. So every
such document goes through :func:`load_json` (UTF-8, JSON, nesting bounded) and an image config
through :func:`check_image_config` (the fields we use have the types the image spec gives them);
code after that can rely on the types.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Type

from ..errors import ShpcLiteError

# Real manifests and configs are 3-5 levels deep; anything past this is an attack or a bug,
# and would make later recursive code (json.dumps, repr) fail far from the cause.
MAX_DEPTH = 100

# The inner ``config`` fields used to build /.singularity.d and shown by inspect, with their types.
_STRING_LISTS = ("Env", "Entrypoint", "Cmd")


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep lists and objects nest in ``value`` (a scalar is 0), counting at most to
    ``limit + 1``; iterative, so any depth is safe to measure."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def load_json(data: bytes | str, what: str, error: Type[ShpcLiteError]) -> Any:
    """Parse a document; any failure is ``error`` with a message that starts with ``what``."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(text)
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8 text") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as err:
        raise error(f"{what} is not JSON ({_short(err)})") from None
    if nesting_depth(value) > MAX_DEPTH:
        raise error(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)")
    return value


def load_object(data: bytes | str, what: str, error: Type[ShpcLiteError]) -> dict:
    """:func:`load_json` for a document that must be a JSON object."""
    value = load_json(data, what, error)
    if not isinstance(value, dict):
        raise error(f"{what} is a JSON {_kind(value)}, not an object")
    return value


def check_inner_config(cfg: Any, what: str, error: Type[ShpcLiteError]) -> dict:
    """The ``config`` object of an image config, with its fields' types checked.

    ``Env``, ``Entrypoint`` and ``Cmd`` are lists of strings (a bare string is accepted for
    ``Entrypoint``/``Cmd``, as old Docker configs have it), ``WorkingDir`` a string, ``Labels`` an
    object of strings; each may be null or absent.
    """
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise error(f"{what}: config is a JSON {_kind(cfg)}, not an object")
    for key in _STRING_LISTS:
        value = cfg.get(key)
        if value is None or (isinstance(value, str) and key != "Env"):
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise error(f"{what}: config {key} must be a list of strings, not {_sample(value)}")
    workdir = cfg.get("WorkingDir")
    if workdir is not None and not isinstance(workdir, str):
        raise error(f"{what}: config WorkingDir must be a string, not {_sample(workdir)}")
    labels = cfg.get("Labels")
    if labels is not None and not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
        raise error(f"{what}: config Labels must be an object of strings, not {_sample(labels)}")
    return cfg


def check_image_config(value: Any, what: str, error: Type[ShpcLiteError]) -> dict:
    """An image config blob (``{"architecture", "os", "config": {...}, ...}``), checked."""
    if not isinstance(value, dict):
        raise error(f"{what} is a JSON {_kind(value)}, not an object")
    for key in ("architecture", "os", "created"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise error(f"{what}: {key} must be a string, not {_sample(value[key])}")
    check_inner_config(value.get("config"), what, error)
    return value


def inner_config(image_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``config`` object of an image config blob (or the object itself if already the inner one)."""
    cfg = image_config.get("config")
    if isinstance(cfg, Mapping):
        return cfg
    if any(k in image_config for k in ("Env", "Entrypoint", "Cmd", "WorkingDir", "Labels")):
        return image_config
    return {}


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _sample(value: Any) -> str:
    """A short description of a bad value for a message: its kind, and a few characters of it."""
    text = json.dumps(value, default=str) if nesting_depth(value) <= MAX_DEPTH else "..."
    return f"{_kind(value)} {text[:40]}{'...' if len(text) > 40 else ''}"


def _short(err: Optional[BaseException]) -> str:
    return str(err).split(":")[0][:80] if err else ""
