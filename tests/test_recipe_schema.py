"""The recipe schema's two validators: the compiled one (fastjsonschema, the fast path of a batch)
may only say yes where jsonschema (the one whose messages users see) says yes too."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shpc_lite.recipe import _fast_validator, _validator

# Values near the schema's edges: names and tags with a final newline (Python's $), empty
# strings, bools where numbers are wanted (True is an int), floats, nested odd shapes.
SCALARS = st.one_of(
    st.sampled_from(["", "a", "1.0", "v1\n", "a b", "x;y", "sha256:" + "a" * 64, "sha256:" + "a" * 63,
                     "nvidia", "host", "none", "major", "ghcr.io/a/b", "A", "_x", "é"]),
    st.text(max_size=6), st.integers(-2, 3), st.booleans(), st.floats(allow_nan=False, width=16), st.none())
KEYS = st.one_of(st.sampled_from(["tag", "digest", "command", "options", "gpu", "x11", "home", "jupyter", "mpi",
                                  "pattern", "newest", "per", "v1", "v1\n", "1a", "a-b", "A_B", "", "x y"]),
                 st.text(max_size=4), st.integers(0, 3))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(KEYS, inner, max_size=3)), max_leaves=8)
FIELDS = ["name", "image", "description", "url", "maintainer", "keywords", "versions", "select", "aliases",
          "env", "features", "bind", "mpi", "jupyter"]
BASE = {"name": "tool", "image": "ghcr.io/x/tool", "description": "a tool", "versions": {"1.0": "1.0"}}


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FIELDS + ["other"]), VALUES, max_size=4), st.booleans())
def test_fast_validator_accepts_only_what_jsonschema_accepts(fields, keep_base):
    doc = {**BASE, **fields} if keep_base else fields
    try:
        _fast_validator()(doc)
    except Exception:  # noqa: BLE001 - refused (or not handled): jsonschema decides then
        return
    assert not list(_validator().iter_errors(doc)), doc


FULL = {**BASE, "versions": {"1.0": "1.0", "2": {"tag": "2", "digest": "sha256:" + "b" * 64}},
        "aliases": {"t": "tool -v", "u": ["u", "x"], "w": {"command": "w", "options": "--nv"}},
        "env": {"A_B": 1, "C": "x", "D": True}, "features": {"gpu": "nvidia", "home": "/h", "x11": False},
        "select": {"pattern": "^v", "newest": 2, "per": "minor"}, "keywords": ["a", "b"], "bind": ["/a:/b"]}


def test_fast_validator_accepts_a_full_recipe():
    _fast_validator()(FULL)
    assert not list(_validator().iter_errors(FULL))


def _places(doc, where=()):
    """Every (path, container) of a document: where one value can be replaced."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield where + (key,)
            yield from _places(value, where + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield where + (i,)
            yield from _places(value, where + (i,))


PLACES = list(_places(FULL))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(PLACES), VALUES, st.one_of(st.none(), KEYS))
def test_one_changed_value_of_a_full_recipe(place, value, new_key):
    """One value (or, with ``new_key``, one key) deep in a valid recipe replaced: the fast
    validator says yes only where jsonschema does."""
    import copy

    doc = copy.deepcopy(FULL)
    parent = doc
    for part in place[:-1]:
        parent = parent[part]
    if new_key is not None and isinstance(parent, dict):
        parent[new_key] = parent.pop(place[-1])
    else:
        parent[place[-1]] = value
    try:
        _fast_validator()(doc)
    except Exception:  # noqa: BLE001
        return
    assert not list(_validator().iter_errors(doc)), doc


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab -_/.=$\t\r\n\x0b\x0c\x1c\x1f\u00a0\u2003é'\"\\#")), max_size=24))
def test_alias_words_split_as_shlex_does(text):
    """An alias given as one string is split as a shell would (shlex), whatever the fast path
    for plain text takes: quotes, backslashes and every kind of whitespace agree."""
    import shlex

    from shpc_lite.errors import RecipeError
    from shpc_lite.recipe import _words

    try:
        expected = tuple(shlex.split(text))
    except ValueError:
        with pytest.raises(RecipeError):
            _words(text, "aliases.x", "r.yaml")
        return
    assert _words(text, "aliases.x", "r.yaml") == expected
