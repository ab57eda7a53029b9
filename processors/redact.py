"""Redaction of secrets, emails, card numbers and phone numbers in free text.

Capture runs every attribute value, message, tool argument/result, error message
and event through :meth:`Redactor.redact` before anything is stored or sent on,
so the original text never leaves the capture stage.

>>> Redactor().redact("mail bob@example.com, key sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6")
('mail [REDACTED:email], key [REDACTED:secret]', 2)

Each kind is a few compiled regexes (vendor formats joined into one alternation)
whose match callbacks reject false positives (Luhn for cards, digit counts for
phones, character-class and entropy tests for generic tokens), each skipped when a
cheap test shows the text cannot match. Redaction is linear in the size of the text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from functools import partial
from re import Match
from typing import Any

KINDS = ("secrets", "emails", "cards", "phones")

TOKEN = "[REDACTED:{}]"
_SECRET = TOKEN.format("secret")
_CARD = TOKEN.format("card")
_PHONE = TOKEN.format("phone")

# Every pattern starts with a character class and then looks behind it (the "." is
# the character just read) so that a match only begins at the start of a run: with a
# class first, the regex engine skips straight to candidate positions (3-5x faster
# than a leading look-behind), and a long run without a match is scanned once.
_NA = r"(?<![A-Za-z0-9].)"  # the character before the one just read is not alphanumeric
# Vendor formats and bearer tokens, dispatched on their first letter, then (group g)
# any other run of token characters long enough to be a secret, judged by _looks_random.
_VENDOR = "|".join(
    [
        (
            rf"s{_NA}k(?:-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{{20,}}"  # Anthropic, OpenAI
            rf"|_(?:live|test)_[A-Za-z0-9]{{16,}})"
        ),  # Stripe secret
        rf"[pr]{_NA}k_(?:live|test)_[A-Za-z0-9]{{16,}}",  # Stripe
        rf"g{_NA}(?:h[pousr]_[A-Za-z0-9]{{30,255}}|ithub_pat_[A-Za-z0-9_]{{22,255}})",  # GitHub
        (
            rf"A{_NA}(?:(?:KIA|SIA)[A-Z0-9]{{16}}(?![A-Za-z0-9])"  # AWS access key id
            rf"|Iza[0-9A-Za-z_\-]{{35}})"
        ),  # Google API key
        rf"x{_NA}ox[bpasr]-[A-Za-z0-9\-]{{10,}}",  # Slack
        rf"e{_NA}yJ[A-Za-z0-9_\-]{{8,}}\.eyJ[A-Za-z0-9_\-]{{8,}}\.[A-Za-z0-9_\-]*",  # JWT
        rf"[bB]{_NA}(?i:earer)\s+(?P<v>[A-Za-z0-9\-._~+/]{{8,}}=*)",  # "Bearer " stays
    ]
)
_T = r"[A-Za-z0-9+/_\-]"
_SECRETS = re.compile(rf"{_VENDOR}|(?P<g>{_T}(?<!{_T}.){_T}{{19,}}={{0,2}})")
_VENDOR_ONLY = re.compile(_VENDOR)
_SECRET_MIN_CHUNK = 15  # the shortest match of _SECRETS but a bearer token: "xoxb-" + 10
# key=value assignments: find the operator, then look for a key name just before it.
# "password=", '"api_key": "' stay; the value (group w) is replaced.
_ASSIGN_OP = re.compile(r"[:=]\s*[\"']?(?P<w>[^\s\"'`,;&<>(){}\[\]]{3,})")
_KEY_BEFORE = re.compile(
    r"(?<![A-Za-z0-9])(?i:passw(?:or)?d|pwd|private[_\-]?key|secret|client[_\-]?secret|api[_\-]?key"
    r"|apikey|(?:access|auth|session|refresh|id)[_\-]?token)[\"']?\s*$"
)
_KEY_WINDOW = 40
# Parts of every key name of _KEY_BEFORE: JSON text without them holds no assignment to redact.
_KEY_PARTS = ("passw", "pwd", "private", "secret", "api", "token")
_L = r"[A-Za-z0-9._%+\-]"
_EMAILS = re.compile(
    rf"{_L}(?<!{_L}.){_L}{{0,63}}@[A-Za-z0-9](?:[A-Za-z0-9\-]{{0,62}}\.)+[A-Za-z]{{2,24}}(?![A-Za-z0-9\-])"
)
# Card numbers: a 13-19 digit run, or the printed groupings (4-4-4-4[-3], Amex 4-6-5).
# The first digit is 2-6 (the card networks), which keeps nanosecond timestamps out.
_CARDS = re.compile(
    r"[2-6](?<![\w\-.].)(?:\d{12,18}|\d{3}(?:[ \-]\d{4}){3}(?:[ \-]\d{3})?"
    r"|(?<=3)\d{3}[ \-]\d{6}[ \-]\d{5})(?![\w\-])"
)
# Phones: international (+CC ...), a parenthesised area code, North American 3-3-4, or
# a national number with its trunk 0 and groups. A plain digit run is an amount or an
# id, not a phone. Possessive repeats keep the scan linear.
_PHONES = re.compile(
    r"[+(0-9](?<![\w+\-.].)(?:"
    r"(?<=\+)\d{1,3}(?:[ .\-]?\(?\d{1,5}\)?){2,6}+"
    r"|(?<=\()\d{2,5}\)[ .\-]?\d{2,4}(?:[ .\-]?\d{2,4}){1,3}+"
    r"|(?<=\d)\d{2}(?P<s>[ .\-])\d{3}(?P=s)\d{4}"
    r"|(?<=0)\d{1,4}(?:[ \-]\d{2,8}){1,4}+"
    r")(?![\w\-])"
)

_DIGITS = re.compile(r"\d")
_HEX = re.compile(r"[0-9a-fA-F\-]+")
_WORDS = re.compile(r"[a-z]{3,}")

_CACHE_MAX_LEN = 256  # short values repeat (models, names, ids): cache them
_CACHE_MAX_ENTRIES = 50_000


def _may_hold_secret(text: str) -> bool:
    """False when no pattern of _SECRETS can match: none but "Bearer <token>" matches across
    whitespace or a quote, and every other match is at least _SECRET_MIN_CHUNK long. Plain
    prose and short values are settled by this C-speed test instead of the regex (~15 MB/s)."""
    if "earer" in text.lower():
        return True
    return max(map(len, text.replace('"', " ").split()), default=0) >= _SECRET_MIN_CHUNK


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` passes the Luhn checksum (card numbers do)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def shannon_entropy(s: str) -> float:
    """Bits per character of ``s``."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _looks_random(tok: str) -> bool:
    """A generic token is a secret when it mixes letter cases and digits like random text.

    Hex strings (trace and span ids, hashes, UUIDs) have one letter case and are
    kept. Identifiers and model names (``Meta-Llama-3-70B-Instruct``) change
    character class at word boundaries only, random text at most characters: so
    require frequent class changes (separators ignored), few lowercase words and
    a high entropy. Random 20-character tokens slip through a few percent of the
    time, 32-character ones about 1%: the vendor patterns are the main defence.
    """
    body = tok.rstrip("=")[:256]
    if _HEX.fullmatch(body):
        return False
    lower = upper = digit = changes = prev = 0
    for ch in body:
        if "a" <= ch <= "z":
            cls = 1
            lower += 1
        elif "A" <= ch <= "Z":
            cls = 2
            upper += 1
        elif "0" <= ch <= "9":
            cls = 3
            digit += 1
        else:
            continue
        if cls != prev:
            changes += 1
            prev = cls
    n = lower + upper + digit
    if not (lower and upper and digit) or changes < 0.4 * n:
        return False
    if sum(len(w) for w in _WORDS.findall(body)) >= 0.6 * n:  # mostly lowercase words
        return False
    return shannon_entropy(body) >= min(3.6, 0.8 * math.log2(len(body)))


class Redactor:
    """Replaces sensitive substrings with ``[REDACTED:<kind>]`` and counts them.

    ``kinds``: any of ``secrets``, ``emails``, ``cards``, ``phones``.
    ``extra_patterns``: further regexes; their matches become ``[REDACTED:custom]``.
    """

    def __init__(
        self, kinds: list[str] | None = None, extra_patterns: list[str] | None = None
    ) -> None:
        self.kinds = list(KINDS if kinds is None else kinds)
        self.extra_patterns = list(extra_patterns or [])
        for k in self.kinds:
            if k not in KINDS:
                raise ValueError(f"unknown redaction kind {k!r}, choose from {list(KINDS)}")
        try:
            extra = [re.compile(p) for p in self.extra_patterns]
        except re.error as e:
            raise ValueError(f"invalid extra redaction pattern: {e}") from None
        # (needs, step): ``needs`` is a cheap test that skips the step when the text
        # cannot match (no '@' means no email).
        steps: list[tuple[Callable[[str], Any] | None, Callable[[str], str]]] = []
        if "secrets" in self.kinds:
            steps.append((_may_hold_secret, partial(_SECRETS.sub, self._secret)))
            steps.append((lambda t: ":" in t or "=" in t, self._assignments))
        if "emails" in self.kinds:
            steps.append((lambda t: "@" in t, partial(_EMAILS.sub, self._fixed("email"))))
        if "cards" in self.kinds:
            steps.append((_DIGITS.search, partial(_CARDS.sub, self._card)))
        if "phones" in self.kinds:
            steps.append((_DIGITS.search, partial(_PHONES.sub, self._phone)))
        # what json_is_clean runs over whole JSON text (see there)
        self._json_steps = None if extra else [st for st in steps if st[1] != self._assignments]
        for rx in extra:
            steps.append((None, partial(rx.sub, self._fixed("custom"))))
        self._steps = steps
        self._count = 0
        self._cache: dict[str, tuple[str, int]] = {}

    def redact(self, text: str) -> tuple[str, int]:
        """Return ``(redacted text, number of redactions)``."""
        short = len(text) <= _CACHE_MAX_LEN
        if short:
            hit = self._cache.get(text)
            if hit is not None:
                return hit
        self._count = 0
        out = text
        if len(text) >= 6:  # nothing sensitive is shorter than "a@b.co"
            for needs, step in self._steps:
                if needs is None or needs(out):
                    out = step(out)
        result = (out, self._count)
        if short:
            if len(self._cache) >= _CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[text] = result
        return result

    def json_is_clean(self, text: str) -> bool:
        """True when no string inside the JSON ``text`` has anything to redact, tested on the
        whole text at once (one regex pass instead of one redaction per string).

        Sound only under conditions checked here: without backslashes every string's text is
        its slice of ``text``, and no built-in pattern can match across the ``"`` around it,
        whose context reads like the start or end of a string to every look-around; an
        assignment needs a key name inside its string, so text without one holds none. A
        custom pattern may behave otherwise (anchors), so with one this is always False.
        False means "maybe": redact the strings one by one.
        """
        if self._json_steps is None or "\\" in text:
            return False
        if "secrets" in self.kinds:
            lower = text.lower()
            if any(k in lower for k in _KEY_PARTS):
                return False
        self._count = 0
        for needs, step in self._json_steps:
            if needs is None or needs(text):
                step(text)
                if self._count:
                    return False
        return True

    # match callbacks: return the replacement, or the match itself to keep it

    def _fixed(self, kind: str) -> Callable[[Match[str]], str]:
        token = TOKEN.format(kind)

        def sub(m: Match[str]) -> str:
            self._count += 1
            return token

        return sub

    def _secret(self, m: Match[str]) -> str:
        g = m.lastgroup
        if g == "g":
            run = m.group(0)
            if not _looks_random(run):  # but a vendor secret may start inside the run
                return _VENDOR_ONLY.sub(self._secret, run)
        self._count += 1
        if g == "v":  # keep "Bearer "
            return m.group(0)[: m.start("v") - m.start()] + _SECRET
        return _SECRET

    def _assignments(self, text: str) -> str:
        parts: list[str] = []
        last = 0
        for m in _ASSIGN_OP.finditer(text):
            op = m.start()
            if _KEY_BEFORE.search(text, max(0, op - _KEY_WINDOW), op):
                parts += (text[last : m.start("w")], _SECRET)
                last = m.end()
                self._count += 1
        return "".join(parts) + text[last:] if parts else text

    def _card(self, m: Match[str]) -> str:
        s = m.group(0)
        digits = s.replace(" ", "").replace("-", "")
        if not 13 <= len(digits) <= 19 or not luhn_ok(digits):
            return s
        self._count += 1
        return _CARD

    def _phone(self, m: Match[str]) -> str:
        s = m.group(0)
        n = sum(ch.isdigit() for ch in s)
        if not 9 <= n <= 15:
            return s
        self._count += 1
        return _PHONE


def redact_value(value: Any, redactor: Redactor) -> Any:
    """``value`` with every string in it redacted (dicts and lists walked)."""
    if isinstance(value, str):
        return redactor.redact(value)[0]
    if isinstance(value, dict):
        return {str(k): redact_value(v, redactor) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v, redactor) for v in value]
    return value
