"""How a conversation ended: what the agent (or a user, or a grader) stated wins over heuristics.

Stated outcomes are :class:`~processors.records.Evaluation` records, gathered by capture and
assemble from

* OTel GenAI evaluation events ``gen_ai.evaluation.result`` (a span event or a log record:
  ``gen_ai.evaluation.name``, ``gen_ai.evaluation.score.value``,
  ``gen_ai.evaluation.score.label``, ``gen_ai.evaluation.explanation``),
* the span attribute ``closeloop.outcome`` (one of :data:`OUTCOMES`) with
  ``closeloop.outcome.reason``,
* late feedback (``closeloop feedback``, ``POST /api/feedback``), which re-versions the tags.

Which evaluation means failure is configuration (:class:`~processors.config.UnderstandConfig`):
a label in ``outcome_fail_labels`` fails, one in ``outcome_pass_labels`` passes, otherwise a
score below ``outcome_fail_below`` fails. The newest evaluation of each name counts; the
conversation failed if any counted evaluation fails. Without any, the structural heuristic
of :mod:`.signals` decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from processors.config import UnderstandConfig
from processors.records import OUTCOME_ATTRIBUTE, OUTCOMES, Evaluation

FAILED_OUTCOMES = frozenset({"failed", "abandoned", "errored"})


@dataclass(frozen=True)
class Verdict:
    """The outcome decided for one conversation."""

    outcome: str
    failed: bool
    source: str  # heuristic | stated
    reason: str
    turn: int = -1


def is_failure(outcome: str, cfg: UnderstandConfig) -> bool:
    return outcome in FAILED_OUTCOMES or (outcome == "escalated" and cfg.escalation_is_failure)


def evaluation_fails(ev: Evaluation, cfg: UnderstandConfig) -> bool | None:
    """True (fails), False (passes) or None (says nothing this configuration can read).

    >>> cfg = UnderstandConfig()
    >>> [evaluation_fails(Evaluation(score=s), cfg) for s in (0.0, 1.0, 0.49)]
    [True, False, True]
    >>> evaluation_fails(Evaluation(label="Pass"), cfg), evaluation_fails(Evaluation(label="meh"), cfg)
    (False, None)
    """
    label = ev.label.strip().lower()
    if ev.name == OUTCOME_ATTRIBUTE and label in OUTCOMES:
        return is_failure(label, cfg)
    if label and label in {x.lower() for x in cfg.outcome_fail_labels}:
        return True
    if label and label in {x.lower() for x in cfg.outcome_pass_labels}:
        return False
    if ev.score is not None:
        return ev.score < cfg.outcome_fail_below
    return None


def _describe(ev: Evaluation) -> str:
    parts = [ev.source, ev.name or "evaluation"]
    if ev.label:
        parts.append(f"label={ev.label}")
    if ev.score is not None:
        parts.append(f"score={ev.score:g}")
    text = " ".join(parts)
    return f"{text}: {ev.explanation[:200]}" if ev.explanation else text


def stated_verdict(evaluations: list[Evaluation], cfg: UnderstandConfig) -> Verdict | None:
    """The outcome the evaluations state, or None when none of them can be read."""
    wanted = set(cfg.outcome_evaluations)
    newest: dict[str, tuple[Evaluation, bool]] = {}
    for ev in sorted(evaluations, key=lambda e: e.ts_ns):  # stable: arrival order on ties
        if wanted and ev.name not in wanted and ev.name != OUTCOME_ATTRIBUTE:
            continue
        fails = evaluation_fails(ev, cfg)
        if fails is not None:
            newest[ev.name] = (ev, fails)
    if not newest:
        return None
    failing = [ev for ev, fails in newest.values() if fails]
    decisive = failing[-1] if failing else max((ev for ev, _ in newest.values()), key=_ts)
    label = decisive.label.strip().lower()
    if decisive.name == OUTCOME_ATTRIBUTE and label in OUTCOMES:
        outcome = label
    else:
        outcome = "failed" if failing else "resolved"
    return Verdict(outcome, bool(failing), "stated", _describe(decisive))


def _ts(ev: Evaluation) -> int:
    return ev.ts_ns


def decide(
    evaluations: list[Evaluation],
    heuristic: tuple[str, int, str],
    cfg: UnderstandConfig,
) -> Verdict:
    """Stated outcomes first; the heuristic ``(outcome, turn, why)`` where nothing was stated."""
    stated = stated_verdict(evaluations, cfg)
    if stated is not None:
        return stated
    outcome, turn, why = heuristic
    return Verdict(outcome, is_failure(outcome, cfg), "heuristic", why, turn)
