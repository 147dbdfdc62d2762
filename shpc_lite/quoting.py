"""Quote any string as one literal word of sh, Lua or Tcl: user text never becomes code.

Each function is total over str (minus NUL, which no environment or argv can carry) and is
checked against the real interpreters in tests/test_quoting.py.
"""

from __future__ import annotations

from typing import Callable


def sh_quote(value: str) -> str:
    """POSIX single quotes: nothing inside is special except ' itself."""
    return "'" + str(value).replace("'", "'\\''") + "'"


def _double_quoted(value: str, escapes: dict[str, str], control: Callable[[int], str]) -> str:
    out = []
    for ch in str(value):
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(control(ord(ch)))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_COMMON = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_LUA_ESCAPES = dict(_COMMON)
_TCL_ESCAPES = {**_COMMON, "$": "\\$", "[": "\\[", "]": "\\]"}


def lua_quote(value: str) -> str:
    """A Lua double-quoted string; other control bytes as 3-digit decimal escapes (\\ddd)."""
    return _double_quoted(value, _LUA_ESCAPES, lambda code: f"\\{code:03d}")


def tcl_quote(value: str) -> str:
    """A Tcl double-quoted word: $, [, \\ and " escaped, so no substitution can happen.

    Braces are not special inside double quotes; other control bytes become 3-digit octal escapes.
    """
    return _double_quoted(value, _TCL_ESCAPES, lambda code: f"\\{code:03o}")
