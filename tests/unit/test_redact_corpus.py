"""Redaction against a corpus of real-world formats (after detect-secrets' plugin list) and
personal data, property-tested: every planted value goes, provider ids and ordinary text stay."""

from __future__ import annotations

import json
import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.redact import Redactor, iban_ok, luhn_ok

# (name, text, the part that must not survive)
SECRETS = [
    ("aws access key id", "AKIAZ7QWERTY12345XYZ", "AKIAZ7QWERTY12345XYZ"),
    (
        "aws secret in env",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "aws secret in prose",
        "here is my aws key pair: AKIAZ7QWERTY12345XYZ and wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "aws secret in ini",
        "[default]\naws_secret_access_key = Zx9/Kq2LmP7vR4tZ8wB3nY6cD1qW5eR7tYuI0oP1",
        "Zx9/Kq2LmP7vR4tZ8wB3nY6cD1qW5eR7tYuI0oP1",
    ),
    (
        "azure storage key",
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey="
        "lJzRc1YdHaAA2KCNJJ1tkYwF/+mKK6Ygw0NGe170Xu592euJv2wYUtBlV8z+qnlcNQSnIYVTkLWntUO1F8j8rQ==",
        "lJzRc1YdHaAA2KCNJJ1tkYwF",
    ),
    ("basic auth url", "connect to https://admin:Sup3rS3cret!@db.internal:5432/x", "Sup3rS3cret!"),
    ("basic auth header", "Authorization: Basic YWRtaW46aHVudGVyMg==", "YWRtaW46aHVudGVyMg"),
    ("bearer header", "Authorization: Bearer abcDEF123456ghiJKL", "abcDEF123456ghiJKL"),
    (
        "discord bot",
        "MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs",
        "ZnCjm1XVW7vRze4b7Cq4se7kKWs",
    ),
    (
        "github classic",
        "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
        "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    ),
    ("gitlab", "glpat-xxxxxxxxxxxxxxxxxxxx", "glpat-xxxxxxxxxxxxxxxxxxxx"),
    (
        "mailchimp",
        "mc key 3e6b8a1f9c2d4e5f6a7b8c9d0e1f2a3b-us12",
        "3e6b8a1f9c2d4e5f6a7b8c9d0e1f2a3b-us12",
    ),
    (
        "npm",
        "//registry.npmjs.org/:_authToken=npm_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
        "npm_a1B2",
    ),
    ("openai", "sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6dE5gH0jA_kLmN", "9fK2mQ7xLp3RvT8wZ1nB4cY6"),
    ("anthropic", "sk-ant-api03-Xy7Qp2Lm9Rt4Wz8Nb3Kd6Mf1Jh5Gs0Vc", "Xy7Qp2Lm9Rt4Wz8Nb3Kd6Mf1"),
    (
        "pypi",
        "pypi-AgEIcHlwaS5vcmcCJGI4YmNhMDA5LTg0Y2YtNDdjZi1hMmQ3LWI2NDhmODFmMDhmYQ",
        "AgEIcHlwaS5vcmcCJGI4YmNhMDA5",
    ),
    (
        "sendgrid",
        "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",
        "TwL2iGABf9DHoTf-09kqeF8tAmbihYzrnopKc",
    ),
    ("slack bot", "xoxb-1234567890-abcdefghijKLMNOP", "xoxb-1234567890-abcdefghijKLMNOP"),
    (
        "slack webhook",
        "https://hooks.slack.com/services/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",
        "x9Kq2LmP7vR4tZ8wB3nY6cD1",
    ),
    ("square", "sq0atp-a1B2c3D4e5F6g7H8i9J0kQ", "a1B2c3D4e5F6g7H8i9J0kQ"),
    ("stripe", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "4eC39HqLyjWDarjtT1zdp7dc"),
    (
        "telegram",
        "bot 123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",
        "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",
    ),
    ("twilio", "SK0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    ("google api", "AIzaSyD-9tSrke72PouQMnMX7a7eZSW0jkFMBWY", "9tSrke72PouQMnMX7a7eZSW0jkFMBWY"),
    (
        "hugging face",
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh",
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh",
    ),
    (
        "digitalocean",
        "dop_v1_" + "a1b2c3d4" * 8,
        "a1b2c3d4" * 8,
    ),
    ("shopify", "shpat_0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    ("databricks", "dapi0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    (
        "jwt",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "dozjgNryP4J3jVmNHl0w5N",
    ),
    (
        "private key",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu\nshort\n"
        "-----END RSA PRIVATE KEY-----",
        "short",
    ),
    ("password env", "DB_PASSWORD=hunter2single", "hunter2single"),
    ("passwd yaml", "passwd: hunter2single", "hunter2single"),
    ("token query", "GET /cb?token=hunter2single&x=1", "hunter2single"),
    ("cookie header", "Cookie: sessionid=Zx81kQ02", "Zx81kQ02"),
    ("my password is", "hi, my password is Hunter2Canary, can you reset it", "Hunter2Canary"),
    ("the pin was", "The PIN was 4821 when I set it", "4821"),
    ("passphrase", "my passphrase: correct-horse-battery-9", "correct-horse-battery-9"),
    ("api key phrase", "the api key is q8Zr2P1x", "q8Zr2P1x"),
]

PERSONAL = [
    ("email", "write to jane.doe+tag@mail.example.co.uk today", "jane.doe+tag@mail.example.co.uk"),
    ("card spaced", "card 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
    ("card dashes", "card 4111-1111-1111-1111", "4111-1111-1111-1111"),
    ("card dots", "card 5500.0000.0000.0004.", "5500.0000.0000.0004"),
    ("card slashes", "card 5500/0000/0000/0004", "5500/0000/0000/0004"),
    ("card plain", "card 5500000000000004", "5500000000000004"),
    ("card mixed", "card 5500 0000-0000.0004", "5500 0000-0000.0004"),
    ("amex", "amex 3782 822463 10005", "3782 822463 10005"),
    ("iban de", "IBAN DE89 3704 0044 0532 0130 00 please", "DE89 3704 0044 0532 0130 00"),
    ("iban gb", "GB29NWBK60161331926819", "GB29NWBK60161331926819"),
    ("iban fr", "FR14 2004 1010 0505 0001 3M02 606", "FR14 2004 1010 0505 0001 3M02 606"),
    ("phone intl", "call +44 20 7946 0958", "7946 0958"),
    ("phone us", "call (415) 555-2671", "555-2671"),
    ("phone us dashes", "call 415-555-2671", "415-555-2671"),
    ("phone fr", "fr 06 12 34 56 78", "06 12 34 56 78"),
    ("phone de", "+49 30 901820", "901820"),
]


@pytest.mark.parametrize(
    "name, text, needle",
    SECRETS + PERSONAL,
    ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None,
)
def test_corpus_is_redacted(name: str, text: str, needle: str) -> None:
    out, n = Redactor().redact(text)
    assert needle not in out, (name, out)
    assert n >= 1


# keys naming a secret, at any depth of JSON, whatever the value looks like
SECRET_KEYS = [
    "password", "passwd", "Password", "db_password", "secret", "client_secret", "token",
    "access_token", "refreshToken", "api_key", "apiKey", "X-API-Key", "authorization",
    "Authorization", "cookie", "Set-Cookie", "private_key", "credentials", "pin", "cvv",
    "aws_access_key", "session_token",
]  # fmt: skip
NOT_SECRET_KEYS = [
    "max_tokens", "input_tokens", "token_count", "tokens", "password_policy", "secret_name",
    "token_type", "id", "name", "query", "tool_call_id", "keyboard", "spinner", "pinned",
]  # fmt: skip


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_key_names(key: str) -> None:
    assert Redactor().is_secret_key(key)


@pytest.mark.parametrize("key", NOT_SECRET_KEYS)
def test_ordinary_key_names(key: str) -> None:
    assert not Redactor().is_secret_key(key)
    assert not Redactor(["emails"]).is_secret_key("password")  # secrets off: keys too


# provider ids are ids, not secrets (they join a tool call to its result)
PROVIDER_IDS = [
    "call_Qm3XkZ9pL2vR8tY4wB7nC1dF",
    "call_abc123XYZ789def456GHI0",
    "toolu_01A09q90qw90lq917835lq9",
    "toolu_01XFDUDYJgAACzvnptvVoYEL",
    "srvtoolu_014hJH82Qum7Td6UV8gDXThB",
    "chatcmpl-9Xz2K7mQp4LrT8vWb3Nc6Yd1Ef5Gh",
    "msg_01XFDUDYJgAACzvnptvVoYEL",
    "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    "fc_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "run_Ab3Cd5Ef7Gh9Ij1Kl3Mn5Op7",
    "thread_Ab3Cd5Ef7Gh9Ij1Kl3Mn5Op7",
]


@pytest.mark.parametrize("pid", PROVIDER_IDS)
def test_provider_ids_are_kept(pid: str) -> None:
    for text in (pid, f'{{"id": "{pid}"}}', f"tool result for {pid}: ok"):
        assert Redactor().redact(text) == (text, 0)


def test_openai_tool_call_ids_are_kept() -> None:
    """The issue's measure: 1,135 of 1,164 OpenAI tool-call ids were redacted."""
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits
    ids = ["call_" + "".join(rng.choice(alphabet) for _ in range(24)) for _ in range(1164)]
    r = Redactor()
    assert sum(r.redact(i)[1] for i in ids) == 0


KEEP = [
    "The order 1234 arrived on 2024-05-01 at 10:30.",
    "trace 4bf92f3577b34da6a3ce929d0e0e4736 span 00f067aa0ba902b7",
    "model Meta-Llama-3-70B-Instruct answered in 1.25 s",
    "my password is not working since yesterday",
    "the token is invalid",
    "version 4.4.0.1234567890123",
    "amount 1234.5678.9012.3456 is not a card (fails Luhn)",
    "order DE12 3456 7890 1234 5678 90",  # fails mod 97
    '{"max_tokens": 1024, "input_tokens": 37, "token_count": 5}',
    "see https://example.com/path?q=1",
    "sha 9fceb02d0ae598e95dc970b74767f19372d61af8",
]


@pytest.mark.parametrize("text", KEEP)
def test_ordinary_text_is_kept(text: str) -> None:
    assert Redactor().redact(text) == (text, 0)


def test_checksums() -> None:
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert iban_ok("GB29NWBK60161331926819")
    assert luhn_ok("5500000000000004") and not luhn_ok("5500000000000005")


# -- properties ---------------------------------------------------------------------------------


def _luhn_complete(body: str) -> str:
    for d in "0123456789":
        if luhn_ok(body + d):
            return body + d
    raise AssertionError


def _iban(country: str, bban: str) -> str:
    for check in range(100):
        cand = f"{country}{check:02d}{bban}"
        if iban_ok(cand):
            return cand
    raise AssertionError


_words = st.lists(
    st.sampled_from(["the", "a", "order", "late", "my", "please", "help", "now", "refund", "plan"]),
    max_size=8,
).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from("3456"),
    st.text("0123456789", min_size=14, max_size=14),
    st.sampled_from([" ", "-", ".", "/", ""]),
    _words,
    _words,
)
def test_any_luhn_card_with_any_separator_is_redacted(
    first: str, body: str, sep: str, before: str, after: str
) -> None:
    card = _luhn_complete(first + body)
    printed = sep.join(card[i : i + 4] for i in range(0, 16, 4))
    out, n = Redactor().redact(f"{before} {printed} {after}")
    assert printed not in out and card not in out.replace(sep, "") and n >= 1


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["DE", "GB", "FR", "NL", "ES", "IT", "CH"]),
    st.text("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=14, max_size=26),
    st.booleans(),
    _words,
)
def test_any_valid_iban_is_redacted(country: str, bban: str, grouped: bool, before: str) -> None:
    iban = _iban(country, bban)
    printed = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4)) if grouped else iban
    out, n = Redactor().redact(f"{before} IBAN {printed} thanks")
    assert printed not in out and n >= 1


_json_leaf = st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none())
_json = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "data", "user", "items", "cfg"]), inner, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    _json,
    st.sampled_from(SECRET_KEYS),
    st.text(string.ascii_letters + string.digits, min_size=6, max_size=20),
)
def test_secret_keys_at_any_depth(doc: object, key: str, value: str) -> None:
    """Plant {key: value} somewhere in a JSON document: capture's walk removes the value."""
    from processors.capture.core import Capture
    from processors.config import CaptureConfig

    planted = {"wrap": [doc, {"deep": {key: "Zq" + value}}]}
    cap = Capture(CaptureConfig())
    text = cap._text(json.dumps(planted))
    assert "Zq" + value not in text
    assert json.loads(text)["wrap"][1]["deep"][key] == "[REDACTED:secret]"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_redaction_is_total_and_idempotent(text: str) -> None:
    r = Redactor()
    once, _ = r.redact(text)
    assert r.redact(once) == (once, 0)
