"""What the agent asks for, and what the user already gave: the repeated-ask extraction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from processors.diagnose.shapes import EMAIL, REDACTED
from processors.records import Conversation


@dataclass(frozen=True)
class Thing:
    """One kind of information an agent may ask for."""

    name: str  # human form, used in summaries
    keyword: re.Pattern[str]  # how it is named in a question or next to a value
    value: re.Pattern[str] | None = None  # a value that identifies it without its name
    redaction_kinds: tuple[str, ...] = ()  # [REDACTED:kind] tokens that stand for it


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


THINGS: dict[str, Thing] = {
    "api_key": Thing(
        "API key",
        _rx(r"\b(?:api[ _\-]?key|api[ _\-]?token|access[ _\-]?token|secret[ _\-]?key)s?\b"),
        _rx(r"\bsk-[A-Za-z0-9_\-]{8,}"),
        ("secret",),
    ),
    "account_id": Thing("account ID", _rx(r"\baccount[ _\-]?(?:id|number|no\b|#)")),
    "email": Thing("email address", _rx(r"\be-?mail(?:[ _\-]?address)?\b"), EMAIL, ("email",)),
    "order_number": Thing("order number", _rx(r"\border[ _\-]?(?:id|number|no\b|#)")),
    "card_last4": Thing(
        "card number",
        _rx(r"\b(?:last[ \-]?(?:4|four)(?: digits)?|card[ _\-]?number)\b"),
        None,
        ("card",),
    ),
    "phone": Thing(
        "phone number", _rx(r"\b(?:phone|mobile|cell)(?:[ _\-]?number)?\b"), None, ("phone",)
    ),
    "name": Thing(
        "name",
        _rx(r"\b(?:full[ _\-]?name|your name|first[ _\-]?name|last[ _\-]?name)\b"),
        _rx(r"\bmy (?:full )?name is \w+"),
    ),
    "date_of_birth": Thing(
        "date of birth", _rx(r"\b(?:date[ _\-]?of[ _\-]?birth|birth[ _\-]?date|dob|birthday)\b")
    ),
}
# A value next to a thing's name: a redaction, an email, a digit run, an id with digits, a date.
_VALUE_TOKEN = re.compile(
    r"\[REDACTED(?::[^\]]*)?\]|[\w.+\-]+@[\w\-]+\.[\w.\-]+|\d[\d /\-]{2,}\d"
    r"|\b(?=[A-Za-z0-9\-_]*\d)[A-Za-z0-9][A-Za-z0-9\-_]{4,}\b"
)
REQUEST_CUE = _rx(
    r"\b(?:please|provide|share|send|give|enter|confirm|verify|need|tell me|what(?:'s| is) your"
    r"|may i have|can i have|could you|can you|would you)\b"
)
_SENTENCE = re.compile(r"(?<=[.?!])\s+|\n+")


def info_requests(text: str) -> set[str]:
    """The things an agent message asks for (a sentence naming it that is a question or a request).

    >>> sorted(info_requests("Thanks! Please provide your API key. What is your email?"))
    ['api_key', 'email']
    """
    found: set[str] = set()
    for sentence in _SENTENCE.split(text):
        if not (sentence.rstrip().endswith("?") or REQUEST_CUE.search(sentence)):
            continue
        if _VALUE_TOKEN.search(sentence):
            continue  # "checking order number 1234" states a value, it does not ask for one
        found.update(k for k, t in THINGS.items() if t.keyword.search(sentence))
    return found


def given_things(text: str) -> set[str]:
    """The things a user message (or a tool result) provides.

    Redaction happens in capture, so ``[REDACTED:secret]`` next to "API key" still counts as given.

    >>> sorted(given_things("my API key is [REDACTED:secret] and mail [REDACTED:email]"))
    ['api_key', 'email']
    """
    found = set()
    has_value = _VALUE_TOKEN.search(text) is not None
    kinds = {m.group(1) for m in REDACTED.finditer(text)}
    for key, thing in THINGS.items():
        if (
            (has_value and thing.keyword.search(text))
            or (thing.value and thing.value.search(text))
            or kinds.intersection(thing.redaction_kinds)
        ):
            found.add(key)
    return found


@dataclass(frozen=True)
class RepeatedAsk:
    """The agent asked at ``asked_turn`` for ``thing``, which the user gave at ``given_turn``."""

    thing: str
    given_turn: int
    asked_turn: int
    message: str
    trace_id: str
    last_turn: int  # the conversation's last user turn (the ask is in it: users stop there)


def _turns(conv: Conversation) -> list[tuple[int, Any]]:
    """Messages with their turn: 1-based count of user messages so far (0 before the first)."""
    turn, out = 0, []
    for m in conv.messages:
        if m.role == "user":
            turn += 1
        out.append((turn, m))
    return out


def repeated_asks(conv: Conversation) -> list[RepeatedAsk]:
    """Every agent request for information an earlier user message or tool result already held."""
    given: dict[str, int] = {}
    out = []
    turned = _turns(conv)
    last_turn = turned[-1][0] if turned else 0
    for turn, m in turned:
        if m.role in ("user", "tool"):
            for thing in given_things(m.content):
                given.setdefault(thing, turn)
        elif m.role == "assistant":
            for thing in sorted(info_requests(m.content)):
                if thing in given:
                    out.append(
                        RepeatedAsk(
                            thing,
                            given[thing],
                            turn,
                            m.content,
                            trace_of(m.trace_id, conv),
                            last_turn,
                        )
                    )
    return out


def trace_of(trace_id: str, conv: Conversation) -> str:
    return trace_id or (conv.trace_ids[0] if conv.trace_ids else "")
