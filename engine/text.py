"""Strings from untrusted files, made safe to print.

Labels, names and error messages can come from a model's metadata or graph; printed raw, an
escape sequence in them would drive the user's terminal (move the cursor, rewrite earlier lines,
set the window title) and a bidirectional override would make text read differently from its
bytes. Every such string goes through :func:`printable` before it reaches a terminal or report.
"""

from __future__ import annotations

import unicodedata

# Cc: C0/C1 controls and DEL; Cf: format characters (bidi overrides, zero-width joiners);
# Zl/Zp: line and paragraph separators; Cs/Co/Cn: surrogates, private use, unassigned.
_UNSAFE = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def printable(value: object, keep_newlines: bool = False) -> str:
    """``str(value)`` with every control or format character written as a visible escape."""
    out = []
    for ch in str(value):
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif unicodedata.category(ch) in _UNSAFE:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
        else:
            out.append(ch)
    return "".join(out)
