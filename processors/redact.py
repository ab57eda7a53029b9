"""Redaction of secrets, emails, card numbers, IBANs and phone numbers in free text.

Capture runs every attribute value, message, tool argument/result, error message
and event through :meth:`Redactor.redact` before anything is stored or sent on,
so the original text never leaves the capture stage.

>>> Redactor().redact("mail bob@example.com, key sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6")
('mail [REDACTED:email], key [REDACTED:secret]', 2)

Each kind is a few compiled regexes (vendor formats joined into one alternation)
whose match callbacks reject false positives (Luhn for cards, mod-97 for IBANs, digit
counts for phones, character-class and entropy tests for generic tokens, provider ids
such as ``call_…``/``toolu_…`` kept), each skipped when a cheap test shows the text cannot
match. Redaction is linear in the size of the text. In JSON, a key naming a secret
(:meth:`Redactor.is_secret_key`) has its value replaced whatever it looks like.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from itertools import pairwise
from re import Match
from typing import Any

KINDS = ("secrets", "emails", "cards", "ibans", "phones")

TOKEN = "[REDACTED:{}]"
_SECRET = TOKEN.format("secret")
_CARD = TOKEN.format("card")
_IBAN = TOKEN.format("iban")
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
        rf"[bB]{_NA}(?i:earer|asic)\s+(?P<v>[A-Za-z0-9\-._~+/]{{8,}}=*)",  # "Bearer " stays
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
    r"(?<![A-Za-z0-9])(?i:passw(?:or)?d|passphrase|passcode|pwd|private[_\-]?key|secret"
    r"|client[_\-]?secret|(?:api|access|secret)[_\-]?key|apikey|token|authorization|cookie"
    r"|credentials?|(?:access|auth|session|refresh|id|bearer)[_\-]?token)[\"']?\s*$"
)
_KEY_WINDOW = 40
_AUTH_SCHEMES = frozenset({"bearer", "basic", "token", "digest"})  # the value follows them
# Parts of every key name of _KEY_BEFORE: JSON text without them holds no assignment to redact.
_KEY_PARTS = (
    *("passw", "passphrase", "passcode", "pwd", "private", "secret", "api", "token"),
    *("access", "authorization", "cookie", "credential"),
)
# Keys whose value is a secret wherever they sit in a JSON document: a word of the key (split
# at separators and case changes) names a secret, and no word says the value is about one
# (``max_tokens``, ``token_count``, ``password_policy`` hold no secret).
_KEY_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_SECRET_KEY_WORDS = frozenset(
    [
        "password",
        "passwd",
        "passphrase",
        "passcode",
        "pwd",
        "secret",
        "token",
        "apikey",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "pin",
        "cvv",
        "cvc",
    ]
)
_SECRET_KEY_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key")})
# Secret key words too common as substrings to test JSON text for (``shipping``): its keys are
# checked one by one when one occurs.
_SHORT_KEY_WORDS = ("pin", "cvv", "cvc")
_JSON_KEY = re.compile(r'"([^"\\]{1,64})"\s*:')
_NOT_SECRET_KEY_WORDS = frozenset(
    [
        "tokens",
        "count",
        "type",
        "kind",
        "limit",
        "usage",
        "length",
        "len",
        "max",
        "min",
        "expires",
        "expiry",
        "expiration",
        "ttl",
        "url",
        "uri",
        "endpoint",
        "name",
        "hint",
        "policy",
        "reset",
        "required",
        "field",
        "label",
        "id",
        "ids",
        "file",
        "path",
        "env",
        "var",
    ]
)
# "my password is X", "the PIN was X": a value said in words (not a common word after "is").
# The regex is tried only where str.find sees one of the words (a scan with an alternation of
# case-insensitive words at every position costs more than all other patterns together).
_PHRASE_WORDS = ("pass", "pin", "secret", "api key", "access key", "token")
_PHRASE = re.compile(
    r"(?<![A-Za-z0-9])(?i:password|passwd|passcode|passphrase|pin|secret|api key|access key|token)"
    r"(?:\s+(?:is|was|=|:)|\s*[:=])\s*[\"'`]?(?P<w>[^\s\"'`,;&<>(){}\[\]]{3,})"
)
_PHRASE_STOPWORDS = frozenset(
    [
        "not",
        "wrong",
        "incorrect",
        "invalid",
        "expired",
        "correct",
        "working",
        "missing",
        "empty",
        "too",
        "the",
        "a",
        "an",
        "still",
        "being",
        "required",
        "and",
        "or",
        "set",
        "reset",
        "changed",
        "locked",
        "case",
        "same",
        "different",
        "weak",
        "strong",
        "long",
        "short",
        "valid",
        "ok",
        "fine",
        "blank",
        "null",
        "none",
        "no",
        "yes",
        "now",
        "here",
        "there",
        "below",
        "above",
        "attached",
    ]
)
# AWS secret access keys: 40 characters of base64 without padding, near "aws" or "secret".
_AWS_SECRET = re.compile(r"[A-Za-z0-9/+](?<![A-Za-z0-9/+].)[A-Za-z0-9/+]{39}(?![A-Za-z0-9/+=])")
_AWS_CONTEXT = 80
# Vendor tokens that do not look random to _looks_random (hex bodies, letters only): a run
# of token characters that is one of them is a secret.
_KNOWN_RUN = re.compile(
    r"[0-9a-f]{32}-us\d{1,2}"  # Mailchimp
    r"|do[por]_v1_[a-f0-9]{64}"  # DigitalOcean
    r"|shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}"  # Shopify
    r"|dapi[a-f0-9]{32}(?:-\d+)?"  # Databricks
    r"|hf_[A-Za-z]{34}"  # Hugging Face
    r"|(?:SK|AC)[0-9a-fA-F]{32}"  # Twilio
    r"|npm_[A-Za-z0-9]{36}"  # npm
    r"|glpat-[A-Za-z0-9_\-]{20,}"  # GitLab
    r"|AKCp[A-Za-z0-9]{69}"  # Artifactory
)
# Private keys in PEM, and the password in a URL's user info (scheme://user:password@host).
_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*-----|$)", re.S
)
_URL_PASSWORD = re.compile(r"://[^\s:/@\"']{1,128}:(?P<w>[^\s/@\"']{1,256})@")
# Ids that providers give calls, messages and responses: random-looking but not secrets, and
# the ids that join a tool call to its result.
_PROVIDER_ID = re.compile(
    r"(?:call|toolu|srvtoolu|msg|resp|run|thread|asst|req|fc|rs|batch|step|chatcmpl|cmpl|file"
    r"|ft|evt|span|trace|conv|item)[_\-][A-Za-z0-9]"
)
_L = r"[A-Za-z0-9._%+\-]"
_EMAILS = re.compile(
    rf"{_L}(?<!{_L}.){_L}{{0,63}}@[A-Za-z0-9](?:[A-Za-z0-9\-]{{0,62}}\.)+[A-Za-z]{{2,24}}(?![A-Za-z0-9\-])"
)
# Card numbers: a 13-19 digit run, or the printed groupings (4-4-4-4[-3], Amex 4-6-5).
# The first digit is 2-6 (the card networks), which keeps nanosecond timestamps out.
_CARDS = re.compile(
    r"[2-6](?<![\w\-.].)(?:\d{12,18}|\d{3}(?:[ \-./]\d{4}){3}(?:[ \-./]\d{3})?"
    r"|(?<=3)\d{3}[ \-./]\d{6}[ \-./]\d{5})(?![\w\-]|[./]\d)"
)
_NOT_DIGIT = re.compile(r"\D")
# IBANs: country, check digits, then 11-30 letters/digits, in groups of four or not.
_IBANS = re.compile(
    r"[A-Z](?<![A-Za-z0-9].)[A-Z]\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"
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


def _may_hold_secret(text: str, lower: str | None = None) -> bool:
    """False when no pattern of _SECRETS can match: none but "Bearer <token>" matches across
    whitespace or a quote, and every other match is at least _SECRET_MIN_CHUNK long. Plain
    prose and short values are settled by this C-speed test instead of the regex (~15 MB/s)."""
    lower = text.lower() if lower is None else lower
    if "earer" in lower or "basic" in lower:
        return True
    return max(map(len, text.replace('"', " ").split()), default=0) >= _SECRET_MIN_CHUNK


def _apply(steps: Sequence[Callable[[str], str]], text: str) -> str:
    for step in steps:
        text = step(text)
    return text


def iban_ok(iban: str) -> bool:
    """True when ``iban`` (no spaces) passes the ISO 13616 mod-97 check."""
    if not 15 <= len(iban) <= 34:
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


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
            steps.append((None, self._secrets))
            steps.append((lambda t: ":" in t or "=" in t, self._assignments))
        if "emails" in self.kinds:
            steps.append((lambda t: "@" in t, partial(_EMAILS.sub, self._fixed("email"))))
        # numbers: one test for a digit settles all three
        numbers = [
            partial(rx.sub, fn)
            for kind, rx, fn in (
                ("cards", _CARDS, self._card),
                ("ibans", _IBANS, self._iban),
                ("phones", _PHONES, self._phone),
            )
            if kind in self.kinds
        ]
        if numbers:
            steps.append((_DIGITS.search, partial(_apply, numbers)))
        # what json_is_clean runs over whole JSON text (see there)
        self._json_steps = None if extra else [st for st in steps if st[1] != self._assignments]
        for rx in extra:
            steps.append((None, partial(rx.sub, self._fixed("custom"))))
        self._steps = steps
        self._count = 0
        self._cache: dict[str, tuple[str, int]] = {}
        self._secret_keys: dict[str, bool] = {}

    def is_secret_key(self, key: str) -> bool:
        """Whether a JSON key or attribute name holds a secret whatever its value looks like
        (``password``, ``apiKey``, ``Authorization``, ``session_token``; not ``max_tokens``)."""
        hit = self._secret_keys.get(key)
        if hit is None:
            words = [w.lower() for w in _KEY_WORD.findall(key)]
            hit = (
                "secrets" in self.kinds
                and not _NOT_SECRET_KEY_WORDS.intersection(words)
                and (
                    bool(_SECRET_KEY_WORDS.intersection(words))
                    or any(pair in _SECRET_KEY_PAIRS for pair in pairwise(words))
                )
            )
            if len(self._secret_keys) < _CACHE_MAX_ENTRIES:
                self._secret_keys[key] = hit
        return hit

    @staticmethod
    def redact_secret_value(value: Any) -> tuple[Any, int]:
        """``(value, redactions)`` for the value of a secret key: a string or number is
        replaced whole; booleans, empties and containers (the caller walks them) stay."""
        if isinstance(value, bool) or value is None or value == "":
            return value, 0
        if isinstance(value, (str, int, float)):
            return _SECRET, 1
        return value, 0

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
            if any(map(lower.__contains__, _KEY_PARTS)):
                return False
            if any(map(lower.__contains__, _SHORT_KEY_WORDS)) and any(
                map(self.is_secret_key, _JSON_KEY.findall(text))
            ):
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
            known = _KNOWN_RUN.fullmatch(run)
            if not known and (_PROVIDER_ID.match(run) or not _looks_random(run)):
                # but a vendor secret may start inside the run
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
            if m.group("w").lower() in _AUTH_SCHEMES:  # "Authorization: Bearer <token>"
                continue
            if _KEY_BEFORE.search(text, max(0, op - _KEY_WINDOW), op):
                parts += (text[last : m.start("w")], _SECRET)
                last = m.end()
                self._count += 1
        return "".join(parts) + text[last:] if parts else text

    def _secrets(self, text: str) -> str:
        """Secrets found by the words around them (phrases, AWS secret keys, PEM private keys,
        URL passwords), then by their shape (_SECRETS); one lowercase copy decides which to
        try. The worded ones go first: what they replace says "secret", which must not open
        the AWS test again."""
        lower = text.lower()
        if any(map(lower.__contains__, _PHRASE_WORDS)):
            text = self._phrases(text, lower)
            lower = text.lower()
        if len(text) >= 40 and ("aws" in lower or lower.count("secret") > lower.count(":secret]")):
            text = self._aws_secrets(text)
        if "private key" in lower:
            text = _PEM.sub(self._fixed("secret"), text)
        if "://" in text and "@" in text:
            text = self._url_passwords(text)
        if _may_hold_secret(text, lower):
            text = _SECRETS.sub(self._secret, text)
        return text

    def _phrases(self, text: str, lower: str) -> str:
        starts: list[int] = []
        for word in _PHRASE_WORDS:
            i = lower.find(word)
            while i >= 0:
                starts.append(i)
                i = lower.find(word, i + 1)
        parts: list[str] = []
        last = 0
        for i in sorted(starts):
            m = _PHRASE.match(text, i) if i >= last else None
            if m is None:
                continue
            word = m.group("w")
            if word.lower().rstrip(".!?") in _PHRASE_STOPWORDS or word.startswith("[REDACTED"):
                continue
            parts += (text[last : m.start("w")], _SECRET)
            last = m.end()
            self._count += 1
        return "".join(parts) + text[last:] if parts else text

    def _url_passwords(self, text: str) -> str:
        return _URL_PASSWORD.sub(self._keep_all_but_w, text)

    def _keep_all_but_w(self, m: Match[str]) -> str:
        if m.group("w").startswith("[REDACTED"):
            return m.group(0)
        self._count += 1
        return m.group(0)[: m.start("w") - m.start()] + _SECRET + "@"

    def _aws_secrets(self, text: str) -> str:
        parts: list[str] = []
        last = 0
        for m in _AWS_SECRET.finditer(text):
            key = m.group(0)
            context = text[max(0, m.start() - _AWS_CONTEXT) : m.start()].lower()
            mixed = not key.isalnum() or not (key.isupper() or key.islower() or key.isdigit())
            if (
                mixed
                and any(c.isdigit() for c in key)
                and ("aws" in context or "secret" in context)
            ):
                parts += (text[last : m.start()], _SECRET)
                last = m.end()
                self._count += 1
        return "".join(parts) + text[last:] if parts else text

    def _card(self, m: Match[str]) -> str:
        s = m.group(0)
        digits = _NOT_DIGIT.sub("", s)
        if not 13 <= len(digits) <= 19 or not luhn_ok(digits):
            return s
        self._count += 1
        return _CARD

    def _iban(self, m: Match[str]) -> str:
        s = m.group(0)
        if not iban_ok(s.replace(" ", "")):
            return s
        self._count += 1
        return _IBAN

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
