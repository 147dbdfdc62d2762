"""The quoting helpers against the real interpreters: any string comes back out unchanged, also
inside a braced Tcl body, and comment text never ends its comment line."""

from __future__ import annotations

import subprocess
import unicodedata

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shpc_lite.quoting import FILTERS, UnsafeValueError, comment, lua_quote, sh_name, sh_quote, tcl_quote, word
from tests.needs import need_program

# Anything a YAML file or argv can carry: no NUL, no lone surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
NASTY = ["", "'", '"', "\\", "$(id)", "`id`", "${HOME}", "[exec id]", "]]", "{", "}", "a\nb", "\t", "*", "\x7f",
         "\x01", "]]--", "\\n", "end)", "; rm -rf /", "é€😀", "} ; exec id ; list {", "\\\n", "a\\", "\r", "\x1a",
         "\x85\u2028\u2029", "}\n}\n{", "\\{", "\\}", '\\"', "#", "--[[", "\\u0041"]


def _run(argv: list[str], program: str) -> bytes:
    return subprocess.run(argv, input=program.encode(), capture_output=True, check=True, timeout=20).stdout


def _sh(value: str) -> bytes:
    """The value printed by dash, after a comment line holding it."""
    return _run([need_program("dash"), "-s"], f"# {comment(value)}\nprintf %s {sh_quote(value)}")


def _lua(value: str) -> bytes:
    return _run([need_program("lua5.3"), "-"], f"-- {comment(value)}\nio.write({lua_quote(value)})")


TCL_BINARY = "encoding system utf-8\nfconfigure stdout -translation binary -encoding utf-8\n"


def _tcl(value: str) -> bytes:
    """Standalone word, then in a proc body and an if body (braced: braces are counted)."""
    word_ = tcl_quote(value)
    program = (f"{TCL_BINARY}## {comment(value)}\nputs -nonewline {word_}\n"
               f"proc p {{}} {{\n    puts -nonewline {word_}\n}}\np\n"
               f"if {{1}} {{ puts -nonewline {word_} }}\n")
    return _run([need_program("tclsh8.6")], program)


def _yaml(value: str) -> object:
    return yaml.safe_load(f"# {comment(value)}\nkey: 1\n")


def _check_all(value: str) -> None:
    assert _sh(value) == value.encode()
    assert _lua(value) == value.encode()
    assert _tcl(value) == value.encode() * 3
    assert _yaml(value) == {"key": 1}
    assert "\n" not in comment(value) and "\r" not in comment(value)


@pytest.mark.parametrize("value", NASTY)
def test_quoting_is_literal_in_sh_lua_tcl_and_comments(value):
    _check_all(value)


@settings(max_examples=60, deadline=None)
@given(TEXT)
def test_all_quotings_roundtrip(value):
    _check_all(value)


def test_brace_payload_cannot_close_a_braced_tcl_body(tmp_path):
    """The issue 9 description: inside ``proc ModulesHelp {} { puts stderr "..." }``."""
    sentinel = tmp_path / "PWN"
    value = f"harmless }} ; exec touch {sentinel} ; list {{"
    program = f"{TCL_BINARY}proc ModulesHelp {{}} {{\n    puts -nonewline {tcl_quote(value)}\n}}\nModulesHelp\n"
    assert _run([need_program("tclsh8.6")], program) == value.encode()
    assert not sentinel.exists()


def test_comment_backslash_does_not_continue_a_tcl_comment():
    """A Tcl comment ending in an odd number of backslashes swallows the next line."""
    out = _run([need_program("tclsh8.6")], f"{TCL_BINARY}## {comment('x' + chr(92))}\nputs -nonewline ok\n")
    assert out == b"ok"


def test_comment_escapes_every_line_breaking_character():
    """Every code point (surrogates and NUL aside): a comment escapes it exactly when it is a
    backslash or a control/line/paragraph separator (Unicode categories Cc, Zl, Zp); the rest
    is kept as is (the fast path for plain text must not let one through)."""
    for code in range(1, 0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        ch = chr(code)
        breaks = ch == "\\" or unicodedata.category(ch) in ("Cc", "Zl", "Zp")
        assert (comment(f"a{ch}b") != f"a{ch}b") == breaks, hex(code)


@pytest.mark.parametrize("check, good, bad", [
    (word, ["--nv", "exec", "0.1.0", "auto"], ["", "a b", "$(id)", "x\n", "a;b", "'"]),
    (sh_name, ["SINGULARITYENV_FOO", "_x1"], ["", "1A", "FOO\n", "A-B", "A=B", "$A"]),
])
def test_bare_words_are_checked_never_quoted(check, good, bad):
    for value in good:
        assert check(value) == value
    for value in bad:
        with pytest.raises(UnsafeValueError):
            check(value)


@pytest.mark.parametrize("name", ["sh", "lua", "tcl", "comment", "text"])
def test_nul_cannot_be_written(name):
    with pytest.raises(UnsafeValueError, match="NUL"):
        FILTERS[name]("a\0b")


def test_templates_refuse_a_value_without_a_quoting_filter():
    """A new ``{{ value }}`` written raw into a template fails at once (``finalize``)."""
    from shpc_lite.modules import _environment

    env = _environment()
    assert env.from_string("x={{ v|sh }} {{ v|tcl }} {{ v|lua }}").render(v="a b") == """x='a b' "a b" "a b\""""
    with pytest.raises(UnsafeValueError, match="not quoted"):
        env.from_string("x={{ v }}").render(v="a b")
    with pytest.raises(UnsafeValueError, match="not quoted"):
        env.from_string("x={{ v ~ 'y' }}").render(v="a b")
