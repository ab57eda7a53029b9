"""Redactor: planted canaries are replaced, ordinary text is left alone."""

from __future__ import annotations

import json
import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.redact import _SECRETS, Redactor, _may_hold_secret, luhn_ok

SECRETS = [
    "sk-9fK2mQ7xLp3RvT8wZ1nB4cY6dE5gH0jA",  # OpenAI, legacy
    "sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6dE5gH0jA_kLmN-oPqR",  # OpenAI project
    "sk-ant-api03-Xy7Qp2Lm9Rt4Wz8Nb3Kd6Mf1Jh5Gs0Vc",  # Anthropic
    "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",  # GitHub classic
    "gho_16C7e42F292c6912E7710c838347Ae178B4a",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTU",
    "AKIAIOSFODNN7EXAMPLE",  # AWS
    "xoxb-1234567890-abcdefghijKLMNOP",  # Slack
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",  # Stripe
    "pk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "AIzaSyD-9tSrke72PouQMnMX7a7eZSW0jkFMBWY",  # Google
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",  # JWT
    "x9Kq2LmP7vR4tZ8wB3nY6cD1qW5eR7tY",  # generic high entropy
]


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize(
    "template",
    [
        "{}",
        "key {} here",
        "export TOKEN='{}'",
        '{{"k": "{}"}}',
        "({})",
        "line\n{}\n",
        "url https://x.test/?k={}&a=1",
    ],
)
def test_secrets_are_redacted(secret: str, template: str) -> None:
    out, n = Redactor().redact(template.format(secret))
    assert secret not in out and n >= 1
    assert "[REDACTED:secret]" in out


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Authorization: Bearer abcDEF123456ghiJKL", "Authorization: Bearer [REDACTED:secret]"),
        ("password=hunter2!", "password=[REDACTED:secret]"),
        ("DB_PASSWORD=correcthorse", "DB_PASSWORD=[REDACTED:secret]"),
        ('{"api_key": "abc123xyz"}', '{"api_key": "[REDACTED:secret]"}'),
        ("client_secret: s3cr3tvalue ok", "client_secret: [REDACTED:secret] ok"),
        ("access_token=abc.def.ghi&x=1", "access_token=[REDACTED:secret]&x=1"),
        ("x-api-key-AKIAIOSFODNN7EXAMPLE", "x-api-key-[REDACTED:secret]"),
        ("mail bob.smith+tag@mail.example.co.uk now", "mail [REDACTED:email] now"),
        ("<alice@example.com>", "<[REDACTED:email]>"),
        ("card 4111 1111 1111 1111 ok", "card [REDACTED:card] ok"),
        ("card 4111-1111-1111-1111.", "card [REDACTED:card]."),
        ("card 5500005555555559", "card [REDACTED:card]"),
        ("amex 3782 822463 10005", "amex [REDACTED:card]"),
        ("call +1 (555) 123-4567 now", "call [REDACTED:phone] now"),
        ("call +44 20 7946 0958", "call [REDACTED:phone]"),
        ("call +15551234567.", "call [REDACTED:phone]."),
        ("call 555-123-4567", "call [REDACTED:phone]"),
        ("call (555) 123 4567", "call [REDACTED:phone]"),
        ("uk 020 7946 0958", "uk [REDACTED:phone]"),
        ("fr 06 12 34 56 78", "fr [REDACTED:phone]"),
    ],
)
def test_planted_canaries(text: str, expected: str) -> None:
    assert Redactor().redact(text) == (expected, 1)


@pytest.mark.parametrize(
    "text",
    [
        "trace 4bf92f3577b34da6a3ce929d0e0e4736 span 00f067aa0ba902b7",
        "uuid 123e4567-e89b-12d3-a456-426614174000 and 123E4567-E89B-12D3-A456-426614174000",
        "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "models Meta-Llama-3-70B-Instruct-Turbo claude-3-5-sonnet-20241022 gpt-4o-mini-2024-07-18",
        "mistralai/Mixtral-8x7B-Instruct-v0.1 and Qwen2.5-72B-Instruct",
        "in 2024 we paid $1,234,567.89 for 12345 units, order 100 200 300 400",
        "years 2023 2024 2025, date 2024-11-05T12:30:00Z, version 1.2.3, ip 192.168.100.200",
        "timestamp 1731000000000000000 and amount 4111111111111111111111",
        "card-like but Luhn-invalid 4111 1111 1111 1112",
        "call me at 5551234567, port 4317 and 4318, pid 123456789",
        "internationalization AbstractSingletonProxyFactoryBean getUser2FAStatusForAccount42",
        "Base64EncoderV2Factory HTTPServer2ConnectionPoolManager /Users/Bob/Documents/Report2024Q3.pdf",
        "the password is strong; max_tokens=512; tokens: 12; see the key points: one",
        "at user@localhost there is no domain",
        "[REDACTED:secret] [REDACTED:email] stay as they are",
        "",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert Redactor().redact(text) == (text, 0)


def test_counts_and_mixed_text() -> None:
    text = "a@b.co and c@d.io, key sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6, +1 555 123 4567"
    out, n = Redactor().redact(text)
    assert n == 4
    assert out == "[REDACTED:email] and [REDACTED:email], key [REDACTED:secret], [REDACTED:phone]"


def test_kinds_can_be_chosen() -> None:
    text = "bob@example.com 4111 1111 1111 1111 sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6 +44 20 7946 0958"
    assert (
        Redactor(["emails"]).redact(text)[0]
        == "[REDACTED:email] 4111 1111 1111 1111 sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6 +44 20 7946 0958"
    )
    assert Redactor([]).redact(text) == (text, 0)
    assert Redactor(["cards", "phones"]).redact(text)[1] == 2


def test_extra_patterns() -> None:
    r = Redactor(["emails"], extra_patterns=[r"EMP-\d{5}"])
    assert r.redact("employee EMP-12345 at x@y.org") == (
        "employee [REDACTED:custom] at [REDACTED:email]",
        2,
    )


@pytest.mark.parametrize("kinds, extra", [(["passwords"], []), (["emails"], ["(unclosed"])])
def test_bad_settings_raise(kinds: list[str], extra: list[str]) -> None:
    with pytest.raises(ValueError):
        Redactor(kinds, extra)


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")


def test_random_tokens_are_mostly_caught() -> None:
    """Generic detection is statistical: measure it on seeded random tokens."""
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits
    r = Redactor(["secrets"])
    for length, max_missed in ((24, 0.06), (32, 0.03), (48, 0.01)):
        missed = sum(
            r.redact("t " + "".join(rng.choice(alphabet) for _ in range(length)))[1] == 0
            for _ in range(1000)
        )
        assert missed / 1000 <= max_missed, length


def test_long_text_with_planted_secrets() -> None:
    rng = random.Random(3)
    words = [
        "the",
        "order",
        "arrived",
        "late",
        "and",
        "the",
        "invoice",
        "shows",
        "a",
        "different",
        "amount",
    ]
    body = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(2000)]
    for i, s in enumerate(SECRETS):
        body[i * 150] += f" {s} "
    body[1000] += " contact me at someone@example.org or +33 6 12 34 56 78 "
    out, n = Redactor().redact("\n".join(body))
    assert n == len(SECRETS) + 2
    assert not any(s in out for s in SECRETS) and "someone@" not in out


def test_long_runs_are_linear() -> None:
    """A 1 MB run of token characters, digits or email characters is one scan, not one per position."""
    r = Redactor()
    for text in ("a" * 1_000_000, "1" * 1_000_000, "a." * 500_000, "+1 " * 300_000, "x@" * 500_000):
        out, _ = r.redact(text)
        assert len(out) > 0


# -- the shortcuts: they skip work only where the full redaction would find nothing -----------

_PIECES = st.sampled_from(
    SECRETS
    + [s[:n] for s in SECRETS for n in (12, 15, 20)]
    + [
        "Bearer abcDEF123456",
        "bearer  x",
        "password=hunter2!",
        "api_key",
        ": ",
        "=",
        "bob@example.com",
        "4111 1111 1111 1111",
        "+44 20 7946 0958",
        "555-123-4567",
        "xoxb-1234567890",
        '"',
        "\n",
        " ",
        "\\n",
        "AKIAIOSFODNN7EXAMPL",
        "eyJhbGciOi.eyJzdWIiOi.x",
    ]
)
_TEXTS = st.lists(
    st.one_of(
        _PIECES,
        st.text(alphabet=string.ascii_letters + string.digits + " .-_+/@:=\"'\n", max_size=30),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(_TEXTS)
def test_secret_gate_never_skips_a_match(text: str) -> None:
    assert _SECRETS.search(text) is None or _may_hold_secret(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(_TEXTS, min_size=1, max_size=6), st.booleans(), st.booleans())
def test_clean_json_means_every_string_is_clean(
    leaves: list[str], compact: bool, ascii_only: bool
) -> None:
    doc = [{"role": "user", "parts": [{"type": "text", "content": leaf}]} for leaf in leaves]
    text = json.dumps(doc, separators=(",", ":") if compact else None, ensure_ascii=ascii_only)
    r = Redactor()
    if r.json_is_clean(text):
        assert all(r.redact(leaf)[1] == 0 for leaf in leaves), text


@pytest.mark.parametrize(
    "leaf",
    SECRETS
    + [
        "password=hunter2!",
        "mail bob@example.com",
        "card 4111 1111 1111 1111",
        "call +44 20 7946 0958",
        "line\\nsk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6",
    ],
)
def test_json_with_something_to_redact_is_not_clean(leaf: str) -> None:
    assert not Redactor().json_is_clean(json.dumps({"k": leaf}))


def test_json_is_never_clean_with_custom_patterns() -> None:
    assert Redactor().json_is_clean('{"k": "plain words"}')
    assert not Redactor(extra_patterns=[r"^plain"]).json_is_clean('{"k": "plain words"}')
