"""Per-conversation signals (bug report, feature request, churn risk, setup friction,
confusion) and the heuristic outcome (:data:`~processors.understand.outcomes.OUTCOMES`),
which applies only where no outcome was stated (:mod:`.outcomes`).

Three sources, combined by :class:`Tagger`:

* :func:`structural_signals` — deterministic rules over the conversation's structure
  (tool errors, retries, idle close after a question, hand-offs) and lexical
  cues in user messages. Runs on every conversation; it alone decides the outcome.
* :func:`judge` — an LLM reads the conversation (as quoted, untrusted data) and tags it.
  Only a deterministic sample is judged (``llm.judge_rate``, by hash of the conversation id),
  beside the stream: the verdict comes later and versions the conversation's tags.
* :class:`SignalLearner` — per-tag online logistic regressions (river) over hashed words
  and structural features, trained on the judged sample, so that every conversation gets
  the judge's kind of tags without an LLM call each.

``long_tail`` is not decided here: it depends on the intent model (understand).
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from river import linear_model, optim

from processors.config import Config
from processors.errors import LLMError
from processors.llm import UNTRUSTED_RULE, ChatJSON, untrusted_block
from processors.records import OUTCOMES, Conversation, Message
from processors.understand.naming import STOP_WORDS, words
from processors.understand.outcomes import FAILED_OUTCOMES

TAGS = ("bug_report", "feature_request", "churn_risk", "setup_friction", "confusion")

RETRY_LOOP = 3  # the same tool call this many times is a retry loop, not a fix
REPEAT_JACCARD = 0.7  # word-set overlap at which a user message repeats an earlier one
REPEAT_MIN_WORDS = 4  # content words: "yes, please proceed" said twice is not a repeat
JUDGE_MAX_MESSAGE_CHARS = 600
JUDGE_MAX_CHARS = 8000


class Evidence(NamedTuple):
    """Why a tag was given: the message index that triggered it (-1: whole conversation)."""

    turn: int
    why: str


@dataclass
class SignalResult:
    """Tags (sorted, from :data:`TAGS`), the outcome and where it happened, with evidence."""

    tags: list[str] = field(default_factory=list)
    outcome: str = "resolved"
    outcome_turn: int = -1
    outcome_why: str = ""
    evidence: dict[str, Evidence] = field(default_factory=dict)
    judged: bool = False  # an LLM judged this conversation

    @property
    def failed(self) -> bool:
        """With the default configuration (an escalation alone is not a failure)."""
        return self.outcome in FAILED_OUTCOMES


# --- lexical cues (user messages only: the agent saying "error" is not a user's bug report) ---


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


# Precision first: each cue is evidence on its own (measured on a hand-labelled sample,
# tests/data/signals_labelled.jsonl, by bench/signals.py). A word that also names an ordinary
# request is not a cue: "please add a checked bag" asks for a service, not a feature; "the
# current setup" is not a set-up problem; "an error on the account number" is the user's own.
_NOT = r"(does ?n'?t|does not|do ?n'?t|is ?n'?t|are ?n'?t|not|stopped|never|wo ?n'?t|will not|did ?n'?t|did not|can'?t)"
_CANT = r"(can'?t|cannot|can not|could ?n'?t|could not|unable to|not able to)"
_CUES: dict[str, re.Pattern[str]] = {
    # The user says the product misbehaves.
    "bug_report": _rx(
        rf"\b{_NOT} (seem to )?work(s|ing|ed)?\b",
        r"\b(won'?t|wont|will not) let me\b",
        r"\b(get|gets|getting|got|receive|received|see|seeing|shows?|showing|throws?|keep getting) "
        r"(an |this |the |that |a weird |an unknown )?error\b",
        r"\berror (message|code)s?\b",
        r"\bbroken\b",
        r"\bcrash(es|ed|ing)?\b",
        r"\bbugs?\b",
        r"\bbuggy\b",
        r"\bglitch",
        r"\b(top ?-?up|upload|download|sync|export|import|login|payment) (has |have )?failed\b",
    ),
    # The user asks for something the product does not do yet: "add" names a feature only with
    # a word for one ("add a dark mode option"), never alone ("add a checked bag").
    "feature_request": _rx(
        r"\b(can|could) you (please )?add (a |an |the )?(new )?(feature|option|setting|support|"
        r"integration|way to|button|mode)\b",
        r"\bplease add (a |an |the )?(new )?(feature|option|setting|support|integration|way to|"
        r"button|mode)\b",
        r"\bwould be (nice|great|cool|helpful) if (you|it|the app|there)\b",
        r"\bfeature (request|idea)\b",
        r"\b(new|missing) feature\b",
        r"\b(add|adding|any|no|there|have|need|want)\s+(\w+\s+)?support for\b",
        r"\bi wish (it|you|there|the app)\b",
        r"\b(please|you should) (support|allow|let us)\b",
    ),
    # The user is at the door. Refunds and plain "cancel" are ordinary requests (cancel a
    # transfer, refund a fee); they signal churn only with frustration (see _WEAK_CHURN).
    "churn_risk": _rx(
        r"\b(close|delete|terminate|cancel|shut down|stop|deactivate) (my|the|our) "
        r"(\w+ )?(account|subscription|plan|membership)\b",
        r"\bunsubscribe\b",
        r"\b(switch|switching|move|moving|go|going)\s+(over\s+)?to\s+(another|a different|a competitor|your competitor)\b",
        r"\bswitch(ing)? to \w+ instead\b",
        r"\b(leave|leaving|quit|quitting) (your|this) (service|app|product|bank|company)\b",
        r"\bnever (do business|bank|shop|use \w+|come back)\b",
    ),
    # The user is stuck before getting value: installing, configuring, authenticating.
    "setup_friction": _rx(
        r"\binstall(ing|ation|er|ed)?\b",
        rf"\b({_CANT}|trying to|help me|how (do|can) i|fail(s|ed)? to) set ?up\b",
        r"\bconfigur(e|ing|ation)\b",
        r"\bapi[ _-]?keys?\b",
        r"\b(api|access|auth|bearer) tokens?\b",
        r"\btokens? (expired|is invalid|invalid)\b",
        rf"\b{_CANT} (\w+ )?(log|sign) ?in(to)?\b",
        rf"\b{_CANT} (seem to |figure out how to )?(verify|activate) my\b",
        rf"\b{_CANT} (seem to )?(access|get into) my (account|profile|app)\b",
        r"\b(forgot|forgotten|do ?n'?t know|can'?t remember|cannot remember|lost) my "
        r"(password|passcode|login|username)\b",
        r"\b(identity|id|account) (is |was )?(not|has ?n'?t|has not|is ?n'?t)( yet)? (been |being )?verified\b",
        r"\bnot recogni[sz]ed by the app\b",
        r"\bonboarding\b",
        r"\blog ?in (fails|failed|loop)\b",
    ),
    # The user does not follow the agent, or says the agent did not follow them. A message said
    # again is no evidence by itself: on the labelled sample every repeat was an answer given
    # twice to a question asked twice, or a goal restated ("Yes, please proceed" twice).
    "confusion": _rx(
        r"\bi (do ?n'?t|do not) (understand|get it|follow)\b",
        r"\bwhat do you mean\b",
        r"\bi'?m (confused|lost)\b",
        r"\b(this|that|it)('s| is) confusing\b",
        r"\bmakes? no sense\b",
        r"\bnot what i (asked|meant|said)\b",
        r"\bthat'?s not what\b",
        r"\bmisunderst",
        r"\b(there|we) (is|are|might be|may be|seems to be|must be|'re)( \w+)? (some |a )?confusion\b",
        r"\bfor (any|the) confusion, but\b",
        r"\b(a|some) mix-?up\b",
        r"\bgoing (round |around )?in circles\b",
        r"\b(like|as) i (said|mentioned|told you)\b",
        r"\bi (already|just) (told|said|gave|mentioned|sent)\b",
        r"^\s*huh\b",
    ),
}
_WEAK_CHURN = _rx(r"\brefund", r"\bcancel", r"\bmoney back\b")
_FRUSTRATION = _rx(  # strong words only: "I'm frustrated about the delay" is not leaving
    r"\bridiculous\b",
    r"\bterrible\b",
    r"\bawful\b",
    r"\bworst\b",
    r"\buseless\b",
    r"\bfed up\b",
    r"\bsick of\b",
    r"\bwaste of\b",
    r"\bunacceptable\b",
    r"\bwtf\b",
)
# Tool errors that mean credentials/configuration are missing: setup friction, not a bug.
_AUTH_ERROR = _rx(
    r"\bunauthori[sz]ed\b",
    r"\b40[13]\b",
    r"\bforbidden\b",
    r"\binvalid (api )?(key|token)\b",
    r"\bauthenticat",
    r"\bpermission denied\b",
    r"\bnot configured\b",
    r"\bmissing (credentials|token|api key)\b",
    r"\bexpired token\b",
    r"\btoken expired\b",
)
# An agent message that admits failure is not an answer.
_FAILURE = _rx(
    r"\bsorry\b[^.?!]{0,60}\b(could ?n'?t|can'?t|cannot|unable|error|problem|issue)\b",
    r"\bsomething went wrong\b",
    r"\ban error occurred\b",
    r"\btry again later\b",
    r"\bi('m| am) (unable|not able)\b",
    r"\bi (can'?t|cannot|could ?n'?t) (do|complete|access|find|process|reach)\b",
)
# The agent asks for something: the user has to act next.
_ASK = _rx(
    r"\b(please|kindly) (provide|share|send|enter|confirm|tell|give|paste|upload)\b",
    r"\b(could|can|would) you (please )?(provide|share|send|confirm|tell|give|paste|check|upload)\b",
    r"\blet me know\b",
    r"\bwhat is your\b",
    r"\bi('ll| will) need your\b",
)
# The agent hands the user to a human.
_HANDOFF_TEXT = _rx(
    r"\bescalat(e|ed|ing|ion)\b",
    r"\bhuman agent\b",
    r"\b(transfer|connect|hand|pass)\w*\b[^.?!]{0,40}\b(human|live agent|real person|specialist|"
    r"representative|support team|colleague|operator)\b",
)
# ... unless the agent only offers it: an offer the user may decline is not a hand-off.
_OFFER = _rx(
    r"\bwould you (like|prefer|want)\b",
    r"\bdo you (want|wish)\b",
    r"\bshall i\b",
    r"\bshould i\b",
    r"\bi can\b",
    r"\bif you('d| would)? (like|prefer|want|wish)\b",
    r"\b(can|could|may) (i|we)\b",
    r"\boption\b",
)
_HANDOFF_TOOL = re.compile(r"escalat|hand_?off|transfer_to|human|live_agent")
_NEGATED = re.compile(
    r"\b(can'?t|cannot|can not|unable to|not able to|do ?n'?t|do not|won'?t)\b[^.?!]{0,30}$"
)


def _norm(text: str) -> str:
    return text.lower().replace("\u2019", "'")


def _first_cue(msgs: list[tuple[int, str]], rx: re.Pattern[str]) -> Evidence | None:
    for i, text in msgs:
        m = rx.search(text)
        if m:
            return Evidence(i, f"cue {m.group(0)!r}")
    return None


def _repeats(user: list[tuple[int, str]]) -> list[int]:
    """Indices of user messages that nearly repeat an earlier one (a feature for the learner,
    not a tag by itself). Only content words count: a confirmation said again is no repeat."""
    seen: list[set[str]] = []
    out = []
    for i, text in user:
        ws = {w for w in words(text) if w not in STOP_WORDS and not w.isdigit()}
        if len(ws) >= REPEAT_MIN_WORDS:
            if any(len(ws & s) / len(ws | s) >= REPEAT_JACCARD for s in seen):
                out.append(i)
            seen.append(ws)
    return out


def _is_answer(m: Message) -> bool:
    return (
        m.role == "assistant" and bool(m.content.strip()) and not _FAILURE.search(_norm(m.content))
    )


def _asks(m: Message) -> bool:
    text = m.content.strip()
    return m.role == "assistant" and (text.endswith("?") or bool(_ASK.search(_norm(text))))


def _handoff(conv: Conversation) -> Evidence | None:
    for i, m in enumerate(conv.messages):
        if m.role == "tool" and not m.error and _HANDOFF_TOOL.search(m.tool_name.lower()):
            return Evidence(i, f"hand-off tool {m.tool_name!r}")
        if m.role == "assistant":
            text = _norm(m.content)
            hit = _HANDOFF_TEXT.search(text)
            if (
                hit
                and not _NEGATED.search(text[: hit.start()])
                and not _is_offer(text, hit.start())
            ):
                return Evidence(i, f"agent says {hit.group(0)!r}")
    # a hand-off tool seen only in the tool-call list: place it at the last message
    if any(
        _HANDOFF_TOOL.search(t.name.lower()) and not t.error_type and not t.error_message
        for t in conv.tool_calls
    ):
        return Evidence(len(conv.messages) - 1, "hand-off tool call")
    return None


def _is_offer(text: str, at: int) -> bool:
    """The hand-off phrase at ``at`` sits in a question or an offer the user can decline."""
    start = max(text.rfind(c, 0, at) for c in ".!?\n") + 1
    ends = [i for i in (text.find(c, at) for c in ".!?\n") if i >= 0]
    end = min(ends) if ends else len(text)
    sentence = text[start : end + 1]
    return sentence.rstrip().endswith("?") or bool(_OFFER.search(sentence))


def _last_failure(conv: Conversation) -> Evidence | None:
    """The last tool error or retry loop, if the conversation has one."""
    msgs = conv.messages
    found: Evidence | None = None
    calls: dict[tuple[str, str], int] = {}
    for i, m in enumerate(msgs):
        if m.role != "tool":
            continue
        if m.error:
            found = Evidence(i, f"tool {m.tool_name!r} failed: {m.error[:80]}")
        key = (m.tool_name, m.tool_arguments)
        calls[key] = calls.get(key, 0) + 1
        if calls[key] == RETRY_LOOP:
            # The agent keeps calling the same thing with the same arguments: it is stuck.
            found = Evidence(
                i, f"tool {m.tool_name!r} called {RETRY_LOOP}x with the same arguments"
            )
    if (
        found is None
        and msgs
        and (conv.errors > 0 or any(t.error_type or t.error_message for t in conv.tool_calls))
    ):
        # Errors known only from counts (no failing tool message): place them at the last
        # user turn, so that the conversation is errored iff that turn got no answer.
        users = [i for i, m in enumerate(msgs) if m.role == "user"]
        found = Evidence(users[-1] if users else 0, f"{max(conv.errors, 1)} error span(s)")
    return found


def _outcome(conv: Conversation) -> tuple[str, int, str]:
    msgs = conv.messages
    # A hand-off is an explicit verdict of the agent: it decides the outcome first.
    hand = _handoff(conv)
    if hand:
        return "escalated", hand.turn, hand.why
    # Errors the agent recovered from are not failures; errors followed only by apologies are.
    fail = _last_failure(conv)
    if fail and not any(_is_answer(m) for m in msgs[fail.turn + 1 :]):
        return "errored", fail.turn, fail.why
    # Closed by the idle timer right after the agent asked something: the user gave up.
    if conv.closed_reason == "idle":
        last = next(
            (i for i in range(len(msgs) - 1, -1, -1) if msgs[i].role in ("user", "assistant")), -1
        )
        if last >= 0 and _asks(msgs[last]):
            return "abandoned", last, "closed idle after the agent asked"
    # "Resolved" needs evidence: an answer to the user's last message.
    users = [i for i, m in enumerate(msgs) if m.role == "user" and m.content.strip()]
    answers = [i for i, m in enumerate(msgs) if _is_answer(m)]
    if answers and (not users or answers[-1] > users[-1] or _closing(msgs[users[-1]])):
        return "resolved", answers[-1], "answered"
    return "unknown", users[-1] if users else -1, "no answer to the last user message"


# A last user message that only closes the conversation needs no answer of its own.
_CLOSING = _rx(
    r"^\W*(thanks?|thank you|ok(ay)?|great|perfect|bye|goodbye|cheers|got it|that'?s all)\b",
    r"\bthat'?s all\b",
    r"\bno(thing)? (more|else)\b",
)


def _closing(m: Message) -> bool:
    text = _norm(m.content).strip()
    return bool(_CLOSING.search(text)) or not words(text)


def structural_signals(conv: Conversation) -> SignalResult:
    """Tags and outcome from deterministic rules; cheap enough to run on every conversation.

    >>> from processors.records import Message
    >>> c = Conversation("c1", closed_reason="idle", messages=[
    ...     Message("user", "I can't log in to the CLI"),
    ...     Message("assistant", "Could you share the exact error message?")])
    >>> r = structural_signals(c)
    >>> r.tags, r.outcome, r.outcome_turn, r.failed
    (['setup_friction'], 'abandoned', 1, True)
    """
    user = [(i, _norm(m.content)) for i, m in enumerate(conv.messages) if m.role == "user"]
    evidence: dict[str, Evidence] = {}
    for tag, rx in _CUES.items():
        ev = _first_cue(user, rx)
        if ev:
            evidence[tag] = ev
    if "churn_risk" not in evidence:
        weak, angry = _first_cue(user, _WEAK_CHURN), _first_cue(user, _FRUSTRATION)
        if weak and angry:
            evidence["churn_risk"] = Evidence(
                max(weak.turn, angry.turn), f"{weak.why} with frustration {angry.why}"
            )
    if "setup_friction" not in evidence:
        for i, m in enumerate(conv.messages):
            hit = _AUTH_ERROR.search(_norm(m.error)) if m.role == "tool" and m.error else None
            if hit:
                evidence["setup_friction"] = Evidence(
                    i, f"tool {m.tool_name!r} auth/config error {hit.group(0)!r}"
                )
                break
    outcome, turn, why = _outcome(conv)
    return SignalResult(sorted(evidence), outcome, turn, why, evidence)


# --- the LLM judge ---

JUDGE_SYSTEM = f"""You review one conversation between a user and an AI agent of a software product.
Tag it with the signals it shows, from exactly this set:
- bug_report: the user reports that something in the product is broken or errors
- feature_request: the user asks for a capability the product lacks
- churn_risk: the user considers leaving, cancelling their account or switching to a competitor
- setup_friction: the user struggles to install, configure, authenticate or get started
- confusion: the user does not understand the agent, or the agent misunderstands the user
and give the outcome, one of: resolved (the agent answered the need), abandoned (the user left
without an answer, typically after the agent asked something), escalated (handed to a human),
errored (tool or system errors prevented an answer). Turns are the "i" numbers of the messages.
{UNTRUSTED_RULE}"""
JUDGE_SCHEMA = (
    '{"tags": ["bug_report", ...], "outcome": "resolved|abandoned|escalated|errored", '
    '"outcome_turn": 3, "evidence": {"bug_report": 0}}'
)


def render_conversation(conv: Conversation) -> list[dict[str, Any]]:
    """The messages as data items for :func:`untrusted_block`, truncated to a bounded size."""
    items: list[dict[str, Any]] = []
    budget = JUDGE_MAX_CHARS
    for i, m in enumerate(conv.messages):
        if m.role == "system":
            continue
        it: dict[str, Any] = {"i": i, "role": m.role, "text": m.content[:JUDGE_MAX_MESSAGE_CHARS]}
        if m.role == "tool":
            it.update(tool=m.tool_name, arguments=m.tool_arguments[:200], error=m.error[:200])
        budget -= sum(len(str(v)) for v in it.values())
        if budget < 0:
            items.append({"i": i, "role": "note", "text": "(later messages omitted)"})
            break
        items.append(it)
    return items


def judge(conv: Conversation, llm: ChatJSON) -> SignalResult:
    """Ask the LLM to tag ``conv``. Raises :class:`LLMError` on any unusable answer."""
    user = "Classify this conversation.\n" + untrusted_block(
        "conversation", render_conversation(conv)
    )
    out = llm.chat_json(JUDGE_SYSTEM, user, JUDGE_SCHEMA, required=("tags", "outcome"))
    tags, outcome, turn = out["tags"], out["outcome"], out.get("outcome_turn", -1)
    if not isinstance(tags, list) or not all(isinstance(t, str) and t in TAGS for t in tags):
        raise LLMError(f"judge tags {tags!r} are not a list drawn from {TAGS}")
    if outcome not in OUTCOMES:
        raise LLMError(f"judge outcome {outcome!r} is not one of {OUTCOMES}")
    n = len(conv.messages)
    if not isinstance(turn, int) or isinstance(turn, bool) or not -1 <= turn < n:
        raise LLMError(f"judge outcome_turn {turn!r} is not a message index")
    evidence_in = out.get("evidence")
    ev_in = evidence_in if isinstance(evidence_in, dict) else {}
    evidence = {}
    for t in set(tags):
        at = ev_in.get(t, -1)
        evidence[t] = Evidence(
            at if isinstance(at, int) and not isinstance(at, bool) and -1 <= at < n else -1,
            "llm judge",
        )
    return SignalResult(sorted(set(tags)), outcome, turn, "llm judge", evidence, judged=True)


# --- the online learner ---


def conversation_features(conv: Conversation, n_features: int) -> dict[str, float]:
    """Hashed user uni/bigrams, tool names, and a few structural flags, as river features.

    Hashing (crc32, stable across processes, unlike ``hash``) bounds the model's size
    whatever the vocabulary.
    """
    x: dict[str, float] = {}
    for text in conv.user_messages():
        ws = words(text)
        for tok in [*ws, *(f"{a} {b}" for a, b in itertools.pairwise(ws))]:
            x[f"h{zlib.crc32(tok.encode()) % n_features}"] = 1.0
    for m in conv.messages:
        if m.role == "tool":
            x[f"h{zlib.crc32(('tool:' + m.tool_name).encode()) % n_features}"] = 1.0
            if m.error:
                x["s:tool_error"] = 1.0
    user = [(i, _norm(t)) for i, t in enumerate(conv.user_messages())]
    x["s:repeat"] = 1.0 if _repeats(user) else 0.0
    x["s:idle"] = 1.0 if conv.closed_reason == "idle" else 0.0
    x["s:user_turns"] = min(len(user), 10) / 10
    x["s:errors"] = 1.0 if conv.errors else 0.0
    return x


class SignalLearner:
    """One online logistic regression per tag, learnt from judged conversations.

    A tag is predicted only once the learner has seen ``min_examples`` judged conversations
    and ``min_positives`` of that tag — before that its guesses are noise. Positives are
    weighted by the running negative/positive ratio so that rare tags are still learnt.

    >>> from processors.records import Message
    >>> lr = SignalLearner(min_examples=2, min_positives=1)
    >>> for k in range(20):
    ...     text = "the export button does nothing" if k % 2 else "how do I rename a project"
    ...     lr.learn_one(Conversation(str(k), messages=[Message("user", text)]),
    ...                  SignalResult(tags=["bug_report"] if k % 2 else []))
    >>> lr.predict_one(Conversation("x", messages=[Message("user", "export button does nothing again")]))
    {'bug_report'}
    """

    def __init__(
        self,
        tags: tuple[str, ...] = TAGS,
        *,
        n_features: int = 2**18,
        learning_rate: float = 0.1,
        threshold: float = 0.5,
        min_examples: int = 30,
        min_positives: int = 3,
    ) -> None:
        if not set(tags) <= set(TAGS):
            raise ValueError(f"unknown tags {sorted(set(tags) - set(TAGS))}")
        if (
            n_features < 1
            or learning_rate <= 0
            or not 0 < threshold < 1
            or min_examples < 0
            or min_positives < 1
        ):
            raise ValueError(
                "need n_features >= 1, learning_rate > 0, 0 < threshold < 1, "
                "min_examples >= 0, min_positives >= 1"
            )
        self.tags = tags
        self.n_features = n_features
        self.learning_rate = learning_rate
        self.threshold = threshold
        self.min_examples = min_examples
        self.min_positives = min_positives
        self._models = {
            t: linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate)) for t in tags
        }
        self._positives = dict.fromkeys(tags, 0)
        self._n = 0

    @property
    def n_learned(self) -> int:
        return self._n

    def trusted(self, tag: str) -> bool:
        return self._n >= self.min_examples and self._positives[tag] >= self.min_positives

    def learn_one(self, conv: Conversation, judged: SignalResult) -> None:
        x = conversation_features(conv, self.n_features)
        self._n += 1
        for t, model in self._models.items():
            y = t in judged.tags
            self._positives[t] += y
            pos = max(self._positives[t], 1)
            w = max(1.0, (self._n - pos) / pos) if y else 1.0
            model.learn_one(x, y, w=w)

    def predict_proba_one(self, conv: Conversation) -> dict[str, float]:
        """P(tag) for every trusted tag."""
        trusted = [t for t in self.tags if self.trusted(t)]
        if not trusted:  # nothing learned yet (no LLM judge): skip the features
            return {}
        x = conversation_features(conv, self.n_features)
        return {t: self._models[t].predict_proba_one(x)[True] for t in trusted}

    def predict_one(self, conv: Conversation) -> set[str]:
        return {t for t, p in self.predict_proba_one(conv).items() if p >= self.threshold}


def judge_sampled(conversation_id: str, rate: float) -> bool:
    """Whether ``conversation_id`` falls in the judged sample; a replay picks the same sample."""
    h = int.from_bytes(hashlib.blake2b(conversation_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < rate


class Tagger:
    """Structural signals for every conversation, the learner's for the rest, and the LLM
    judge's verdict on a sample when it comes (:meth:`judged`, after the LLM answered).

    The outcome always comes from the structural rules: diagnose and review compare failure
    rates across time and prompt versions, which must not depend on which conversations
    happened to be judged.
    """

    def __init__(
        self, cfg: Config, learner: SignalLearner | None = None, *, judging: bool = False
    ) -> None:
        self.judge_rate = cfg.llm.judge_rate
        self.judging = judging
        self.learner = learner or SignalLearner()

    def wants_judgement(self, conv: Conversation) -> bool:
        """Whether ``conv`` is in the judged sample (an LLM step judges it beside the stream)."""
        return self.judging and judge_sampled(conv.conversation_id, self.judge_rate)

    def tag(self, conv: Conversation, now_ns: int) -> SignalResult:
        proba = self.learner.predict_proba_one(conv)
        extra = {
            t: Evidence(-1, f"learner p={p:.2f}")
            for t, p in proba.items()
            if p >= self.learner.threshold
        }
        return self._combine(structural_signals(conv), extra, judged=False)

    def judged(self, conv: Conversation, verdict: SignalResult) -> SignalResult:
        """The tags of ``conv`` with the judge's ``verdict`` (which the learner learns)."""
        self.learner.learn_one(conv, verdict)
        return self._combine(structural_signals(conv), verdict.evidence, judged=True)

    @staticmethod
    def _combine(res: SignalResult, extra: dict[str, Evidence], judged: bool) -> SignalResult:
        evidence = {**{t: e for t, e in extra.items() if t not in res.evidence}, **res.evidence}
        return SignalResult(
            sorted(evidence), res.outcome, res.outcome_turn, res.outcome_why, evidence, judged
        )

    def snapshot(self) -> bytes:
        """The learned state, for a checkpoint: a zlib-compressed pickle (about 0.5 MB per
        3,000 judged conversations). Restore only snapshots that closeloop wrote itself."""
        return zlib.compress(
            pickle.dumps({"v": 1, "learner": self.learner}, protocol=pickle.HIGHEST_PROTOCOL)
        )

    def restore(self, data: bytes) -> None:
        state = pickle.loads(zlib.decompress(data))  # our own checkpoint, see snapshot
        self.learner = state["learner"]
