"""Redaction of secrets, emails, card numbers and phone numbers in free text.

Capture runs every attribute value, message, tool argument/result, error message
and event through :meth:`Redactor.redact` before anything is stored or sent on,
so the original text never leaves the capture stage.

>>> Redactor().redact("mail bob@example.com, key sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6")
('mail [REDACTED:email], key [REDACTED:secret]', 2)

Each kind is one compiled regex (vendor formats joined into one alternation) whose
match callback rejects false positives (Luhn for cards, digit counts for phones,
character-class and entropy tests for generic tokens). Every pattern starts with a
look-behind that only lets a match begin at the start of a run of its characters,
so a long run with no match is scanned once, not once per position: redaction is
linear in the size of the text.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from re import Match, Pattern

KINDS = ("secrets", "emails", "cards", "phones")

TOKEN = "[REDACTED:{}]"
_SECRET = TOKEN.format("secret")
_CARD = TOKEN.format("card")
_PHONE = TOKEN.format("phone")

# Vendor formats, one alternation; each is a whole secret.
_VENDOR = [
    r"sk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}",     # Anthropic, OpenAI
    r"gh[pousr]_[A-Za-z0-9]{30,255}",                             # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{22,255}",
    r"(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])",                  # AWS access key id
    r"xox[bpasr]-[A-Za-z0-9\-]{10,}",                             # Slack
    r"(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",               # Stripe
    r"AIza[0-9A-Za-z_\-]{35}",                                    # Google API key
    r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",   # JWT
]
# A prefix kept as is ("Bearer ", "password=", '"api_key": "') and the value in group "v".
_ASSIGNED = (
    r"(?i:bearer)\s+(?P<v>[A-Za-z0-9\-._~+/]{8,}=*)"
    r"|(?<![A-Za-z0-9])(?i:passw(?:or)?d|pwd|secret|client[_\-]?secret|api[_\-]?key|apikey"
    r"|(?:access|auth|refresh|id|session|bearer)[_\-]?token|private[_\-]?key)"
    r"[\"']?\s*[:=]\s*[\"']?(?P<w>[^\s\"',;{}\[\]]{3,})"
)
_SECRETS = re.compile(rf"(?<![A-Za-z0-9_\-])(?:{'|'.join(_VENDOR)})|{_ASSIGNED}")
# Anything else that looks random (judged by _looks_random). A separate pass, so that
# a long run rejected here cannot hide a vendor secret inside it.
_TOKEN_CHARS = r"A-Za-z0-9+/_\-"
_GENERIC = re.compile(rf"(?<![{_TOKEN_CHARS}])[{_TOKEN_CHARS}]{{20,}}={{0,2}}")
_EMAILS = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}\.)+[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9\-])")
# Card numbers: a 13-19 digit run, or the printed groupings (4-4-4-4[-3], Amex 4-6-5).
# The first digit is 2-6 (the card networks), which keeps nanosecond timestamps out.
_CARDS = re.compile(
    r"(?<![\w\-.])(?:[2-6]\d{12,18}|[2-6]\d{3}(?:[ \-]\d{4}){3}(?:[ \-]\d{3})?"
    r"|3\d{3}[ \-]\d{6}[ \-]\d{5})(?![\w\-])")
# Phones: international (+CC ...), a parenthesised area code, North American 3-3-4,
# or a national number with its trunk 0 and groups. A plain digit run is an amount
# or an id, not a phone. Possessive repeats keep the scan linear.
_PHONES = re.compile(
    r"(?<![\w+\-.])(?:"
    r"\+\d{1,3}(?:[ .\-]?\(?\d{1,5}\)?){2,6}+"
    r"|\(\d{2,5}\)[ .\-]?\d{2,4}(?:[ .\-]?\d{2,4}){1,3}+"
    r"|\d{3}(?P<s>[ .\-])\d{3}(?P=s)\d{4}"
    r"|0\d{1,4}(?:[ \-]\d{2,8}){1,4}+"
    r")(?![\w\-])")

_DIGITS = re.compile(r"\d")
_HEX = re.compile(r"[0-9a-fA-F\-]+")
_WORDS = re.compile(r"[a-z]{3,}")

_CACHE_MAX_LEN = 256       # short values repeat (models, names, ids): cache them
_CACHE_MAX_ENTRIES = 50_000


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
    if sum(len(w) for w in _WORDS.findall(body)) >= 0.6 * n:     # mostly lowercase words
        return False
    return shannon_entropy(body) >= min(3.6, 0.8 * math.log2(len(body)))


class Redactor:
    """Replaces sensitive substrings with ``[REDACTED:<kind>]`` and counts them.

    ``kinds``: any of ``secrets``, ``emails``, ``cards``, ``phones``.
    ``extra_patterns``: further regexes; their matches become ``[REDACTED:custom]``.
    """

    def __init__(self, kinds: list[str] | None = None, extra_patterns: list[str] | None = None) -> None:
        self.kinds = list(KINDS if kinds is None else kinds)
        self.extra_patterns = list(extra_patterns or [])
        for k in self.kinds:
            if k not in KINDS:
                raise ValueError(f"unknown redaction kind {k!r}, choose from {list(KINDS)}")
        try:
            extra = [re.compile(p) for p in self.extra_patterns]
        except re.error as e:
            raise ValueError(f"invalid extra redaction pattern: {e}") from None
        # (needs, pattern, callback): ``needs`` is a cheap test that skips the regex
        # when the text cannot contain a match (no '@' means no email).
        steps: list[tuple[Callable[[str], bool] | None, Pattern[str], Callable[[Match[str]], str]]] = []
        if "secrets" in self.kinds:
            steps.append((None, _SECRETS, self._assigned_or_vendor))
            steps.append((lambda t: len(t) >= 20, _GENERIC, self._generic))
        if "emails" in self.kinds:
            steps.append((lambda t: "@" in t, _EMAILS, self._fixed("email")))
        if "cards" in self.kinds:
            steps.append((_DIGITS.search, _CARDS, self._card))
        if "phones" in self.kinds:
            steps.append((_DIGITS.search, _PHONES, self._phone))
        for rx in extra:
            steps.append((None, rx, self._fixed("custom")))
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
        if len(text) >= 6:      # nothing sensitive is shorter than "a@b.co"
            for needs, rx, fn in self._steps:
                if needs is None or needs(out):
                    out = rx.sub(fn, out)
        result = (out, self._count)
        if short:
            if len(self._cache) >= _CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[text] = result
        return result

    # match callbacks: return the replacement, or the match itself to keep it

    def _fixed(self, kind: str) -> Callable[[Match[str]], str]:
        token = TOKEN.format(kind)

        def sub(m: Match[str]) -> str:
            self._count += 1
            return token
        return sub

    def _assigned_or_vendor(self, m: Match[str]) -> str:
        self._count += 1
        g = m.lastgroup
        if g:       # keep "Bearer " / "password=" so that the text still reads
            return m.group(0)[: m.start(g) - m.start()] + _SECRET
        return _SECRET

    def _generic(self, m: Match[str]) -> str:
        if not _looks_random(m.group(0)):
            return m.group(0)
        self._count += 1
        return _SECRET

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
