"""Quote any string as one literal word of sh, Lua or Tcl: user text never becomes code.

Each function is total over str (minus NUL, which no environment or argv can carry) and is
checked against the real interpreters in tests/test_quoting.py.
"""

from __future__ import annotations


def sh_quote(value: str) -> str:
    """POSIX single quotes: nothing inside is special except ' itself."""
    return "'" + str(value).replace("'", "'\\''") + "'"


_LUA_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def lua_quote(value: str) -> str:
    """A Lua 5.1 double-quoted string; control bytes as decimal escapes (\\ddd, 3 digits)."""
    out = []
    for ch in str(value):
        if ch in _LUA_ESCAPES:
            out.append(_LUA_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03d}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_TCL_ESCAPES = {"\\": "\\\\", '"': '\\"', "$": "\\$", "[": "\\[", "]": "\\]", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def tcl_quote(value: str) -> str:
    """A Tcl double-quoted word: $, [, \\ and " escaped, so no substitution can happen.

    Braces are not special inside double quotes; control bytes become 3-digit octal escapes.
    """
    out = []
    for ch in str(value):
        if ch in _TCL_ESCAPES:
            out.append(_TCL_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
