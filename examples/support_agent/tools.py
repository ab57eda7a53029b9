"""Bankly's backend as the agent's tools see it: simulated, deterministic given an rng.

A tool returns its result or its error together with how long it took (simulated
milliseconds); the agent's harness applies the timeout from ``config/agent.yaml``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

TRANSFER_ID = re.compile(r"TR-\d+")
CARD_LAST4 = re.compile(r"\d{4}")

# Interbank mid rates the simulated rates service quotes around.
RATES = {
    ("GBP", "EUR"): 1.168,
    ("GBP", "USD"): 1.271,
    ("EUR", "GBP"): 0.856,
    ("USD", "GBP"): 0.787,
    ("EUR", "USD"): 1.088,
    ("USD", "EUR"): 0.919,
}

# (parameters JSON schema, simulated latency range in ms)
_CARD = {
    "type": "object",
    "properties": {"card_last4": {"type": "string"}},
    "required": ["card_last4"],
}
SCHEMAS: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {
    "track_card_delivery": (_CARD, (120, 420)),
    "freeze_card": (_CARD, (150, 380)),
    "lookup_transfer": (
        {
            "type": "object",
            "properties": {"transfer_id": {"type": "string"}},
            "required": ["transfer_id"],
        },
        (140, 450),
    ),
    "get_exchange_rate": (
        {
            "type": "object",
            "properties": {"base": {"type": "string"}, "quote": {"type": "string"}},
            "required": ["base", "quote"],
        },
        (650, 970),
    ),
    "get_top_up_status": (
        {"type": "object", "properties": {"top_up": {"type": "string"}}},
        (100, 320),
    ),
    "get_fee_schedule": ({"type": "object", "properties": {"fee": {"type": "string"}}}, (60, 200)),
    "start_identity_check": (
        {"type": "object", "properties": {"channel": {"type": "string"}}},
        (200, 600),
    ),
    "search_help_center": (
        {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        (150, 500),
    ),
    "escalate_to_human": (
        {
            "type": "object",
            "properties": {"reason": {"type": "string"}, "summary": {"type": "string"}},
            "required": ["reason"],
        },
        (80, 250),
    ),
}
# The rates service answers from its cache this often, well within any timeout.
RATE_CACHE_HIT = 0.1


@dataclass(frozen=True)
class ToolRun:
    """What a tool call did: ``result`` or an error, and its simulated duration."""

    latency_ms: float
    result: dict[str, Any] | None = None
    error_type: str = ""
    error_message: str = ""


def realise(data: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The backend's data for one customer: a list value is one of its options."""
    return {k: rng.choice(v) if isinstance(v, list) else v for k, v in data.items()}


def call_tool(name: str, args: dict[str, Any], data: dict[str, Any], rng: random.Random) -> ToolRun:
    """Run tool ``name`` on ``args`` against the customer's backend ``data``."""
    if name not in SCHEMAS:
        return ToolRun(5.0, error_type="KeyError", error_message=f"unknown tool {name!r}")
    lo, hi = SCHEMAS[name][1]
    if name == "get_exchange_rate" and rng.random() < RATE_CACHE_HIT:
        lo, hi = 180, 450
    latency = float(rng.randint(lo, hi))
    try:
        return ToolRun(latency, result=_result(name, args, data, rng))
    except (ValueError, KeyError) as e:
        return ToolRun(latency, error_type=type(e).__name__, error_message=str(e).strip("'\""))


def _result(
    name: str, args: dict[str, Any], data: dict[str, Any], rng: random.Random
) -> dict[str, Any]:
    if name == "lookup_transfer":
        tid = str(args.get("transfer_id", ""))
        if not TRANSFER_ID.fullmatch(tid):
            raise ValueError("invalid transfer_id format: expected TR-<digits>")
        return {"transfer_id": tid, **data}
    if name in ("track_card_delivery", "freeze_card"):
        last4 = str(args.get("card_last4", ""))
        if not CARD_LAST4.fullmatch(last4):
            raise ValueError("invalid card_last4: expected the last four digits of the card")
        return {"card_last4": last4, **data}
    if name == "get_exchange_rate":
        pair = (str(args.get("base", "")).upper(), str(args.get("quote", "")).upper())
        if pair not in RATES:
            raise ValueError(f"unsupported currency pair {pair[0]}/{pair[1]}")
        rate = round(RATES[pair] * rng.uniform(0.995, 1.005), 4)
        return {"base": pair[0], "quote": pair[1], "rate": rate}
    if name == "escalate_to_human":
        return {
            "ticket": f"ESC-{rng.randint(10000, 99999)}",
            "queue": data.get("queue", "support"),
            "expected_wait_minutes": rng.choice([5, 10, 15]),
        }
    return dict(data)
