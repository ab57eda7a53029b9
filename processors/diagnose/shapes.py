"""Value shapes: the format pattern of a value, a tool call's arguments, and a text.

A shape is computed from a value and never is the value (``"12345678"`` -> ``digits(8)``), so
the diagnoser can count and compare formats and later layers can quote them safely.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_TEXT = 300  # the longest text kept from a conversation (an error, a message)

REDACTED = re.compile(r"\[REDACTED(?::([A-Za-z0-9_.\-]+))?\]")
EMAIL = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_SHAPES = [  # (pattern, shape); the first full match wins; {n} is the number of digits
    (REDACTED, None),
    (EMAIL, "email"),
    (_UUID, "uuid"),
    (re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ][\d:.]+Z?)?"), "date(iso)"),
    (re.compile(r"\d{1,2}/\d{1,2}/\d{2,4}"), "date(slash)"),
    (re.compile(r"\d+"), "digits({n})"),
    (re.compile(r"-?\d+\.\d+"), "decimal"),
    (re.compile(r"\d+(?:-\d+)+"), "digits-with-dash({n})"),
    (re.compile(r"\d+(?: \d+)+"), "digits-with-space({n})"),
    (re.compile(r"[A-Za-z]+"), "alpha"),
    (re.compile(r"[A-Za-z0-9]+"), "alnum"),
    (re.compile(r"[A-Za-z0-9]+(?:[\-_][A-Za-z0-9]+)+"), "alnum-with-dash"),
]

# A non-string value's shape by its type (bool before int: a bool is an int).
_TYPE_SHAPES: tuple[tuple[type, str], ...] = (
    (bool, "bool"),
    (int, "int"),
    (float, "float"),
    (list, "list"),
    (dict, "object"),
)
_WORD_SHAPES = ("null", "empty", "text")  # no value, a blank string, anything else


def _shape_words() -> re.Pattern[str]:
    """Every word :func:`value_shape` can return, as one pattern (a digit count up to 3 digits,
    a redaction kind up to 20 characters): what other layers may quote as a shape."""
    words = [re.escape(s).replace(re.escape("{n}"), r"\d{1,3}") for _, s in _SHAPES if s]
    words += [re.escape(s) for _, s in _TYPE_SHAPES] + list(_WORD_SHAPES)
    return re.compile("|".join([*words, r"redacted\([A-Za-z0-9_.\-]{1,20}\)"]))


SHAPE_WORD = _shape_words()


def value_shape(value: Any) -> str:
    """The format pattern of one argument value.

    >>> values = ("12345678", "ACC-1234-5678", "1234-5678", 3, None, "[REDACTED:email]")
    >>> [value_shape(v) for v in values]
    ['digits(8)', 'alnum-with-dash', 'digits-with-dash(8)', 'int', 'null', 'redacted(email)']
    """
    if value is None:
        return "null"
    for kind, shape in _TYPE_SHAPES:
        if isinstance(value, kind):
            return shape
    s = str(value).strip()
    if not s:
        return "empty"
    for pattern, word in _SHAPES:
        m = pattern.fullmatch(s)
        if m:
            if word is None:
                return f"redacted({m.group(1) or 'any'})"
            return word.format(n=sum(c.isdigit() for c in s))
    return "text"


def argument_shape(arguments: str) -> dict[str, str]:
    """``{argument: value shape}`` of a call's JSON arguments (``{"_raw": shape}`` if no object)."""
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return {"_raw": value_shape(arguments)}
    if not isinstance(parsed, dict):
        return {"_raw": value_shape(parsed)}
    return {str(k): value_shape(v) for k, v in sorted(parsed.items())}


def shape_key(shape: dict[str, str]) -> str:
    return json.dumps(shape, sort_keys=True, separators=(",", ":"))


_NORM_SUBS = [
    (REDACTED, "<redacted>"),
    (EMAIL, "<email>"),
    (re.compile(r"\d+"), "<n>"),
    (re.compile(r"\s+"), " "),
]


def normalize_text(text: str) -> str:
    """Lower-cased text with numbers, emails and redactions replaced, so variants group together.

    >>> normalize_text("Order  #1234 for bob@x.io?")
    'order #<n> for <email>?'
    """
    s = text.strip()
    for pattern, repl in _NORM_SUBS:
        s = pattern.sub(repl, s)
    return s.lower()[:MAX_TEXT]


def call_failed(call: Any) -> bool:
    return bool(call.error_type or call.error_message)


def call_error(call: Any) -> str:
    return " ".join(x for x in (call.error_type, call.error_message) if x)[:MAX_TEXT]


def is_timeout(text: str) -> bool:
    return re.search(r"time[ _\-]?d?[ _\-]?out", text, re.IGNORECASE) is not None
