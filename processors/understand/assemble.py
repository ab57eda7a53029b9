"""Assemble: turn records in, whole conversations out (layer 2's input).

Pure core. The state of one open conversation is a plain dict (it lives in a faust
table keyed by conversation id, so it must be JSON-serialisable):

    {"turns": {span_id: turn dict}, "first_ns": int, "last_seen_ns": int,
     "heard_ns": int, "ended_ns": int, "closed_ns": int, "emitted_version": int}

``*_seen_ns``, ``ended_ns`` and ``closed_ns`` are wall times of arrival; ``heard_ns`` is
event time: its partition's watermark when the conversation last received a record (a state
from before it existed gets its newest span time).

A conversation closes when a span carries the end marker (after a short grace so the
sibling spans of the last turn still join) or when it is idle in event time: its
partition's watermark has moved ``idle_timeout_s`` past ``heard_ns``. The watermark
(:class:`Watermarks`) is the newest span time capture has delivered on the partition, held
back to capture's progress on each OTLP partition where it has input left (a conversation's
traces come from several OTLP partitions, which capture may read unevenly), so while capture
lags nothing closes from partial data however much wall time passes or however far other
OTLP partitions run ahead. Measuring from the watermark at arrival, not from the
conversation's own span times, keeps conversations whose spans arrive out of time order
with others' (a replay, a batch exporter holding spans) open until the partition's
progress shows them idle. An idle close also needs ``idle_timeout_s`` of wall time since
the conversation's last record: the lag the ticks carry is seconds old. The wall clock
moves the watermark only once the partition has been quiet for ``idle_timeout_s`` of wall
time: no turn message, and capture with no input left to process (the ticks say so, from
its consumer lag). Then capture has nothing more for it, and a quiet system still closes
its conversations.

A closed conversation lingers in state for ``linger_s`` so a late span reopens
it and a newer version replaces the row (ReplacingMergeTree on ``version``); after that
it leaves the state, which keeps the state bounded by the open conversations.

Content records (``span_kind == "content"``: message content from the logs signal) are
merged into their span by span id, whichever arrives first.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from processors.config import AssembleConfig
from processors.errors import InputError
from processors.records import Conversation, Message, ToolCall, TurnRecord

END_GRACE_NS = 1_000_000_000  # wait this long after an end marker for sibling spans


def new_state(now_ns: int) -> dict[str, Any]:
    return {
        "turns": {},
        "first_ns": now_ns,
        "last_seen_ns": now_ns,
        "heard_ns": 0,
        "ended_ns": 0,
        "closed_ns": 0,
        "emitted_version": 0,
    }


def add_turns(
    state: dict[str, Any] | None,
    turns: list[TurnRecord | dict[str, Any]],
    now_ns: int,
    watermark_ns: int = 0,
) -> dict[str, Any]:
    """Fold turn records (records, or their dicts as they come off the topic) into a
    conversation's state (idempotent: keyed by span id). ``watermark_ns``: its partition's
    watermark with these records delivered (:meth:`Deadlines.delivered`)."""
    dicts = [t.to_dict() if isinstance(t, TurnRecord) else t for t in turns]
    if not all(isinstance(d.get("span_id"), str) and d["span_id"] for d in dicts):
        raise ValueError("a turn record needs a span_id")  # checked before the state changes
    times = [span_time_ns(d) for d in dicts]  # before the state changes, too
    st = new_state(now_ns) if state is None else state
    st["heard_ns"] = max([heard_ns(st), watermark_ns, *times])
    for d in dicts:
        span_id = d["span_id"]
        prev = st["turns"].get(span_id)
        st["turns"][span_id] = d if prev is None else _merge_turn(prev, d)
        if d.get("end_of_conversation"):
            st["ended_ns"] = now_ns
    st["last_seen_ns"] = now_ns
    if st["closed_ns"]:
        # a late span: reopen; it will close again and replace the row with a newer version
        st["closed_ns"] = 0
    return st


def with_stored_turns(
    state: dict[str, Any] | None, stored: list[dict[str, Any]], now_ns: int
) -> dict[str, Any] | None:
    """``state`` with the stored turn records it lacks folded in (its conversation's records
    from the store of record, after the broker lost its topics); ``None`` when it lacks none,
    so a state the broker kept is left as it is.

    >>> st = with_stored_turns(None, [{"span_id": "s", "end_ns": 7}], 10)
    >>> sorted(st["turns"]), st["heard_ns"], st["last_seen_ns"]
    (['s'], 7, 10)
    >>> with_stored_turns(st, [{"span_id": "s"}], 20) is None
    True
    """
    have = state["turns"] if state is not None else {}
    missing: list[TurnRecord | dict[str, Any]] = [d for d in stored if d.get("span_id") not in have]
    return add_turns(state, missing, now_ns) if missing else None


def _merge_turn(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge a span record and a content record of the same span (either order)."""
    if a.get("span_kind") == "content" and b.get("span_kind") != "content":
        a, b = b, a
    out = dict(a)
    for key in ("input_messages", "output_messages"):
        if not out.get(key) and b.get(key):
            out[key] = b[key]
    for key in ("system_instructions", "prompt_version", "conversation_id"):
        if not out.get(key) and b.get(key):
            out[key] = b[key]
    out["redactions"] = int(a.get("redactions", 0)) + int(b.get("redactions", 0))
    evs = [*(a.get("evaluations") or []), *(b.get("evaluations") or [])]
    out["evaluations"] = [e for i, e in enumerate(evs) if e not in evs[:i]]
    return out


def span_time_ns(turn: dict[str, Any]) -> int:
    """A turn record's event time: when its span ended (or started); 0 if it carries none."""
    times = [turn.get("end_ns"), turn.get("start_ns")]
    return max((int(t) for t in times if isinstance(t, int | float)), default=0)


def heard_ns(state: dict[str, Any]) -> int:
    """Its partition's watermark when the conversation last received a record (for a state
    saved before it was kept: its newest span time)."""
    if "heard_ns" in state:
        return int(state["heard_ns"])
    return max((span_time_ns(t) for t in state["turns"].values()), default=0)


def is_due(state: dict[str, Any], now_ns: int, cfg: AssembleConfig, watermark_ns: int) -> str:
    """'' if the conversation stays open, else why it closes now: 'end' or 'idle'.
    ``now_ns`` is wall time; ``watermark_ns`` its partition's event time (:class:`Watermarks`)."""
    if state["closed_ns"] or not state["turns"]:
        return ""
    if state["ended_ns"] and now_ns - state["last_seen_ns"] >= END_GRACE_NS:
        return "end"
    idle_ns = int(cfg.idle_timeout_s * 1e9)
    if watermark_ns >= idle_deadline(state, cfg) and now_ns - state["last_seen_ns"] >= idle_ns:
        return "idle"
    return ""


def idle_deadline(state: dict[str, Any], cfg: AssembleConfig) -> int:
    """The watermark (event time) at which an open conversation closes as idle."""
    return heard_ns(state) + int(cfg.idle_timeout_s * 1e9)


def wall_deadline(state: dict[str, Any], cfg: AssembleConfig) -> int:
    """When (wall time) the state next needs a look: its end close, the wall-time half of its
    idle close, or, once closed, its expiry."""
    if state["closed_ns"]:
        return int(state["closed_ns"]) + int(cfg.linger_s * 1e9)
    if state["ended_ns"]:
        return int(state["last_seen_ns"]) + END_GRACE_NS
    return int(state["last_seen_ns"]) + int(cfg.idle_timeout_s * 1e9)


def is_expired(state: dict[str, Any], now_ns: int, cfg: AssembleConfig) -> bool:
    """A closed conversation past its linger time leaves the state."""
    return bool(state["closed_ns"]) and now_ns - state["closed_ns"] >= int(cfg.linger_s * 1e9)


def close(conversation_id: str, state: dict[str, Any], reason: str, now_ns: int) -> Conversation:
    """Build the conversation and mark the state closed."""
    conv = build_conversation(conversation_id, list(state["turns"].values()), reason)
    state["closed_ns"] = now_ns
    state["emitted_version"] = conv.version
    return conv


@dataclass(frozen=True)
class Tick:
    """A per-partition tick of the turns topic: wall time, and the OTLP partitions
    (``topic:partition``) on which capture then had input it had not processed (its consumer
    lag): they hold the watermark back, and the wall clock with it."""

    ns: int
    lagging: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Progress:
    """Capture's progress, sent to every partition of the turns topic after a batch's turns:
    per OTLP partition (``topic:partition``), the newest span time it has delivered."""

    newest: dict[str, int]


def parse_turn_message(
    value: bytes, key: Any
) -> tuple[Tick | Progress | None, dict[str, list[Any]]]:
    """A message of the turns topic: ``(tick or progress, {})``, else ``(None, groups)``:
    ``{conversation id: turn dicts}`` from a bundle, or one conversation's list keyed by ``key``.

    Raises :class:`InputError` (or ``ValueError`` for bad JSON) for anything else.

    >>> parse_turn_message(b'{"tick": 5, "lagging": ["otlp_spans:1"]}', None)
    (Tick(ns=5, lagging=frozenset({'otlp_spans:1'})), {})
    >>> parse_turn_message(b'{"progress": {"otlp_spans:0": 7}}', None)
    (Progress(newest={'otlp_spans:0': 7}), {})
    >>> parse_turn_message(b'[{"span_id": "s"}]', b"c1")
    (None, {'c1': [{'span_id': 's'}]})
    """
    body = orjson.loads(value)
    if isinstance(body, dict) and "tick" in body:
        return Tick(int(body["tick"]), frozenset(str(q) for q in body.get("lagging") or [])), {}
    if isinstance(body, dict) and isinstance(body.get("progress"), dict):
        return Progress({str(q): int(t) for q, t in body["progress"].items()}), {}
    if isinstance(body, dict) and isinstance(body.get("conversations"), dict):
        groups = body["conversations"]  # a bundle: {conversation id: turns}
    elif isinstance(body, list):  # one conversation, keyed by its id
        groups = {key.decode() if isinstance(key, bytes) else str(key): body}
    else:
        raise InputError("turn message is neither a bundle nor a list of turn records")
    for turns in groups.values():
        if not isinstance(turns, list) or not all(isinstance(d, dict) for d in turns):
            raise InputError("turn records must be JSON objects in a list")
    return None, groups


@dataclass
class Closed:
    """A conversation closed by a tick: its closed state, and the conversation (``None`` when
    the state could not be built into one; ``error`` says why, and the turns are kept)."""

    conversation_id: str
    state: dict[str, Any]
    conversation: Conversation | None
    error: str = ""


OpenConversations = MutableMapping[str, Any]  # conversation id -> state (``"p"``: its partition)


class Watermarks:
    """Each turns partition's event-time progress: the newest span time capture has delivered
    on it, but no further than the progress capture reported (:class:`Progress`, in the
    partition's order) on each OTLP partition where it has input left to process (:class:`Tick`):
    a conversation's spans come from several OTLP partitions (a trace each), which capture may
    read unevenly. An OTLP partition with nothing left (lag 0) holds nothing back; one with
    input left whose progress this partition has not been told holds the watermark where it
    started. The wall clock moves the watermark on only after ``idle_timeout_s`` of wall time
    without a turn message while capture had no input left at all. Ticks move no span time.
    """

    def __init__(self, cfg: AssembleConfig) -> None:
        self.idle_ns = int(cfg.idle_timeout_s * 1e9)
        self._span_ns: dict[int, int] = {}
        self._arrived_ns: dict[int, int] = {}  # wall time of the last turn message
        self._start_ns: dict[int, int] = {}
        self._progress: dict[int, dict[str, int]] = defaultdict(dict)  # OTLP partition -> ns
        self._lagging: dict[int, frozenset[str]] = {}  # OTLP partitions with input left

    def known(self, partition: int) -> bool:
        return partition in self._span_ns

    def start(self, partition: int, span_ns: int, now_ns: int) -> None:
        """After a (re)start: the progress the restored conversations show, and a full quiet
        period from now before wall time counts (capture may have a backlog)."""
        self._span_ns[partition] = max(self._span_ns.get(partition, 0), span_ns)
        self._start_ns[partition] = self._span_ns[partition]
        self._arrived_ns.setdefault(partition, now_ns)

    def delivered(self, partition: int, span_ns: int, now_ns: int) -> None:
        """A turn message of ``partition`` arrived, its newest span at ``span_ns`` (0: none)."""
        self._span_ns[partition] = max(self._span_ns.get(partition, 0), span_ns)
        self._arrived_ns[partition] = now_ns

    def progressed(self, partition: int, newest: dict[str, int]) -> None:
        """Capture reported its progress per OTLP partition on ``partition``."""
        seen = self._progress[partition]
        for source, ns in newest.items():
            seen[source] = max(seen.get(source, 0), ns)

    def lagging(self, partition: int, sources: frozenset[str], now_ns: int) -> None:
        """Capture has input it has not processed on ``sources`` (OTLP partitions): they hold
        the watermark, and the partition is not quiet, whatever arrived (a stuck or lagging
        capture must not look like a quiet system)."""
        self._lagging[partition] = sources
        if sources:
            self._arrived_ns[partition] = max(self._arrived_ns.get(partition, 0), now_ns)

    def at(self, partition: int, now_ns: int) -> int:
        """The partition's watermark at wall time ``now_ns``."""
        span_ns = self._span_ns.get(partition, 0)
        start = self._start_ns.get(partition, 0)
        progress = self._progress[partition]
        held = [progress.get(q, start) for q in self._lagging.get(partition, ())]
        if held:
            return min(span_ns, *held)
        quiet_ns = now_ns - self._arrived_ns.get(partition, now_ns)
        return span_ns + quiet_ns if quiet_ns >= self.idle_ns else span_ns


class Deadlines:
    """When each open conversation next needs a look, per partition: two heaps, one in
    event time (the idle close, against the partition's watermark) and one in wall time
    (the end grace, the linger), with stale entries skipped on pop, so a tick looks only at
    conversations that are due. After a (re)start each partition's heaps and watermark are
    built once from the restored table (:meth:`index`), before anything else is pushed for
    it. A conversation handed out as closed is not handed out again until it is pushed anew
    (its closing recorded, or a new record): a batch holds several ticks of a partition, and
    the table keeps the open state until the batch's closings are published.
    """

    def __init__(self, cfg: AssembleConfig) -> None:
        self.cfg = cfg
        self.watermarks = Watermarks(cfg)
        self._idle: dict[int, list[tuple[int, str]]] = defaultdict(list)
        self._wall: dict[int, list[tuple[int, str]]] = defaultdict(list)
        self._indexed: set[int] = set()
        self._closing: set[str] = set()  # handed out by close_due, not pushed since

    def watermark(self, partition: int, now_ns: int) -> int:
        return self.watermarks.at(partition, now_ns)

    def delivered(self, partition: int, turns: list[dict[str, Any]], now_ns: int) -> None:
        """Capture delivered ``turns`` on ``partition``: its watermark moves on."""
        newest = max((span_time_ns(t) for t in turns if isinstance(t, dict)), default=0)
        self.watermarks.delivered(partition, newest, now_ns)

    def push(self, conversation_id: str, state: dict[str, Any]) -> None:
        """Look at ``state`` (of partition ``state["p"]``) again at its next deadline."""
        p = state["p"]
        self._closing.discard(conversation_id)
        if not state["closed_ns"]:
            heapq.heappush(self._idle[p], (idle_deadline(state, self.cfg), conversation_id))
        heapq.heappush(self._wall[p], (wall_deadline(state, self.cfg), conversation_id))

    def close_due(
        self,
        table: OpenConversations,
        partition: int,
        now_ns: int,
        lagging: frozenset[str] = frozenset(),
    ) -> list[Closed]:
        """The conversations of ``partition`` due at ``now_ns``, closed; expired ones leave
        ``table``. The table keeps the open state until the conversation is published.
        ``lagging``: the OTLP partitions where capture has unprocessed input (:class:`Tick`)."""
        self.index(table, partition, now_ns)
        self.watermarks.lagging(partition, lagging, now_ns)
        watermark = self.watermarks.at(partition, now_ns)
        due: dict[str, None] = {}
        for heap, limit, wall in (
            (self._idle[partition], watermark, False),
            (self._wall[partition], now_ns, True),
        ):
            while heap and heap[0][0] <= limit:
                at, cid = heapq.heappop(heap)
                state = table.get(cid)
                if state is None or cid in self._closing:
                    continue  # deleted, or closed and not yet published
                current = wall_deadline(state, self.cfg) if wall else idle_deadline(state, self.cfg)
                if current == at:
                    due[cid] = None  # else updated since: a later entry exists
        out = []
        for cid in due:
            state = table[cid]
            reason = is_due(state, now_ns, self.cfg, watermark)
            if reason:
                out.append(_closed(cid, state, reason, now_ns))
                self._closing.add(cid)
            elif is_expired(state, now_ns, self.cfg):
                del table[cid]
        return out

    def index(self, table: OpenConversations, partition: int, now_ns: int) -> None:
        """Push the conversations of ``partition`` that ``table`` holds, once, before anything
        else is pushed for it (a second push of the same state would only be a duplicate)."""
        if partition in self._indexed:
            return
        newest = 0
        for cid, state in list(table.items()):
            if state is not None and state.get("p") == partition:
                self.push(cid, state)
                newest = max(newest, heard_ns(state))
        self.watermarks.start(partition, newest, now_ns)
        self._indexed.add(partition)


def _closed(cid: str, state: dict[str, Any], reason: str, now_ns: int) -> Closed:
    closed_state = {**state, "turns": dict(state["turns"])}
    try:
        return Closed(cid, closed_state, close(cid, closed_state, reason, now_ns))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        # a state the core cannot build: keep the pipeline going, keep the turns
        closed_state["closed_ns"] = now_ns
        return Closed(cid, closed_state, None, repr(err))


def _key(m: Message) -> tuple[str, str]:
    return (m.role, m.content if m.role != "tool" else f"{m.tool_call_id}\0{m.content}")


def build_conversation(
    conversation_id: str, turns: list[dict[str, Any]], reason: str
) -> Conversation:
    """Order the spans and derive the transcript: messages de-duplicated across LLM calls
    (agents resend the history on every call), tool executions placed where they ran."""
    # Agent spans last: their messages (the user's input, the final answer) fill in only what
    # no model call carried, so they are de-duplicated against everything else.
    recs = sorted(
        (TurnRecord.from_dict(t) for t in turns),
        key=lambda t: (t.span_kind == "agent", t.start_ns, t.span_id),
    )
    transcript: list[Message] = []
    seen: Counter[tuple[str, str]] = Counter()
    tool_calls: list[ToolCall] = []
    prompt_versions: Counter[str] = Counter()
    conv = Conversation(conversation_id=conversation_id, closed_reason=reason, version=len(recs))
    trace_order: dict[str, None] = {}
    # Instrumentations that trace only model calls carry tool results in the next call's
    # input; those are kept unless an executed tool span already covers the call.
    executed = {
        t.tool.call_id
        for t in recs
        if t.span_kind == "tool" and t.tool is not None and t.tool.call_id
    }
    for t in recs:
        conv.evaluations += t.evaluations
        if t.trace_id:  # an evaluation sent later without trace context has none
            trace_order.setdefault(t.trace_id, None)
        _count_span(conv, t)
        if t.span_kind == "tool" and t.tool is not None:
            tool_calls.append(t.tool)
            transcript.append(_tool_message(t, t.tool))
            continue
        if t.span_kind not in ("llm", "content", "agent"):
            continue
        if t.span_kind == "llm":
            _count_llm_call(conv, t)
        if t.prompt_version:
            prompt_versions[t.prompt_version] += 1
        transcript += _new_inputs(t, executed, seen)
        if t.span_kind != "agent":  # an agent span's answer joins as an input: de-duplicated
            transcript += _outputs(t, seen)
    transcript.sort(key=lambda m: m.ts_ns)  # stable: keeps call order within one span
    conv.evaluations.sort(key=lambda e: e.ts_ns)
    conv.messages = transcript
    conv.tool_calls = tool_calls
    conv.trace_ids = list(trace_order)
    conv.start_ns = min((t.start_ns for t in recs), default=0)
    conv.end_ns = max((t.end_ns for t in recs), default=0)
    conv.prompt_version = prompt_versions.most_common(1)[0][0] if prompt_versions else ""
    return conv


def _count_span(conv: Conversation, t: TurnRecord) -> None:
    if t.status == "error" and t.span_kind in ("llm", "tool"):
        conv.errors += 1
    if t.agent_name and not conv.agent_name:
        conv.agent_name = t.agent_name
    if t.agent_version:
        conv.agent_version = t.agent_version


def _count_llm_call(conv: Conversation, t: TurnRecord) -> None:
    conv.llm_calls += 1
    conv.input_tokens += t.input_tokens
    conv.output_tokens += t.output_tokens
    conv.latency_ms += max(0.0, (t.end_ns - t.start_ns) / 1e6)
    conv.model = t.response_model or t.request_model or conv.model


def _tool_message(t: TurnRecord, tc: ToolCall) -> Message:
    """An executed tool call, where it ran."""
    return Message(
        role="tool",
        content=tc.error_message or tc.result,
        trace_id=t.trace_id,
        span_id=t.span_id,
        ts_ns=t.start_ns,
        tool_name=tc.name,
        tool_call_id=tc.call_id,
        tool_arguments=tc.arguments,
        error=tc.error_message or tc.error_type,
    )


def _new_inputs(t: TurnRecord, executed: set[str], seen: Counter[tuple[str, str]]) -> list[Message]:
    """The occurrences of each (role, content) this call's input adds to the transcript."""
    inputs = [
        m
        for m in t.input_messages
        if (m.role in ("user", "assistant") and m.content)
        or (m.role == "tool" and m.tool_call_id not in executed)
    ]
    if t.span_kind == "agent":  # its final answer too, where no model call carried it
        inputs += [m for m in t.output_messages if m.role == "assistant" and m.content]
    need: Counter[tuple[str, str]] = Counter(_key(m) for m in inputs)
    out = []
    for m in inputs:
        key = _key(m)
        if need[key] > seen[key]:
            seen[key] += 1
            need[key] -= 1
            out.append(
                Message(
                    role=m.role,
                    content=m.content,
                    trace_id=t.trace_id,
                    span_id=t.span_id,
                    ts_ns=m.ts_ns or t.start_ns,
                    tool_name=m.tool_name,
                    tool_call_id=m.tool_call_id,
                    error=m.error,
                )
            )
        else:
            need[key] -= 1
    return out


def _outputs(t: TurnRecord, seen: Counter[tuple[str, str]]) -> list[Message]:
    """The assistant's answers and tool requests of this call."""
    out = []
    for m in t.output_messages:
        if m.role == "assistant" and (m.content or m.tool_name):
            if m.content:
                seen[(m.role, m.content)] += 1
            out.append(
                Message(
                    role="assistant",
                    content=m.content,
                    trace_id=t.trace_id,
                    span_id=t.span_id,
                    ts_ns=t.end_ns,
                    tool_name=m.tool_name,
                    tool_call_id=m.tool_call_id,
                    tool_arguments=m.tool_arguments,
                )
            )
    return out


CONVERSATION_COLUMNS = (
    "conversation_id",
    "version",
    "start_ns",
    "end_ns",
    "closed_reason",
    "prompt_version",
    "model",
    "agent_name",
    "agent_version",
    "trace_ids",
    "messages",
    "n_messages",
    "n_user_turns",
    "n_tool_calls",
    "llm_calls",
    "errors",
    "input_tokens",
    "output_tokens",
    "latency_ms",
)


def conversation_row(c: Conversation) -> list[Any]:
    """A ``conversations`` row in :data:`CONVERSATION_COLUMNS` order."""
    msgs = json.dumps([m.to_dict() for m in c.messages], ensure_ascii=False)
    return [
        c.conversation_id,
        c.version,
        c.start_ns,
        c.end_ns,
        c.closed_reason,
        c.prompt_version,
        c.model,
        c.agent_name,
        c.agent_version,
        c.trace_ids,
        msgs,
        len(c.messages),
        sum(1 for m in c.messages if m.role == "user"),
        len(c.tool_calls),
        c.llm_calls,
        c.errors,
        c.input_tokens,
        c.output_tokens,
        c.latency_ms,
    ]
