"""Stated outcomes: which evaluation means failure, and that they win over the heuristic."""

from __future__ import annotations

import pytest

from processors.config import ConfigError, UnderstandConfig, load_config
from processors.records import Evaluation
from processors.understand.outcomes import decide, evaluation_fails, stated_verdict

CFG = UnderstandConfig()


@pytest.mark.parametrize(
    "ev, fails",
    [
        (Evaluation(name="task", score=0.0), True),
        (Evaluation(name="task", score=1.0), False),
        (Evaluation(name="task", score=0.5), False),
        (Evaluation(name="task", label="FAIL"), True),
        (Evaluation(name="task", label="pass", score=0.0), False),  # the label decides
        (Evaluation(name="task", label="thumbs_down"), True),
        (Evaluation(name="task", label="interesting"), None),
        (Evaluation(name="task"), None),
        (Evaluation(name="closeloop.outcome", label="escalated"), False),
        (Evaluation(name="closeloop.outcome", label="abandoned"), True),
    ],
)
def test_default_reading(ev: Evaluation, fails: bool | None) -> None:
    assert evaluation_fails(ev, CFG) is fails


def test_configured_threshold_and_labels() -> None:
    cfg = UnderstandConfig(outcome_fail_below=3.0, outcome_fail_labels=["meh"])
    assert evaluation_fails(Evaluation(score=2.0), cfg) is True
    assert evaluation_fails(Evaluation(score=4.0), cfg) is False
    assert evaluation_fails(Evaluation(label="meh"), cfg) is True
    assert evaluation_fails(Evaluation(label="fail"), cfg) is None
    assert UnderstandConfig(escalation_is_failure=True) and evaluation_fails(
        Evaluation(name="closeloop.outcome", label="escalated"),
        UnderstandConfig(escalation_is_failure=True),
    )


def test_a_label_both_ways_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="outcome_fail_labels"):
        load_config(env={}, overrides={"understand.outcome_fail_labels": ["pass"]})


def test_stated_wins_over_heuristic_and_newest_per_name_counts() -> None:
    late_pass = [
        Evaluation(name="reward", score=0.0, ts_ns=1),
        Evaluation(name="reward", score=1.0, ts_ns=2),
    ]
    v = decide(late_pass, ("errored", 3, "tool failed"), CFG)
    assert (v.outcome, v.failed, v.source) == ("resolved", False, "stated")
    v = decide(
        [Evaluation(name="reward", score=0.0, explanation="wrong seat")],
        ("resolved", 1, "answered"),
        CFG,
    )
    assert (v.outcome, v.failed, v.source) == ("failed", True, "stated")
    assert "wrong seat" in v.reason
    # one failing evaluation among passing ones fails the conversation
    mixed = [Evaluation(name="a", label="pass"), Evaluation(name="b", label="fail")]
    assert stated_verdict(mixed, CFG).failed is True


def test_unreadable_or_filtered_evaluations_leave_the_heuristic() -> None:
    v = decide([Evaluation(name="tone", label="warm")], ("abandoned", 2, "idle"), CFG)
    assert (v.outcome, v.failed, v.source, v.turn) == ("abandoned", True, "heuristic", 2)
    only_reward = UnderstandConfig(outcome_evaluations=["reward"])
    v = decide([Evaluation(name="tone", score=0.0)], ("resolved", 1, "answered"), only_reward)
    assert v.source == "heuristic" and not v.failed
    v = decide(
        [Evaluation(name="closeloop.outcome", label="escalated")], ("resolved", 1, ""), only_reward
    )
    assert (v.outcome, v.failed) == ("escalated", False)
