"""Kafka messages under the broker's size limit (``kafka.max_message_bytes``).

Stages carry many records per Kafka message (faust's per-message cost is high), and a
realistic GenAI conversation — the whole history on every model call — makes one
conversation's records reach a megabyte, the default limit of Kafka producers and brokers.
So:

* :func:`bundles` splits ``{conversation id: [records]}`` into as many
  ``{"v": 1, "conversations": {...}}`` messages as needed, each under the limit (a
  conversation's records may span several messages; the assembler merges by span id);
* :func:`fit` makes one record fit alone: the longest strings are cut, each with a marker
  saying how much was cut, until it fits; a record that cannot fit (``None``) is for the
  dead-letter topic.
"""

from __future__ import annotations

from typing import Any

import orjson

from processors.records import SCHEMA_VERSION, dumps

CUT_MARKER = "…[cut {} chars to fit the message size limit]"
MIN_KEEP = 256  # strings are never cut below this many characters
_HEAD = b'{"v":%d,"conversations":{' % SCHEMA_VERSION
_TAIL = b"}}"


def fit(record: Any, max_bytes: int) -> bytes | None:
    """``record`` serialised in at most ``max_bytes``, its longest strings cut if needed.

    >>> big = {"a": "x" * 5000, "b": "short"}
    >>> out = fit(big, 1000)
    >>> len(out) <= 1000, b"cut" in out, b"short" in out
    (True, True, True)
    >>> fit({"k": list(range(1000))}, 100) is None  # nothing to cut
    True
    """
    raw = dumps(record)
    if len(raw) <= max_bytes:
        return raw
    doc = orjson.loads(raw)
    while len(raw) > max_bytes:
        path, longest = _longest(doc)
        if path is None or len(longest) <= MIN_KEEP:
            return None
        excess = len(raw) - max_bytes
        keep = max(MIN_KEEP, len(longest) - excess - 64, len(longest) // 4)
        _set(doc, path, longest[:keep] + CUT_MARKER.format(len(longest) - keep))
        raw = dumps(doc)
    return raw


def _longest(doc: Any) -> tuple[list[Any] | None, str]:
    best: tuple[list[Any] | None, str] = (None, "")
    stack: list[tuple[list[Any], Any]] = [([], doc)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, str):
            if len(x) > len(best[1]):
                best = (path, x)
        elif isinstance(x, dict):
            stack.extend(([*path, k], v) for k, v in x.items())
        elif isinstance(x, list):
            stack.extend(([*path, i], v) for i, v in enumerate(x))
    return best


def _set(doc: Any, path: list[Any], value: str) -> None:
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


def bundles(
    groups: dict[str, list[Any]], max_bytes: int
) -> tuple[list[bytes], list[tuple[str, Any]]]:
    """``(messages, unfit)``: bundles of ``groups`` each at most ``max_bytes``, and the
    ``(conversation id, record)`` pairs that cannot fit even alone (dead-letter them)."""
    out: list[bytes] = []
    unfit: list[tuple[str, Any]] = []
    parts: list[bytes] = []  # b'"cid":[r1,r2]' pieces of the current message
    size = len(_HEAD) + len(_TAIL)
    for cid, records in groups.items():
        key = dumps(cid) + b":["
        room = max_bytes - len(_HEAD) - len(_TAIL) - len(key) - 1
        current: list[bytes] = []
        for rec in records:
            raw = fit(rec, room)
            if raw is None:
                unfit.append((cid, rec))
                continue
            extra = len(raw) + (1 if current else len(key) + 1 + (1 if parts else 0))
            if size + extra > max_bytes:
                if current:
                    parts.append(key + b",".join(current) + b"]")
                    current = []
                if parts:
                    out.append(_HEAD + b",".join(parts) + _TAIL)
                    parts = []
                size = len(_HEAD) + len(_TAIL)
                extra = len(raw) + len(key) + 1
            current.append(raw)
            size += extra
        if current:
            parts.append(key + b",".join(current) + b"]")
    if parts:
        out.append(_HEAD + b",".join(parts) + _TAIL)
    return out, unfit
