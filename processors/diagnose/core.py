"""Layer 3 core: from tagged conversations to root causes specific enough to code against.

:class:`Diagnoser` folds every :class:`~processors.records.TagRecord` into per-intent
streaming statistics (:class:`IntentStats`: bounded windows, a river ADWIN on the failure
stream, a reservoir of failing and healthy conversations). When an intent's failure rate is
high against the other intents, drifts upward, jumps with a new prompt/model/agent version,
or belongs to a fast-growing new intent, it extracts evidence from the reservoir and runs
deterministic rules:

* ``repeated_ask`` — the agent asks again for something the user already gave;
* ``tool_argument`` — a tool fails on one argument format and works on another;
* ``prompt_regression`` (``version_regression`` for a model/agent version) — the failure
  rate jumped with the newest version;
* ``abandon_after_question`` — users leave after one specific agent question;
* ``latency`` — timeouts or rising latency in failing conversations;

and, for failures no rule explains, the contrastive analysis (:mod:`.contrast`): what sets
the intent's failed conversations apart from its successful ones (state-changing calls made
or missing, unconfirmed calls, argument values, hand-offs), tested with Fisher's exact test.
It runs on an intent without an open rule diagnosis once the rules could look at it too
(``min_support``, ``min_failures``), whether or not its failure rate stands out against the other
intents, each time ``contrast_min_count`` more have failed. Every diagnosis carries a ``failure_kind``
(:data:`processors.records.FAILURE_KINDS`) and the conversations it explains. A contrast
diagnosis is re-emitted when the conversations it explains changed by ``reemit_growth``; a
smaller change still reaches its stored list (:meth:`Diagnoser.take_explanation_rows`), and
a conversation stays explained by one contrast diagnosis of its intent, the latest
analysis': an earlier one that analysis does not find again gets a version without it. A
conversation that left the bounded window stays explained by the diagnosis found again.

With an LLM, the strongest finding is also handed out for rewording (:attr:`Diagnoser.llm_requests`,
answered beside the stream); :meth:`Diagnoser.refine` makes an accepted answer the
diagnosis' next version. An answer that cites anything the evidence does not hold is
rejected and the rule's result stands. A bounded sample of each intent's failed conversations
is handed out for a per-conversation failure analysis (:mod:`.analysis`,
:attr:`Diagnoser.analysis_requests`); :meth:`Diagnoser.apply_analysis` groups the answers
into the intent's diagnoses.
A diagnosis id is a hash of (intent, rule, component target), so a root cause seen again
updates its diagnosis (``version + 1``) instead of duplicating it.

>>> from processors.config import DiagnoseConfig
>>> Diagnoser(DiagnoseConfig()).open_diagnoses()
[]
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from processors.config import DiagnoseConfig
from processors.diagnose.analysis import RULE as ANALYSIS_RULE
from processors.diagnose.analysis import (
    Analysis,
    AnalysisRequest,
    analysis_diagnosis,
    analysis_request,
    analysis_row,
    ask_analysis,
    joins,
    tools_of,
    with_conversations,
)
from processors.diagnose.contrast import RULE as CONTRAST_RULE
from processors.diagnose.contrast import (
    analysed,
    conversation_rows,
    intent_findings,
    unexplained_rows,
)
from processors.diagnose.llm import Refinement, ask_refinement, llm_bundle, refined
from processors.diagnose.rules import Candidate, common_evidence, run_rules, version_shift
from processors.diagnose.window import IntentStats, p_greater
from processors.errors import InputError, LLMError
from processors.llm import ChatJSON
from processors.records import CLOSED_STATUSES, Diagnosis, TagRecord

STAGE = "diagnose"
SNAPSHOT_FORMAT = 1
OPEN_STATUSES = ("open", "proposed")


def _carried_status(prev: Diagnosis) -> str:
    """The status a diagnosis found again takes from its last version: a human's decision
    stands (proposed, rejected); one resolved or superseded earlier is a new occurrence."""
    return "open" if prev.status in ("resolved", "superseded") else prev.status


def _follows(d: Diagnosis, prev: _Emitted | None) -> None:
    """Make ``d`` the next version of ``prev`` (the diagnosis of its id emitted last), if any."""
    if prev is not None:
        d.version = prev.diagnosis.version + 1
        d.status = _carried_status(prev.diagnosis)


def _conversations_of(d: Diagnosis) -> set[str]:
    """The conversations a contrast diagnosis explains."""
    convs = d.evidence.get("conversations")
    if not isinstance(convs, list):
        return set()
    return {str(c.get("conversation_id")) for c in convs if isinstance(c, dict)}


def diagnosis_id(intent_id: str, rule: str, target: str, variant: str = "") -> str:
    """Stable id of one root cause: the same (intent, rule, target) always maps to the same id."""
    key = f"{intent_id}\x1f{rule}\x1f{target}\x1f{variant}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass
class _Emitted:
    diagnosis: Diagnosis
    total_failures: int  # the intent's cumulative failures when last emitted


@dataclass
class _State:
    intents: dict[str, IntentStats] = field(default_factory=dict)
    diagnoses: dict[str, _Emitted] = field(default_factory=dict)
    seq: int = 0
    total_n: int = 0  # window counts summed over intents (for the other-intents baseline)
    total_f: int = 0
    contrasted: dict[str, int] = field(default_factory=dict)  # intent -> total_failures then


class Diagnoser:
    """Streaming diagnoser: feed tagged conversations, get new or updated diagnoses.

    ``llm_enabled``: list a :class:`Refinement` of each evaluation's strongest finding in
    ``llm_requests`` (the caller takes them). ``llm_rejections`` counts LLM answers that
    fell back to a rule (:meth:`improve`).
    """

    def __init__(self, cfg: DiagnoseConfig, *, llm_enabled: bool = False) -> None:
        cfg.validate()
        self.cfg = cfg
        self.llm_enabled = llm_enabled
        self.llm_requests: list[Refinement] = []
        self.analysis_requests: list[AnalysisRequest] = []
        self.llm_rejections: list[str] = []
        self.explanation_rows: list[dict[str, Any]] = []
        self._s = _State()

    # -- feeding

    def observe(self, tag: TagRecord, now_ns: int) -> list[Diagnosis]:
        """Fold ``tag`` in; return the diagnoses it creates or materially updates.

        Raises :class:`InputError` for a tag without an intent (the agent dead-letters it).
        """
        if not tag.intent_id:
            raise InputError(
                "tag record without intent_id", stage=STAGE, detail=tag.conversation_id
            )
        s = self._s
        s.seq += 1
        st = s.intents.get(tag.intent_id)
        if st is None:
            st = s.intents[tag.intent_id] = IntentStats(
                tag.intent_id, self.cfg.window, self.cfg.evidence_size, self.cfg.adwin_delta
            )
        n0, f0 = st.n, st.failures
        st.add(tag, s.seq)
        s.total_n += st.n - n0
        s.total_f += st.failures - f0
        if not tag.failed:
            return []
        out: list[Diagnosis] = []
        # Evidence only grows with failures; after an emission wait until it grew materially.
        if not st.last_emit_failures or self._grown(st, st.last_emit_failures):
            reasons = self.triggers(st)
            if reasons:
                out = self._evaluate(st, reasons, now_ns, force=False)
        # The contrast is for failures the rules do not explain, and needs no trigger: a cause
        # can hide in an intent whose failure rate does not stand out.
        if not out and self._enough(st) and not self._explained_by_rules(st):
            out = self._contrast(st, now_ns, force=False)
        if self.llm_enabled and self._enough(st):
            self._sample_for_analysis(st)
        return out

    def diagnose_now(self, intent_id: str, now_ns: int) -> list[Diagnosis]:
        """Run the rules on one intent now, whatever the triggers say (minimum support holds)."""
        st = self._s.intents.get(intent_id)
        if st is None:
            return []
        out = []
        if self._enough(st):
            out = self._evaluate(st, self.triggers(st) or ["requested"], now_ns, force=True)
        if not out and not self._explained_by_rules(st):
            out = self._contrast(st, now_ns, force=True)
        return out

    def _explained_by_rules(self, st: IntentStats) -> bool:
        """An open diagnosis of a rule (not the contrast) stands for this intent."""
        return any(
            e.diagnosis.intent_id == st.intent_id
            and e.diagnosis.rule not in (CONTRAST_RULE, ANALYSIS_RULE)
            and e.diagnosis.status in OPEN_STATUSES
            for e in self._s.diagnoses.values()
        )

    def _contrast(self, st: IntentStats, now_ns: int, force: bool) -> list[Diagnosis]:
        """Contrastive diagnoses of ``st``'s failed and healthy conversations, at most once per
        ``contrast_min_count`` new failures (unless forced)."""
        contrasted = self._s.__dict__.setdefault("contrasted", {})  # absent in older snapshots
        then = contrasted.get(st.intent_id)
        if (
            not force
            and then is not None
            and st.total_failures < then + self.cfg.contrast_min_count
        ):
            return []
        contrasted[st.intent_id] = st.total_failures
        window = [*st.failing, *st.healthy]
        found = intent_findings(st.intent_id, st.intent_name, window, self.cfg, now_ns)
        self._keep_unseen(found, {t.conversation_id for t, _ in analysed(window) if t.failed})
        pruned = self._unexplain(st, found, now_ns)
        moved = set().union(
            *(
                _conversations_of(self._s.diagnoses[d.diagnosis_id].diagnosis)
                - _conversations_of(d)
                for d in pruned
            )
        )
        out = []
        lo, hi = st.window_bounds()
        for d in found:
            prev = self._s.diagnoses.get(d.diagnosis_id)
            takes = bool(_conversations_of(d) & moved)  # from an earlier diagnosis: shown now
            if not (self._should_emit(d.diagnosis_id, st, force) or self._regrouped(d) or takes):
                self._relist(d, prev, now_ns)
                continue
            d.window_from_ns, d.window_to_ns = lo, hi
            d = self._with_analyses(d)
            _follows(d, prev)
            self._relisted(d)
            self._s.diagnoses[d.diagnosis_id] = _Emitted(d, st.total_failures)
            out.append(d)
        for d in pruned:
            self._record_narrowed(d)
        return out + pruned

    def _open_contrasts(self, st: IntentStats) -> list[_Emitted]:
        """The open contrast diagnoses of ``st``'s intent."""
        return [
            e
            for e in self._s.diagnoses.values()
            if e.diagnosis.intent_id == st.intent_id
            and e.diagnosis.rule == CONTRAST_RULE
            and e.diagnosis.status in OPEN_STATUSES
        ]

    def _record_narrowed(self, d: Diagnosis) -> None:
        """Record ``d``, a narrowed version of a contrast diagnosis (:func:`_narrowed`); its
        stored list follows. It keeps the failure count it was last emitted at."""
        self._relisted(d)
        self._s.diagnoses[d.diagnosis_id] = _Emitted(
            d, self._s.diagnoses[d.diagnosis_id].total_failures
        )

    # -- the stored list of explained conversations (diagnosis_conversations)

    def _listed(self) -> dict[str, set[str]]:
        """By diagnosis id, the conversations its stored rows list, where an analysis changed
        them since its last version without making a new one (:meth:`_relist`)."""
        listed: dict[str, set[str]] = self._s.__dict__.setdefault("listed", {})  # older snapshots
        return listed

    def _listed_now(self, did: str) -> set[str]:
        """The conversations the stored rows of ``did`` list as explained."""
        e = self._s.diagnoses.get(did)
        return self._listed().get(did, _conversations_of(e.diagnosis) if e else set())

    def _relisted(self, d: Diagnosis) -> None:
        """``d`` is emitted (its rows list what it explains): the conversations listed for it
        before that it no longer explains get a row saying so. Call before recording ``d``."""
        gone = self._listed_now(d.diagnosis_id) - _conversations_of(d)
        self._listed().pop(d.diagnosis_id, None)
        self.explanation_rows += unexplained_rows(d, gone)

    def _relist(self, d: Diagnosis, prev: _Emitted | None, now_ns: int) -> None:
        """``d`` found again, changed too little for a new version (``reemit_growth`` spares a
        reviewer a version for each small change): its stored rows still list every
        conversation it explains now, and no other, at its last version."""
        if prev is None or prev.diagnosis.status not in OPEN_STATUSES:
            return
        d = replace(self._with_analyses(d), version=prev.diagnosis.version, updated_ns=now_ns)
        before, now = self._listed_now(d.diagnosis_id), _conversations_of(d)
        if before == now:
            return
        self.explanation_rows += conversation_rows([d], only=now - before)
        self.explanation_rows += unexplained_rows(d, before - now)
        self._listed()[d.diagnosis_id] = now

    def take_explanation_rows(self) -> list[dict[str, Any]]:
        """The ``diagnosis_conversations`` rows changed beside the diagnoses returned (write
        them after those diagnoses' own rows, in this order): conversations a diagnosis
        explains now without a new version, and ones it no longer explains."""
        out, self.explanation_rows = self.explanation_rows, []
        return out

    def _keep_unseen(self, found: list[Diagnosis], seen: set[str]) -> None:
        """A diagnosis found again keeps the conversations its last version explained that
        this analysis did not look at (``seen``: they left the bounded window) and no other
        diagnosis of it explains: nothing says otherwise of them."""
        taken = set().union(*(_conversations_of(d) for d in found))
        for d in found:
            prev = self._s.diagnoses.get(d.diagnosis_id)
            if prev is None or prev.diagnosis.status not in OPEN_STATUSES:
                continue  # a resolved one found again is a new occurrence
            kept = [
                c
                for c in prev.diagnosis.evidence.get("conversations") or []
                if isinstance(c, dict) and str(c.get("conversation_id")) not in seen | taken
            ]
            d.evidence["conversations"] = [*d.evidence["conversations"], *kept]
            traces = [str(c.get("trace_id") or "") for c in kept]
            d.trace_ids = [t for t in dict.fromkeys([*d.trace_ids, *traces]) if t]

    def _unexplain(self, st: IntentStats, found: list[Diagnosis], now_ns: int) -> list[Diagnosis]:
        """Earlier contrast diagnoses of ``st`` that this analysis (``found``) did not find
        again, each as a new version without the conversations explained otherwise (only
        those that lose some): a conversation stays explained by one contrast diagnosis of its
        intent, the latest analysis', else the most recent earlier one. One that loses all
        explains none now: its new version lists no conversations."""
        taken = set().union(*(_conversations_of(d) for d in found))
        found_ids = {d.diagnosis_id for d in found}
        earlier = [e for e in self._open_contrasts(st) if e.diagnosis.diagnosis_id not in found_ids]
        earlier.sort(
            key=lambda e: (-e.total_failures, -e.diagnosis.updated_ns, e.diagnosis.diagnosis_id)
        )
        out = []
        for e in earlier:
            old = e.diagnosis
            mine = _conversations_of(old)
            if mine & taken:
                out.append(_narrowed(old, taken, now_ns))
            taken |= mine
        return out

    # -- triggers

    def _enough(self, st: IntentStats) -> bool:
        return st.n >= self.cfg.min_support and st.failures >= self.cfg.min_failures

    def _baseline_counts(self, st: IntentStats) -> tuple[int, int]:
        """Window counts of the other intents that are healthy (rate under ``min_failure_rate``).

        Intents that fail themselves are left out: several broken intents would otherwise
        lift the norm and hide each other.
        """
        n = f = 0
        for other in self._s.intents.values():
            if other is st or not other.n or other.rate >= self.cfg.min_failure_rate:
                continue
            n += other.n
            f += other.failures
        return n, f

    def baseline(self, st: IntentStats) -> float | None:
        """The pooled window failure rate of the other, healthy intents (``None``: too few of them)."""
        n, f = self._baseline_counts(st)
        return f / n if n >= self.cfg.min_support else None

    def triggers(self, st: IntentStats) -> list[str]:
        """Why ``st`` deserves a diagnosis now (empty: it does not)."""
        cfg = self.cfg
        if not self._enough(st):
            return []
        reasons = []
        high = st.rate >= cfg.min_failure_rate
        base = self.baseline(st)
        base_n, base_f = self._baseline_counts(st)
        if high and (
            base is None
            or (
                st.rate - base >= cfg.min_lift
                and p_greater(st.n, st.failures, base_n, base_f) < cfg.alpha
            )
        ):
            reasons.append("high_vs_baseline")
        if st.drift_up and st.adwin.estimation >= cfg.min_failure_rate:
            reasons.append("drift")
        if version_shift(st, cfg):
            reasons.append("version_shift")
        since = self._s.seq - st.first_seq + 1
        if high and st.first_seq > cfg.emergence_warmup and st.total / since >= cfg.emergence_share:
            reasons.append("emergence")
        return reasons

    # -- evaluation and emission

    def _evaluate(
        self, st: IntentStats, reasons: list[str], now_ns: int, force: bool
    ) -> list[Diagnosis]:
        cands = run_rules(st, self.cfg)
        if not cands:
            return []
        common = common_evidence(st, self.baseline(st))
        common["trigger"] = reasons
        out = []
        for i, c in enumerate(cands):
            did = diagnosis_id(st.intent_id, c.rule, c.target, c.variant)
            if not self._should_emit(did, st, force):
                continue
            if i == 0 and self.llm_enabled:
                self.llm_requests.append(Refinement(did, llm_bundle(st, common, cands)))
            out.append(self._record(did, st, c, common, now_ns))
        if out:
            st.last_emit_failures = st.total_failures
        return out + self._yield_to_rules(st, out, now_ns)

    def _yield_to_rules(
        self, st: IntentStats, rules: list[Diagnosis], now_ns: int
    ) -> list[Diagnosis]:
        """Open contrast diagnoses of ``st`` that explain conversations these rule diagnoses
        explain, each as a new version without them: a rule names the cause more precisely,
        and one cause must not get two proposals (the contrast ran before the rule fired).
        One left with fewer than ``contrast_min_count`` is superseded (act withdraws its
        proposal)."""
        taken = set().union(*(_conversations_of(d) for d in rules))
        out = []
        for e in self._open_contrasts(st):
            if _conversations_of(e.diagnosis) & taken:
                d = _narrowed(e.diagnosis, taken, now_ns, least=self.cfg.contrast_min_count)
                self._record_narrowed(d)
                out.append(d)
        return out

    def _should_emit(self, did: str, st: IntentStats, force: bool) -> bool:
        prev = self._s.diagnoses.get(did)
        if prev is None:
            return True
        if prev.diagnosis.status == "rejected":
            return False  # a human said no: the same finding is not raised again
        if force:
            return True
        return self._grown(st, prev.total_failures)

    def _regrouped(self, d: Diagnosis) -> bool:
        """A contrast diagnosis found again explains other conversations than its last
        version: at least ``reemit_growth`` of them changed (each conversation is explained
        by one diagnosis of the latest analysis; a later one may group it elsewhere)."""
        prev = self._s.diagnoses.get(d.diagnosis_id)
        if prev is None or prev.diagnosis.status == "rejected":
            return False
        before, now = _conversations_of(prev.diagnosis), _conversations_of(d)
        return len(before ^ now) >= max(1.0, self.cfg.reemit_growth * len(before))

    def _grown(self, st: IntentStats, then: int) -> bool:
        """Failures grew materially since ``then``: by ``reemit_growth`` and ``min_failures``."""
        return st.total_failures >= then + max(then * self.cfg.reemit_growth, self.cfg.min_failures)

    def _record(
        self, did: str, st: IntentStats, c: Candidate, common: dict[str, Any], now_ns: int
    ) -> Diagnosis:
        prev = self._s.diagnoses.get(did)
        lo, hi = st.window_bounds()
        base = common["baseline_rate"]
        shift = c.evidence.get("version_shift")
        if shift:  # a regression's baseline is the previous versions, not the other intents
            base = shift["previous_rate"]
        d = Diagnosis(
            diagnosis_id=did,
            intent_id=st.intent_id,
            intent_name=st.intent_name,
            rule=c.rule,
            summary=c.summary,
            root_cause=c.root_cause,
            component=c.component,
            confidence=c.confidence,
            evidence={**common, **c.evidence},
            trace_ids=c.trace_ids,
            support=st.n,
            failures=st.failures,
            failure_rate=round(st.rate, 4),
            baseline_rate=base or 0.0,
            prompt_version=c.prompt_version,
            agent_version=c.agent_version,
            window_from_ns=lo,
            window_to_ns=hi,
            updated_ns=now_ns,
        )
        _follows(d, prev)
        d.evidence["conversations"] = c.explains or _explained(st, d.trace_ids)
        d = self._with_analyses(d)
        self._relisted(d)
        self._s.diagnoses[did] = _Emitted(d, st.total_failures)
        return d

    # -- the LLM's per-conversation failure analysis (.analysis)

    def _analyses(self, intent_id: str) -> dict[str, Analysis]:
        """The accepted analyses of an intent's conversations, by conversation id."""
        every = self._s.__dict__.setdefault("analyses", {})  # absent in older snapshots
        found: dict[str, Analysis] = every.setdefault(intent_id, {})
        return found

    def _sample_for_analysis(self, st: IntentStats) -> None:
        """Ask about the intent's newest failed conversations, up to ``llm_analysis_sample``."""
        asked = self._s.__dict__.setdefault("analysis_asked", {}).setdefault(st.intent_id, set())
        if len(asked) >= self.cfg.llm_analysis_sample:
            return
        tools = tools_of([*st.failing, *st.healthy])
        for t in reversed(st.failing):
            if len(asked) >= self.cfg.llm_analysis_sample:
                return
            if t.conversation_id in asked:
                continue
            req = analysis_request(t, tools)
            if req is not None:
                asked.add(t.conversation_id)
                self.analysis_requests.append(req)

    def _with_analyses(self, d: Diagnosis) -> Diagnosis:
        """``d`` explaining too the analysed conversations of its kind and tool (a new version
        of a deterministic diagnosis keeps the conversations the analyses added)."""
        if d.rule == ANALYSIS_RULE:
            return d
        group = [
            a for a in self._analyses(d.intent_id).values() if joins(d, a.failure_kind, a.tool)
        ]
        return with_conversations(d, group) or d

    def take_analysis_requests(self) -> list[AnalysisRequest]:
        out, self.analysis_requests = self.analysis_requests, []
        return out

    def apply_analysis(self, req: AnalysisRequest, a: Analysis, now_ns: int) -> list[Diagnosis]:
        """Group a validated analysis (:func:`~.analysis.ask_analysis`) into its intent's
        diagnoses: the open deterministic ones of its kind and tool explain its conversation
        too (their next version); else, once ``llm_analysis_min_agree`` analyses agree, they
        make a diagnosis of their own. Returns the diagnoses changed."""
        analyses = self._analyses(req.intent_id)
        analyses[a.conversation_id] = a
        group = [
            x for x in analyses.values() if (x.failure_kind, x.tool) == (a.failure_kind, a.tool)
        ]
        out = []
        for e in self._s.diagnoses.values():
            d = e.diagnosis
            if (
                d.intent_id != req.intent_id
                or d.rule == ANALYSIS_RULE
                or d.status not in OPEN_STATUSES
                or not joins(d, a.failure_kind, a.tool)
            ):
                continue
            joined = with_conversations(d, group)
            if joined is not None:
                e.diagnosis = replace(joined, version=d.version + 1, updated_ns=now_ns)
                out.append(e.diagnosis)
        if out or len(group) < self.cfg.llm_analysis_min_agree:
            return out
        did = diagnosis_id(req.intent_id, ANALYSIS_RULE, a.tool, a.failure_kind)
        prev = self._s.diagnoses.get(did)
        if prev is not None and prev.diagnosis.status == "rejected":
            return []
        if prev is not None and with_conversations(prev.diagnosis, group) is None:
            return []  # nothing new
        d = analysis_diagnosis(did, req.intent_id, req.intent_name, group, len(analyses))
        st = self._s.intents.get(req.intent_id)
        if st is not None:
            d.support, d.failures, d.failure_rate = st.n, st.failures, round(st.rate, 4)
            d.baseline_rate = self.baseline(st) or 0.0
            d.window_from_ns, d.window_to_ns = st.window_bounds()
        _follows(d, prev)
        d.updated_ns = now_ns
        self._s.diagnoses[did] = _Emitted(d, st.total_failures if st is not None else 0)
        return [d]

    # -- the LLM's wording, when it comes

    def take_llm_requests(self) -> list[Refinement]:
        out, self.llm_requests = self.llm_requests, []
        return out

    def refine(self, req: Refinement, answer: dict[str, Any], now_ns: int) -> Diagnosis | None:
        """The diagnosis of ``req`` reworded by ``answer`` (validated by
        :func:`~.llm.ask_refinement`) as its next version; ``None`` when a human closed it."""
        e = self._s.diagnoses.get(req.diagnosis_id)
        if e is None or e.diagnosis.status in CLOSED_STATUSES:
            return None
        e.diagnosis = refined(e.diagnosis, answer, req.bundle, now_ns)
        return e.diagnosis

    def improve(self, llm: ChatJSON, now_ns: int) -> list[Diagnosis]:
        """Answer the waiting requests now, in line (no stream waits): the reworded diagnoses,
        then those the failure analyses joined or made."""
        out = []
        for req in self.take_llm_requests():
            try:
                answer = ask_refinement(req.bundle, llm)
            except LLMError as e:
                self.llm_rejections.append(str(e))
                continue
            d = self.refine(req, answer, now_ns)
            if d is not None:
                out.append(d)
        return out + self.analyse(self.take_analysis_requests(), llm, now_ns)[0]

    def analyse_now(
        self, intent_id: str, llm: ChatJSON, now_ns: int
    ) -> tuple[list[Diagnosis], list[dict[str, Any]]]:
        """The waiting failure analyses of ``intent_id`` answered in line (``closeloop
        diagnose``), as the stream's LLM step answers them; the other intents' are dropped."""
        reqs = [r for r in self.take_analysis_requests() if r.intent_id == intent_id]
        return self.analyse(reqs, llm, now_ns)

    def analyse(
        self, reqs: Iterable[AnalysisRequest], llm: ChatJSON, now_ns: int
    ) -> tuple[list[Diagnosis], list[dict[str, Any]]]:
        """Ask ``llm`` about each request and group the accepted answers
        (:meth:`apply_analysis`): the diagnoses they joined or made, and the
        ``failure_analyses`` rows. A refused answer goes to ``llm_rejections``."""
        out: list[Diagnosis] = []
        rows = []
        for req in reqs:
            try:
                a = ask_analysis(req, llm)
            except LLMError as e:
                self.llm_rejections.append(str(e))
                continue
            rows.append(analysis_row(req, a, now_ns))
            out += self.apply_analysis(req, a, now_ns)
        return out, rows

    # -- inspection and state

    def open_diagnoses(self) -> list[Diagnosis]:
        """The latest version of every open or proposed diagnosis, by intent then id."""
        ds = [
            e.diagnosis for e in self._s.diagnoses.values() if e.diagnosis.status in OPEN_STATUSES
        ]
        return sorted(ds, key=lambda d: (d.intent_id, d.diagnosis_id))

    def set_status(self, diagnosis_id: str, status: str, now_ns: int) -> Diagnosis:
        """Record a status change from act/review (``proposed``, ``resolved``, ``rejected``)."""
        if status not in ("open", "proposed", "resolved", "rejected"):
            raise ValueError(f"unknown diagnosis status {status!r}")
        e = self._s.diagnoses.get(diagnosis_id)
        if e is None:
            raise KeyError(diagnosis_id)
        e.diagnosis = replace(
            e.diagnosis, status=status, version=e.diagnosis.version + 1, updated_ns=now_ns
        )
        return e.diagnosis

    def intent_stats(self, intent_id: str) -> IntentStats | None:
        return self._s.intents.get(intent_id)

    def snapshot(self) -> bytes:
        """The whole state (config included, LLM requests excluded) as bytes for a checkpoint.

        Pickle, so only restore snapshots this process family wrote (a trusted changelog).
        """
        return zlib.compress(
            pickle.dumps((SNAPSHOT_FORMAT, self.cfg, self._s), protocol=pickle.HIGHEST_PROTOCOL)
        )

    def restore(self, data: bytes) -> None:
        """Put the diagnoser in the state of :meth:`snapshot`, its config included."""
        try:
            fmt, cfg, state = pickle.loads(zlib.decompress(data))
        except (zlib.error, pickle.UnpicklingError, ValueError, EOFError) as e:
            raise InputError("unreadable diagnoser snapshot", stage=STAGE, detail=str(e)) from None
        if fmt != SNAPSHOT_FORMAT:
            raise InputError(
                f"diagnoser snapshot format {fmt}, expected {SNAPSHOT_FORMAT}", stage=STAGE
            )
        cfg.validate()
        self.cfg = cfg
        self._s = state


def _narrowed(old: Diagnosis, taken: set[str], now_ns: int, least: int = 1) -> Diagnosis:
    """The next version of contrast diagnosis ``old`` without the conversations in ``taken``
    (explained otherwise now); superseded, listing none, when fewer than ``least`` remain."""
    kept = [c for c in old.evidence["conversations"] if str(c.get("conversation_id")) not in taken]
    if len(kept) < least:
        kept = []
    traces = {str(c.get("trace_id")) for c in kept}
    return replace(
        old,
        evidence={**old.evidence, "conversations": kept},
        trace_ids=[t for t in old.trace_ids if t in traces],
        status=old.status if kept else "superseded",
        version=old.version + 1,
        updated_ns=now_ns,
    )


def _explained(st: IntentStats, trace_ids: list[str]) -> list[dict[str, Any]]:
    """The failing conversations of ``st`` holding one of ``trace_ids`` (a rule's evidence)."""
    wanted = set(trace_ids)
    out = []
    for t in st.failing:
        conv = t.conversation
        hit = next((tr for tr in (conv.trace_ids if conv else []) if tr in wanted), "")
        if hit:
            out.append(
                {"conversation_id": t.conversation_id, "trace_id": hit,
                 "turn": t.outcome_turn, "tool": "", "arguments": ""}
            )  # fmt: skip
    return out


def diagnosis_rows(diags: Iterable[Diagnosis]) -> list[dict[str, Any]]:
    """Rows for the ``diagnoses`` table (schemas/003_loop.sql), component and evidence as JSON."""
    rows = []
    for d in diags:
        row = {f: getattr(d, f) for f in DIAGNOSIS_COLUMNS}
        row["component"] = json.dumps(d.component, ensure_ascii=False, sort_keys=True, default=str)
        row["evidence"] = json.dumps(d.evidence, ensure_ascii=False, sort_keys=True, default=str)
        rows.append(row)
    return rows


DIAGNOSIS_COLUMNS = (
    "diagnosis_id",
    "intent_id",
    "intent_name",
    "rule",
    "failure_kind",
    "summary",
    "root_cause",
    "component",
    "confidence",
    "evidence",
    "trace_ids",
    "support",
    "failures",
    "failure_rate",
    "baseline_rate",
    "prompt_version",
    "agent_version",
    "window_from_ns",
    "window_to_ns",
    "status",
    "version",
    "updated_ns",
    "source",
)
