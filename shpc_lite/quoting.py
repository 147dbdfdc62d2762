"""Every way a value is written into generated code, in one place: user text never becomes code.

Recipes are written by other people (an imported shpc registry, a colleague's directory), and
every user who loads a module runs its modulefile, so each output context has exactly one
function here, registered as a Jinja filter (``FILTERS``) and used by every template:

- ``sh``: one literal word of POSIX sh (wrappers).
- ``lua``: one Lua string literal (Lmod modulefiles, .modulerc.lua, lmodrc).
- ``tcl``: one Tcl word, safe both standalone and inside a braced body such as
  ``proc ModulesHelp {} { ... }`` (Tcl counts unescaped braces in a braced word even inside
  double quotes, so braces are escaped too).
- ``comment``: the text of a one-line comment in sh, Lua, Tcl or YAML (``#``, ``--``, ``##``).
- ``word`` / ``sh_name``: values written bare (``--nv``, ``exec``, an env variable name); they
  are checked, never quoted, so a value that would need quoting is a bug and raises.
- ``text``: prose that a template assembles and then quotes as a whole (the help text).

The templates' Jinja environment refuses any ``{{ value }}`` that did not pass through one of
these (``Quoted``), so a new template value cannot be written raw by accident.

The quoting functions are total over str minus NUL (which no file, environment or argv can
carry: recipes with NUL are refused on load) and are checked against the real interpreters
(dash, lua, tclsh) in tests/test_quoting.py.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable

from shpc_lite.errors import ShpcLiteError


class UnsafeValueError(ShpcLiteError):
    """A value reached a template context it cannot be written into (a bug: input is checked first)."""


class Quoted(str):
    """Text made safe for its output context by a function of this module (see ``finalize``)."""


def _text(value: Any) -> str:
    text = str(value)
    if "\0" in text:
        raise UnsafeValueError(f"cannot write a NUL byte into a generated file: {text!r}")
    return text


def sh_quote(value: Any) -> Quoted:
    """POSIX single quotes: nothing inside is special except ' itself."""
    return Quoted("'" + _text(value).replace("'", "'\\''") + "'")


def _double_quoted(value: Any, escapes: dict[str, str], special: re.Pattern, control: Callable[[int], str]) -> Quoted:
    """Escape what ``special`` matches (one character: from ``escapes``, else a control code);
    most values have nothing to escape and are quoted without a pass per character."""
    text = _text(value)
    if special.search(text):
        text = special.sub(lambda m: escapes.get(m.group()) or control(ord(m.group())), text)
    return Quoted('"' + text + '"')


def _special(escapes: dict[str, str]) -> re.Pattern:
    return re.compile("[" + "".join(re.escape(ch) for ch in escapes) + "\x00-\x1f\x7f]")


_COMMON = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_LUA_ESCAPES = dict(_COMMON)
# Braces are not special to a double-quoted word, but a braced body (proc, if) around it counts
# them: escaped they are literal in both places.
_TCL_ESCAPES = {**_COMMON, "$": "\\$", "[": "\\[", "]": "\\]", "{": "\\{", "}": "\\}"}
_LUA_SPECIAL, _TCL_SPECIAL = _special(_LUA_ESCAPES), _special(_TCL_ESCAPES)


def lua_quote(value: Any) -> Quoted:
    """A Lua double-quoted string; other control bytes as 3-digit decimal escapes (\\ddd)."""
    return _double_quoted(value, _LUA_ESCAPES, _LUA_SPECIAL, lambda code: f"\\{code:03d}")


def tcl_quote(value: Any) -> Quoted:
    """A Tcl double-quoted word with $, [, ], {, }, \\ and " escaped: no substitution happens
    and no brace of the value closes an enclosing braced body. Raw newlines never appear (no
    backslash-newline either); other control bytes become 3-digit octal escapes."""
    return _double_quoted(value, _TCL_ESCAPES, _TCL_SPECIAL, lambda code: f"\\{code:03o}")


def _breaks_line(ch: str) -> bool:
    """Control characters (NUL to US, DEL, C1 incl. NEL) and the Unicode line/paragraph separators:
    anything that ends a comment in one of sh, Lua (\\r), Tcl or YAML (\\x85, \\u2028, \\u2029)."""
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp")


# What ``comment`` changes: a backslash, and exactly the characters of categories Cc
# (U+0000-U+001F, U+007F-U+009F), Zl (U+2028) and Zp (U+2029) that ``_breaks_line`` finds.
_COMMENT_SPECIAL = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def comment(value: Any) -> Quoted:
    """Text for one comment line: control characters and line breaks shown as escapes, and
    backslashes doubled so the line never ends in a Tcl backslash-newline continuation."""
    text = _text(value)
    if not _COMMENT_SPECIAL.search(text):  # most values: nothing to change, no pass per character
        return Quoted(text)
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif _breaks_line(ch):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return Quoted("".join(out))


_WORD = re.compile(r"[A-Za-z0-9_.+-]+")
_SH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _checked(pattern: re.Pattern, what: str) -> Callable[[Any], Quoted]:
    def check(value: Any) -> Quoted:
        text = str(value)
        if not pattern.fullmatch(text):
            raise UnsafeValueError(f"{text!r} is not a valid {what} for a generated file")
        return Quoted(text)

    check.__doc__ = f"The value unchanged if it is a {what} (matches {pattern.pattern}), else an error."
    return check


word = _checked(_WORD, "bare word")
sh_name = _checked(_SH_NAME, "shell variable name")


def text(value: Any) -> Quoted:
    """Prose the template collects and then quotes as a whole (``{% set %}...|lua``): not
    quoted here, since the enclosing quoting covers it."""
    return Quoted(_text(value))


def finalize(value: Any) -> Any:
    """Jinja ``finalize``: every ``{{ ... }}`` must have been made safe by one of ``FILTERS``."""
    if isinstance(value, Quoted):
        return value
    raise UnsafeValueError(f"template value {value!r} was not quoted for its context (use a quoting filter)")


FILTERS: dict[str, Callable[[Any], Quoted]] = {
    "sh": sh_quote,
    "lua": lua_quote,
    "tcl": tcl_quote,
    "comment": comment,
    "word": word,
    "sh_name": sh_name,
    "text": text,
}
