"""Text from files, made safe to print.

Metadata and names inside a model file, a run.json or an error message quoting them are
untrusted: an escape sequence there would reach the user's terminal (move the cursor, retitle
the window, hide lines). Everything printed from such sources goes through :func:`escape_control`.
"""
from __future__ import annotations

import re
import unicodedata

# C0 controls (tab included), DEL, C1 controls; plus the Unicode format characters that reorder
# or hide text (bidi overrides and isolates, zero-width marks, line/paragraph separators)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _escape(m: re.Match) -> str:
    ch = m.group(0)
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """``text`` with every control / invisible-formatting character written as ``\\xNN`` / ``\\uNNNN``.

    Backslashes are left alone (a Windows path stays readable); only characters that a terminal
    would act on, or that change how the rest of the line reads, are rewritten.
    """
    text = str(text)
    if _UNSAFE.search(text) is None and all(unicodedata.category(c) != "Cs" for c in text):
        return text
    out = _UNSAFE.sub(_escape, text)
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) == "Cs" else c for c in out)
