"""Turn Singularity Registry HPC (shpc) ``container.yaml`` recipes into shpc-lite recipes.

Sites moving from shpc keep their registry: what a recipe offers (its tags and the digests shpc
recorded, its aliases, env and features) carries over; what shpc-lite does differently is said
per recipe instead of guessed. Pure functions: the CLI reads and writes the files.

- ``docker:`` images only; ``gh:``, ``oras:`` and ``path:`` (site-built SIFs) recipes are
  skipped (install a site-built SIF with ``install NAME:VERSION --sif``).
- ``tags`` become pinned versions (module version = tag, digest kept): every tag shpc offered,
  ``latest`` and pre-releases included, but not signature/attestation tags (they are no images).
- ``filter``, per-tag ``overrides`` and ``*_scripts`` are not converted (a note says so): write a
  ``select`` rule or extra aliases by hand.
- ``features.gpu: true`` means NVIDIA unless told otherwise (shpc decides that site-wide).
- An alias command using shell syntax (``$(...)``, pipes, globs) runs through ``sh -c`` inside
  the container, since shpc-lite never evaluates recipe text on the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from shpc_lite.errors import RecipeError, ReferenceError_
from shpc_lite.oci.reference import parse_reference
from shpc_lite.quoting import comment
from shpc_lite.recipe import SAFE_NAME, SAFE_VERSION, recipe_from_dict
from shpc_lite.tags import is_signature_tag
from shpc_lite.versions import version_key

UNSUPPORTED_SOURCES = {
    "gh": "images from GitHub releases (gh:) are not supported",
    "oras": "ORAS artifacts (oras:) are not supported",
    "path": "site-built SIF files (path:) are not pulled; install each with "
            "`shpc-lite install NAME:VERSION --sif FILE` from a recipe of your own",
}
NOT_CONVERTED = {
    "filter": "the tag filter was not converted: write a `select` rule (docs/recipes.md) to pick up new tags",
    "overrides": "per-tag alias overrides were not converted: every version gets the same aliases",
    "singularity_scripts": "custom wrapper scripts were not converted",
    "docker_scripts": "custom wrapper scripts were not converted",
}
SHELL_SYNTAX = re.compile(r"[$`|;&<>*?~()]")


class SkipRecipe(RecipeError):
    """An shpc recipe that cannot become a shpc-lite recipe; the message says why."""


@dataclass
class Converted:
    source: str
    image: str
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def convert(doc: Any, source: str, gpu: str = "nvidia") -> Converted:
    """One parsed ``container.yaml`` (without a name yet: see ``assign_names``)."""
    if not isinstance(doc, dict):
        raise SkipRecipe(f"{source}: not an shpc recipe (expected a mapping)")
    if not doc.get("docker"):
        kind = next((k for k in UNSUPPORTED_SOURCES if doc.get(k)), None)
        raise SkipRecipe(f"{source}: {UNSUPPORTED_SOURCES[kind] if kind else 'no docker: image'}")
    try:
        image = parse_reference(str(doc["docker"]))
    except ReferenceError_ as err:
        raise SkipRecipe(f"{source}: {err}") from None
    notes: list[str] = []
    versions: dict[str, dict[str, str]] = {}
    dropped = []
    for tag, digest in sorted((doc.get("tags") or {}).items(), key=lambda kv: version_key(str(kv[0]))):
        tag = str(tag)
        if is_signature_tag(tag) or not SAFE_VERSION.match(tag):
            dropped.append(tag)
            continue
        pin = {"tag": tag}
        if isinstance(digest, str) and digest.startswith("sha256:"):
            pin["digest"] = digest
        versions[tag] = pin
    if dropped:
        notes.append(f"left out {len(dropped)} signature or oddly named tag(s): {', '.join(map(repr, dropped[:4]))}"
                     + (" ..." if len(dropped) > 4 else ""))
    if not versions:
        raise SkipRecipe(f"{source}: no installable tags (only {', '.join(map(repr, dropped)) or 'none'})")
    aliases, bad = _aliases(doc.get("aliases"))
    if bad:
        notes.append(f"left out alias(es) with unsafe names: {', '.join(map(repr, bad))}")
    notes += [why for key, why in NOT_CONVERTED.items() if doc.get(key)]
    data: dict[str, Any] = {
        "image": image.name,
        "description": " ".join(str(doc.get("description") or image.name).split()),
    }
    for key in ("url", "maintainer"):
        if doc.get(key):
            data[key] = str(doc[key])
    data["versions"] = versions
    if aliases:
        data["aliases"] = aliases
    if doc.get("env"):
        data["env"] = {str(k): v if isinstance(v, (bool, int, float)) else str(v) for k, v in doc["env"].items()}
    features = _features(doc.get("features") or {}, gpu)
    if features:
        data["features"] = features
    return Converted(source, image.name, data, notes)


def _aliases(value: Any) -> tuple[dict[str, Any], list[str]]:
    """shpc aliases come as a mapping or as a list of {name, command}."""
    if isinstance(value, list):
        pairs: Iterable = ((a.get("name"), a.get("command")) for a in value if isinstance(a, dict))
    elif isinstance(value, dict):
        pairs = value.items()
    else:
        pairs = ()
    out: dict[str, Any] = {}
    bad = []
    for name, command in pairs:
        if not command:
            continue
        if name is None or not SAFE_NAME.match(str(name)):
            bad.append(str(name))
            continue
        command = str(command).strip()
        # shpc pasted the command into shell code, so `$(...)`, pipes and globs ran as shell;
        # shpc-lite passes words literally. Keep the meaning: a shell inside the container.
        out[str(name)] = ["sh", "-c", f'{command} "$@"', str(name)] if SHELL_SYNTAX.search(command) else command
    return out, bad


def _features(value: dict, gpu: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if value.get("gpu"):
        out["gpu"] = gpu
    if value.get("x11"):
        out["x11"] = True
    if value.get("home"):
        out["home"] = value["home"] if isinstance(value["home"], (bool, str)) else True
    return out


def assign_names(recipes: list[Converted]) -> list[tuple[str, Converted]]:
    """Short module names: the image's last path part (``python``, ``samtools``), qualified by
    its parent (``nvidia-pytorch``) where two different images would share one."""
    def parts(image: str) -> list[str]:
        repo = parse_reference(image).repository.split("/")
        return repo[1:] if repo[0] == "library" and len(repo) == 2 else repo

    short: dict[str, set[str]] = {}
    for recipe in recipes:
        short.setdefault(parts(recipe.image)[-1], set()).add(recipe.image)
    named = []
    for recipe in recipes:
        p = parts(recipe.image)
        name = p[-1] if len(short[p[-1]]) == 1 or len(p) == 1 else "-".join(p[-2:])
        named.append((name, recipe))
    return named


def finish(name: str, recipe: Converted) -> dict[str, Any]:
    """The recipe document, validated as shpc-lite will load it."""
    data = {"name": name, **recipe.data}
    recipe_from_dict(data, recipe.source)
    return data


def header(recipe: Converted) -> str:
    """Comment lines for the top of the written file. Each text goes through ``comment`` (line
    breaks escaped): a tag or path from the shpc recipe must never start a YAML line of its own."""
    lines = [f"Imported from shpc recipe {recipe.source} by `shpc-lite import-shpc`."]
    lines += [f"Note: {note}" for note in recipe.notes]
    return "".join(f"# {comment(line)}\n" for line in lines)


def document(recipe: Converted, data: dict[str, Any]) -> str:
    """The recipe file for ``data`` (from ``finish``): sanitised comment lines, then YAML written
    by the serializer only, never by formatting strings."""
    import yaml

    return header(recipe) + yaml.safe_dump(data, sort_keys=False, width=100)
