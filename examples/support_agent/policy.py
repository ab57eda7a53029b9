"""What the agent says next: the scripted policy (deterministic, no LLM) and the LLM policy.

Both read a :class:`ConversationState` and return a :class:`ModelReply` — text, or tool
calls — with the usage and latency a model call would report. The agent turns replies
into spans (``agent.py``).

Messages are kept as plain dicts in the chat-completions shape (``role``, ``content``,
``tool_calls`` with parsed ``arguments``; tool messages carry ``tool_call_id``, ``name``,
``error``), converted to the GenAI semantic-convention ``parts`` format for telemetry.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .behaviour import Behaviour
from .intents import Intent
from .tools import SCHEMAS

DIGITS_QUESTION = "Could you tell me the last four digits of your card?"
REFERENCE_QUESTION = (
    "Could you give me the transfer reference? You'll find it under Payments in the app."
)
# The last four digits where the user names them ("card number ending in 4821") ...
CARD_DIGITS = re.compile(
    r"(?:card number|last (?:4|four) digits)\D{0,30}?\b(\d{4})\b", re.IGNORECASE
)
# ... or in an answer to the agent's question ("It's 4821").
ANSWER_DIGITS = re.compile(r"\b(\d{4})\b")
TRANSFER_REF = re.compile(r"\bTR[ \-]?(\d{4,})\b", re.IGNORECASE)
CURRENCIES = [
    (re.compile(p, re.IGNORECASE), code)
    for p, code in (
        (r"\b(?:gbp|pounds?|sterling)\b|£", "GBP"),
        (r"\b(?:eur|euros?)\b|€|\b(?:paris|lisbon|madrid|berlin|rome)\b", "EUR"),
        (r"\b(?:usd|dollars?)\b|\$|\bthe us\b|\bnew york\b", "USD"),
    )
]
HUMAN_REQUEST = re.compile(
    r"\b(?:human|real person|a person|someone real|an agent|speak to someone|"
    r"talk to someone)\b",
    re.IGNORECASE,
)
APOLOGY = "I'm sorry, I couldn't {what} because of an error on our side. Please try again later."
FAILED_ACTION = {
    "lookup_transfer": "look up that transfer",
    "get_exchange_rate": "get the exchange rate just now",
}
HANDOFF = (
    "I've escalated this to a human agent (ticket {ticket}). Someone from our {queue} team "
    "will reply here within about {expected_wait_minutes} minutes."
)
RESPONSE_MODELS = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-08-06"}
TOOL_DEFINITION_TOKENS = 420  # the tool schemas sent with every call


def tokens(text: str) -> int:
    """A rough token count (4 characters a token), as a tokenizer would report it."""
    return max(1, round(len(text) / 4))


@dataclass
class ConversationState:
    """One conversation as the agent holds it between turns."""

    conversation_id: str
    intent: Intent | None  # the scripted policy's stand-in for understanding
    rng: random.Random
    data: dict[str, Any] = field(default_factory=dict)  # the customer's backend data
    history: list[dict[str, Any]] = field(default_factory=list)
    questions: int = 0  # clarifying questions to ask before acting
    asked: int = 0
    asked_digits: bool = False
    outcome: str = ""  # set when the agent ends the conversation

    def user_texts(self) -> list[str]:
        return [m["content"] for m in self.history if m["role"] == "user"]

    def new_call_id(self) -> str:
        return f"call_{self.rng.getrandbits(96):024x}"


@dataclass
class ModelReply:
    """One model call's answer: ``text`` or ``tool_calls``, with what the call cost."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    final: bool = False  # the agent considers the conversation finished
    outcome: str = ""  # resolved | errored | escalated (when final)
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: float = 0.0
    response_model: str = ""
    response_id: str = ""

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


class Policy(Protocol):
    def next(self, state: ConversationState) -> ModelReply: ...


# -- message formats --------------------------------------------------------------------------


def semconv_message(m: dict[str, Any]) -> dict[str, Any]:
    """One message in the GenAI semantic conventions' ``parts`` format."""
    if m["role"] == "tool":
        try:
            response: Any = json.loads(m["content"])
        except ValueError:
            response = m["content"]
        return {
            "role": "tool",
            "parts": [
                {"type": "tool_call_response", "id": m["tool_call_id"], "response": response}
            ],
        }
    parts: list[dict[str, Any]] = (
        [{"type": "text", "content": m["content"]}] if m.get("content") else []
    )
    parts += [
        {"type": "tool_call", "id": c["id"], "name": c["name"], "arguments": c["arguments"]}
        for c in m.get("tool_calls", [])
    ]
    return {"role": m["role"], "parts": parts}


def openai_message(m: dict[str, Any]) -> dict[str, Any]:
    """One message in the chat-completions request format."""
    if m["role"] == "tool":
        return {"role": "tool", "tool_call_id": m["tool_call_id"], "content": m["content"]}
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content") or None}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
            }
            for c in m["tool_calls"]
        ]
    return out


def tool_definitions(b: Behaviour) -> list[dict[str, Any]]:
    """The tools in chat-completions format, described by the config."""
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": b.tool_description(name),
                "parameters": schema,
            },
        }
        for name, (schema, _) in SCHEMAS.items()
        if name in b.tools
    ]


def last_tool_outcome(state: ConversationState, escalation_tool: str) -> str:
    """The outcome the tool results since the last user message imply."""
    for m in reversed(state.history):
        if m["role"] == "user":
            break
        if m["role"] == "tool":
            if m.get("error"):
                return "errored"
            if m["name"] == escalation_tool:
                return "escalated"
    return "resolved"


# -- the scripted policy ----------------------------------------------------------------------


def card_digits(text: str, answer: bool = False) -> str:
    """The card's last four digits in a user message (``answer``: a reply to the question)."""
    m = (ANSWER_DIGITS if answer else CARD_DIGITS).search(text)
    return m.group(1) if m else ""


def currency_pair(texts: list[str]) -> tuple[str, str]:
    """(base, quote): the account currency GBP, and the first other currency mentioned."""
    for text in texts:
        hits = sorted((m.start(), code) for rx, code in CURRENCIES for m in rx.finditer(text))
        others = [code for _, code in hits if code != "GBP"]
        if others:
            return "GBP", others[0]
    return "GBP", "EUR"


class ScriptedPolicy:
    """A deterministic agent that follows its :class:`Behaviour` (see ``behaviour.py``)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour

    def next(self, state: ConversationState) -> ModelReply:
        if state.intent is None:
            raise ValueError("the scripted policy needs the conversation's intent")
        last = state.history[-1]
        if last["role"] == "tool":
            reply = self._after_tool(state, state.intent, last)
        else:
            reply = self._after_user(state, state.intent, last["content"])
        return self._cost(state, reply)

    def _after_user(self, state: ConversationState, intent: Intent, text: str) -> ModelReply:
        b = self.behaviour
        if b.escalation_enabled and HUMAN_REQUEST.search(text):
            summary = state.user_texts()[0][:120]
            return self._call(
                state,
                b.escalation_tool,
                {"reason": "customer asked for a person", "summary": summary},
            )
        if state.asked < state.questions:
            state.asked += 1
            return ModelReply(text=intent.questions[state.asked - 1])
        args = dict(intent.args)
        if intent.kind == "card":
            # Without the carry-forward instruction, the prompt's "ask for the last four
            # digits" wins: only an answer to that question counts.
            found = [card_digits(t) for t in state.user_texts()] if b.carries_forward else []
            if state.asked_digits:
                found.append(card_digits(text, answer=True))
            digits = next((d for d in found if d), "")
            if not digits:
                state.asked_digits = True
                return ModelReply(text=DIGITS_QUESTION)
            args["card_last4"] = digits
        elif intent.kind == "transfer":
            m = next((m for m in map(TRANSFER_REF.search, state.user_texts()) if m), None)
            if m is None:
                return ModelReply(text=REFERENCE_QUESTION)
            args["transfer_id"] = f"TR-{m.group(1)}" if b.transfer_id_format else m.group(0)
        elif intent.kind == "fx":
            args["base"], args["quote"] = currency_pair(state.user_texts())
        return self._call(state, intent.tool, args)

    def _after_tool(
        self, state: ConversationState, intent: Intent, tool_msg: dict[str, Any]
    ) -> ModelReply:
        name = tool_msg["name"]
        if tool_msg.get("error"):
            what = FAILED_ACTION.get(name, "complete that")
            return ModelReply(text=APOLOGY.format(what=what), final=True, outcome="errored")
        result = json.loads(tool_msg["content"])
        if name == self.behaviour.escalation_tool:
            return ModelReply(text=HANDOFF.format(**result), final=True, outcome="escalated")
        call = next(
            c
            for m in reversed(state.history)
            for c in m.get("tool_calls", [])
            if c["id"] == tool_msg["tool_call_id"]
        )
        return ModelReply(
            text=intent.answer.format(**{**call["arguments"], **result}),
            final=True,
            outcome="resolved",
        )

    def _call(self, state: ConversationState, tool: str, args: dict[str, Any]) -> ModelReply:
        return ModelReply(tool_calls=[{"id": state.new_call_id(), "name": tool, "arguments": args}])

    def _cost(self, state: ConversationState, reply: ModelReply) -> ModelReply:
        """Usage and latency a model call producing ``reply`` would report."""
        b = self.behaviour
        sent = b.system_prompt + "".join(json.dumps(m) for m in state.history)
        reply.input_tokens = tokens(sent) + TOOL_DEFINITION_TOKENS
        reply.output_tokens = (
            tokens(reply.text) if reply.text else tokens(json.dumps(reply.tool_calls)) // 2 + 8
        )
        # time to first token plus ~14 ms a token, with a long tail; 300-1500 ms
        reply.latency_ms = min(
            1500.0, 300.0 + 14.0 * reply.output_tokens + state.rng.expovariate(1 / 120)
        )
        reply.response_model = RESPONSE_MODELS.get(b.model, b.model)
        reply.response_id = f"chatcmpl-{state.rng.getrandbits(96):024x}"
        return reply


# -- the LLM policy ---------------------------------------------------------------------------


class LLMPolicy:
    """A real model behind an OpenAI-compatible endpoint (``openai`` client)."""

    def __init__(self, behaviour: Behaviour, client: Any) -> None:
        self.behaviour = behaviour
        self.client = client

    def next(self, state: ConversationState) -> ModelReply:
        b = self.behaviour
        messages = [
            {"role": "system", "content": b.system_prompt},
            *(openai_message(m) for m in state.history),
        ]
        started = time.perf_counter()
        resp = self.client.chat.completions.create(
            model=b.model,
            messages=messages,
            tools=tool_definitions(b) or None,
            temperature=b.temperature,
            max_tokens=b.max_output_tokens,
        )
        latency_ms = (time.perf_counter() - started) * 1000.0
        msg = resp.choices[0].message
        calls = []
        for tc in msg.tool_calls or []:
            try:
                args = json.loads(tc.function.arguments or "{}")
            except ValueError:
                args = {"_raw": tc.function.arguments}
            calls.append({"id": tc.id, "name": tc.function.name, "arguments": args})
        text = msg.content or ""
        # A reply that asks nothing ends the conversation: the user has their answer.
        final = not calls and not text.rstrip().endswith("?")
        usage = resp.usage
        return ModelReply(
            text=text,
            tool_calls=calls,
            final=final,
            outcome=last_tool_outcome(state, b.escalation_tool) if final else "",
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            latency_ms=latency_ms,
            response_model=resp.model or b.model,
            response_id=resp.id or "",
        )
