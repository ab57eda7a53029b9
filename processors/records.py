"""Records exchanged between stages on Kafka topics (the contract between stages).

Each record is a plain dataclass serialised as a versioned JSON document
(``{"v": 1, ...}``; capture's bundles of turn records carry ``"v"`` once, for the bundle).
Times are integer nanoseconds since the epoch (``*_ns``), as in OTLP.

The stages:

    otlp_spans/otlp_logs --capture--> TurnRecord            (closeloop.turns, key conversation_id)
    closeloop.turns      --assemble-> Conversation          (closeloop.conversations)
    closeloop.conversations --understand--> TagRecord       (closeloop.tags)
    closeloop.tags       --diagnose-> Diagnosis             (closeloop.diagnoses, key intent_id)
    closeloop.diagnoses  --act------> Proposal              (closeloop.proposals)
    human approve/reject --review---> ReviewRecord, Outcome (closeloop.reviews)
    any stage            ----------> DeadLetter             (closeloop.deadletter)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson

SCHEMA_VERSION = 1

T = TypeVar("T", bound="Record")


def _field_names(cls: type) -> tuple[str, ...]:
    """The field names of a record class (cached: classes are hashed by identity)."""
    return _FIELD_NAMES.get(cls) or _FIELD_NAMES.setdefault(
        cls, tuple(f.name for f in dataclasses.fields(cls))
    )


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _plain(obj: Any) -> Any:
    """Records to dicts, recursively (``dataclasses.asdict`` without its deep copies: the
    per-record cost matters at tens of thousands of records per second)."""
    if isinstance(obj, Record):
        return {name: _plain(getattr(obj, name)) for name in _field_names(type(obj))}
    if isinstance(obj, list):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _jsonable(x: Any) -> Any:
    """What orjson cannot serialize itself: numpy scalars and arrays."""
    if hasattr(x, "item") and hasattr(x, "ndim"):
        return x.tolist() if x.ndim else x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the wire format between stages (orjson: records are the hot path)."""
    return orjson.dumps(obj, default=_jsonable)


class Record:
    """Mixin: JSON (de)serialisation that ignores unknown keys (forward compatible)."""

    kind: ClassVar[str] = "record"

    def to_dict(self) -> dict[str, Any]:
        d = _plain(self)
        d["v"] = SCHEMA_VERSION
        return d

    def to_json(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        names = _field_names(cls)
        kwargs = {}
        for k, v in d.items():
            if k not in names:
                continue
            sub = _nested.get((cls.__name__, k))
            if sub is not None and v is not None:
                v = [sub.from_dict(x) for x in v] if isinstance(v, list) else sub.from_dict(v)
            kwargs[k] = v
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[T], raw: bytes | str) -> T:
        return cls.from_dict(orjson.loads(raw))


@dataclass
class ToolCall(Record):
    """One tool execution (a GenAI ``execute_tool`` span, or a tool call requested by the model)."""

    name: str
    call_id: str = ""
    arguments: str = ""  # JSON text as sent, redacted
    result: str = ""  # redacted
    error_type: str = ""
    error_message: str = ""
    span_id: str = ""
    trace_id: str = ""
    start_ns: int = 0
    duration_ms: float = 0.0


@dataclass
class Evaluation(Record):
    """An outcome stated about a conversation rather than guessed from it.

    From an OTel GenAI evaluation event (``gen_ai.evaluation.result``: a span event or a
    log record), from the ``closeloop.outcome`` span attribute (``name`` is then
    ``closeloop.outcome`` and ``label`` the outcome), or from late feedback
    (``closeloop feedback``, the feedback endpoint). ``score`` is None when none was given.
    """

    name: str = ""
    score: float | None = None
    label: str = ""
    explanation: str = ""  # redacted
    response_id: str = ""  # gen_ai.response.id of the answer judged, if given
    source: str = "event"  # event | log | attribute | feedback
    span_id: str = ""
    trace_id: str = ""
    ts_ns: int = 0


@dataclass
class Message(Record):
    """One message of a conversation, in order. ``role``: user | assistant | tool | system."""

    role: str
    content: str = ""
    trace_id: str = ""
    span_id: str = ""
    ts_ns: int = 0
    tool_name: str = ""  # role == "tool"
    tool_call_id: str = ""
    tool_arguments: str = ""
    error: str = ""  # role == "tool" and the tool failed: error text


@dataclass
class TurnRecord(Record):
    """One span, normalised across the GenAI / OpenInference / OpenLLMetry dialects.

    ``kind``: ``llm`` (a model call), ``tool`` (a tool execution), ``agent`` (an
    agent invocation / root span) or ``other``. ``input_messages`` and
    ``output_messages`` are the (redacted) messages the span carries; for an
    ``llm`` span the input usually repeats the history, the assembler de-duplicates.
    """

    kind: ClassVar[str] = "turn"

    conversation_id: str
    trace_id: str
    span_id: str
    parent_span_id: str = ""
    span_kind: str = "other"  # llm | tool | agent | other
    name: str = ""
    operation: str = ""  # gen_ai.operation.name
    provider: str = ""
    request_model: str = ""
    response_model: str = ""
    agent_name: str = ""
    agent_version: str = ""
    prompt_version: str = ""
    system_instructions: str = ""
    input_messages: list[Message] = field(default_factory=list)
    output_messages: list[Message] = field(default_factory=list)
    tool: ToolCall | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    start_ns: int = 0
    end_ns: int = 0
    status: str = "ok"  # ok | error
    error_type: str = ""
    error_message: str = ""
    end_of_conversation: bool = False
    redactions: int = 0
    evaluations: list[Evaluation] = field(default_factory=list)


@dataclass
class Conversation(Record):
    """A conversation as assembled from its turn records, messages in order.

    ``version`` grows with every turn record folded in, so a late span produces
    a newer version that replaces the older row (ReplacingMergeTree).
    """

    kind: ClassVar[str] = "conversation"

    conversation_id: str
    version: int = 1
    start_ns: int = 0
    end_ns: int = 0
    closed_reason: str = ""  # end | idle
    prompt_version: str = ""
    model: str = ""
    agent_name: str = ""
    agent_version: str = ""
    trace_ids: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    llm_calls: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: float = 0.0  # sum of llm span durations
    evaluations: list[Evaluation] = field(default_factory=list)  # stated outcomes, in time order

    def user_messages(self) -> list[str]:
        return [m.content for m in self.messages if m.role == "user"]


@dataclass
class TagRecord(Record):
    """Understand's verdict on one conversation. ``conversation`` carries the assembled
    conversation so that diagnose can keep evidence without another lookup."""

    kind: ClassVar[str] = "tags"

    conversation_id: str
    conversation_version: int
    intent_id: str
    intent_name: str
    taxonomy_version: int
    signals: list[str] = field(
        default_factory=list
    )  # bug_report, feature_request, churn_risk, setup_friction, confusion, long_tail
    outcome: str = "resolved"  # see processors.understand.outcomes.OUTCOMES
    outcome_turn: int = -1
    failed: bool = False  # the failure signal diagnose tracks (see understand.outcomes)
    outcome_source: str = "heuristic"  # heuristic | stated (an evaluation, attribute or feedback)
    outcome_reason: str = ""  # why: the evaluation / feedback, or the heuristic's rule (redacted)
    prompt_version: str = ""
    model: str = ""
    agent_version: str = ""
    ts_ns: int = 0
    source: str = "structural"  # structural | llm (the signals include an LLM judgement)
    conversation: Conversation | None = None


# Outcomes stated about a conversation (the contract with agents: docs/agent-authors.md).
# resolved: the need was met; failed: a stated failure; abandoned: the user left after a
# question; escalated: handed to a human; errored: errors prevented an answer; unknown: the
# conversation holds no evidence either way (no answer to the user's last message).
# A diagnosis in one of these gets no proposal. ``superseded``: every conversation it explained
# is now explained by another diagnosis of its intent (a later contrastive analysis).
CLOSED_STATUSES = ("resolved", "rejected", "superseded")

OUTCOMES = ("resolved", "failed", "abandoned", "escalated", "errored", "unknown")
OUTCOME_ATTRIBUTE = "closeloop.outcome"
OUTCOME_REASON_ATTRIBUTE = "closeloop.outcome.reason"
EVALUATION_EVENT = "gen_ai.evaluation.result"
# The conversation id capture gives an evaluation known only by the gen_ai.response.id of the
# answer it judges when its own process did not see that answer (another capture process did):
# understand finds the answer's conversation in the store and sends the evaluation there.
RESPONSE_REF = "gen_ai.response.id:"

# The taxonomy every diagnosis is filed under (docs/architecture.md, "Failure kinds"):
FAILURE_KINDS = (
    "tool_error",  # a tool fails or is retried in a loop
    "wrong_tool_arguments",  # the right tool, arguments not grounded in what the user or a tool said
    "missing_action",  # the action the failed conversations needed is never taken
    "unauthorized_action",  # a state-changing action taken without the user's confirmation / allowance
    "unnecessary_escalation",  # handed to a human where successful conversations are not
    "repeated_ask",  # the agent asks again for what the user already gave
    "latency",  # slow model or tool calls
    "prompt_regression",  # a new prompt / model / agent version fails more
    "abandonment",  # users leave after a question of the agent
    "other",
)


# The existing rules filed under the taxonomy (contrast diagnoses carry their own kind; an
# LLM's diagnosis names one, else "other").
RULE_KINDS = {
    "repeated_ask": "repeated_ask",
    "tool_argument": "wrong_tool_arguments",
    "prompt_regression": "prompt_regression",
    "version_regression": "prompt_regression",
    "abandon_after_question": "abandonment",
    "latency": "latency",
}


@dataclass
class Diagnosis(Record):
    """A root cause for a failing intent, specific enough to write code against.

    ``component``: ``{"type": "prompt"|"config"|"harness", "target": file or key, "detail": ...}``.
    ``evidence``: counts, rates, turn index, tool and argument patterns, the agent
    message before abandonment, and ``trace_ids`` that really contain the failure.
    """

    kind: ClassVar[str] = "diagnosis"

    diagnosis_id: str  # hash of intent_id + rule + component: one per root cause
    intent_id: str
    intent_name: str
    rule: str  # repeated_ask | tool_argument | prompt_regression | abandon_after_question | latency | llm
    summary: str
    root_cause: str
    component: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.0
    evidence: dict[str, Any] = field(default_factory=dict)
    trace_ids: list[str] = field(default_factory=list)
    support: int = 0  # conversations of the intent in the window
    failures: int = 0  # failing conversations in the window
    failure_rate: float = 0.0
    baseline_rate: float = 0.0
    prompt_version: str = ""
    agent_version: str = ""
    window_from_ns: int = 0
    window_to_ns: int = 0
    status: str = "open"  # open | proposed | one of CLOSED_STATUSES
    version: int = 1
    updated_ns: int = 0
    failure_kind: str = "other"  # one of FAILURE_KINDS
    source: str = "rules"  # rules | llm (an LLM reworded the rule's finding)

    def __post_init__(self) -> None:
        if self.failure_kind == "other":
            self.failure_kind = RULE_KINDS.get(self.rule, "other")


@dataclass
class Proposal(Record):
    """A proposed change (a branch and, on GitHub, a pull request). Never merged by closeloop."""

    kind: ClassVar[str] = "proposal"

    proposal_id: str
    diagnosis_id: str
    intent_id: str
    backend: str  # local | github
    repo: str
    base: str
    branch: str
    title: str
    body: str
    diff: str
    files: list[str] = field(default_factory=list)
    commit: str = ""
    pr_number: int = 0
    pr_url: str = ""
    status: str = "open"  # open | approved | merged | rejected | closed
    version: int = 1
    created_ns: int = 0
    updated_ns: int = 0
    source: str = "template"  # template | llm (the change is the LLM's edit)


@dataclass
class ReviewRecord(Record):
    """A human decision on a proposal, with attribution."""

    kind: ClassVar[str] = "review"

    review_id: str
    proposal_id: str
    diagnosis_id: str
    intent_id: str
    decision: str  # approved | rejected | merged | closed
    reviewer: str
    comment: str = ""
    merged_commit: str = ""
    before_prompt_version: str = ""
    before_agent_version: str = ""
    evidence_trace_ids: list[str] = field(default_factory=list)
    window_from_ns: int = 0
    window_to_ns: int = 0
    ts_ns: int = 0


@dataclass
class Outcome(Record):
    """The measured effect of a merged change on its intent (before vs after)."""

    kind: ClassVar[str] = "outcome"

    proposal_id: str
    intent_id: str
    before_version: str
    after_version: str
    before_n: int
    before_failures: int
    after_n: int
    after_failures: int
    rate_before: float
    rate_after: float
    diff_low: float  # 95% CI of rate_after - rate_before
    diff_high: float
    p_value: float
    verdict: str  # fixed | no_effect | regressed | not_enough_data
    ts_ns: int = 0


@dataclass
class DeadLetter(Record):
    """An input a stage could not process, with the stage and the reason. The original is kept."""

    kind: ClassVar[str] = "deadletter"

    stage: str
    reason: str
    detail: str = ""
    topic: str = ""
    partition: int = -1
    offset: int = -1
    key: str = ""
    original_b64: str = ""  # the original bytes, base64 (truncated to the dead-letter size limit)
    ts_ns: int = 0


_nested: dict[tuple[str, str], type[Record]] = {
    ("TurnRecord", "input_messages"): Message,
    ("TurnRecord", "output_messages"): Message,
    ("TurnRecord", "tool"): ToolCall,
    ("TurnRecord", "evaluations"): Evaluation,
    ("Conversation", "evaluations"): Evaluation,
    ("Conversation", "messages"): Message,
    ("Conversation", "tool_calls"): ToolCall,
    ("TagRecord", "conversation"): Conversation,
}
