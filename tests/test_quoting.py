"""The quoting helpers against the real interpreters: any string comes back out unchanged."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shpc_lite.quoting import lua_quote, sh_quote, tcl_quote

# Anything a YAML file or argv can carry: no NUL, no lone surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
NASTY = ["", "'", '"', "\\", "$(id)", "`id`", "${HOME}", "[exec id]", "]]", "{", "}", "a\nb", "\t", "*", "\x7f",
         "\x01", "]]--", "\\n", "end)", "; rm -rf /", "é€😀"]


def _roundtrip(argv: list[str], program: str) -> bytes:
    return subprocess.run(argv, input=program.encode(), capture_output=True, check=True, timeout=20).stdout


@pytest.mark.parametrize("value", NASTY)
def test_sh_quote_is_literal(value):
    assert _roundtrip(["dash", "-s"], f"printf %s {sh_quote(value)}") == value.encode()


@pytest.mark.skipif(not shutil.which("lua5.3"), reason="lua5.3 not installed (comes with Debian lmod)")
@pytest.mark.parametrize("value", NASTY)
def test_lua_quote_is_literal(value):
    assert _roundtrip(["lua5.3", "-"], f"io.write({lua_quote(value)})") == value.encode()


@pytest.mark.skipif(not shutil.which("tclsh8.6"), reason="tclsh8.6 not installed")
@pytest.mark.parametrize("value", NASTY)
def test_tcl_quote_is_literal(value):
    program = f"fconfigure stdout -translation binary -encoding utf-8\nputs -nonewline {tcl_quote(value)}"
    assert _roundtrip(["tclsh8.6"], "encoding system utf-8\n" + program) == value.encode()


@settings(max_examples=60, deadline=None)
@given(TEXT)
def test_all_three_quotings_roundtrip(value):
    assert _roundtrip(["dash", "-s"], f"printf %s {sh_quote(value)}") == value.encode()
    if shutil.which("lua5.3"):
        assert _roundtrip(["lua5.3", "-"], f"io.write({lua_quote(value)})") == value.encode()
    if shutil.which("tclsh8.6"):
        program = f"fconfigure stdout -translation binary -encoding utf-8\nputs -nonewline {tcl_quote(value)}"
        assert _roundtrip(["tclsh8.6"], "encoding system utf-8\n" + program) == value.encode()
