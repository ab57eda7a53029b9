"""Verification statistics against textbook values and scipy, and verdicts on synthetic streams."""

from __future__ import annotations

import random

import pytest
from scipy import stats as sp

from processors.stats import (
    Counts,
    confounding,
    fisher_exact,
    guarded_verdict,
    newcombe_interval,
    two_proportion_z,
    verdict,
    wald_interval,
    wilson_interval,
)


def test_fisher_on_the_tea_tasting_table_and_its_symmetries() -> None:
    # Fisher's lady tasting tea: [[3, 1], [1, 3]], two-sided p = 34/70
    assert fisher_exact(4, 3, 4, 1) == pytest.approx(34 / 70, rel=1e-12)
    assert fisher_exact(0, 0, 0, 0) == 1.0  # an empty table says nothing
    rng = random.Random(7)
    for _ in range(100):
        n1, n2 = rng.randint(1, 80), rng.randint(1, 80)
        x1, x2 = rng.randint(0, n1), rng.randint(0, n2)
        p = fisher_exact(n1, x1, n2, x2)
        assert 0.0 < p <= 1.0
        # swapping the groups, or failures with successes, is the same table
        assert fisher_exact(n2, x2, n1, x1) == pytest.approx(p, rel=1e-9)
        assert fisher_exact(n1, n1 - x1, n2, n2 - x2) == pytest.approx(p, rel=1e-9)


def test_two_proportion_z_matches_the_pooled_formula_and_scipy() -> None:
    z, p = two_proportion_z(200, 60, 200, 20)
    assert z == pytest.approx(-5.0)  # (0.1-0.3)/sqrt(0.2*0.8*(2/200)) = -5
    assert p == pytest.approx(2 * sp.norm.sf(5.0), rel=1e-9)
    assert two_proportion_z(50, 0, 50, 0) == (0.0, 1.0)


def test_newcombe_interval_reproduces_newcombe_1998_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, method 10: 56/70 - 48/80 -> (0.0524, 0.3339)
    low, high = newcombe_interval(80, 48, 70, 56)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_wald_and_wilson_intervals() -> None:
    low, high = wald_interval(80, 48, 70, 56)
    assert (round(low, 4), round(high, 4)) == (0.0575, 0.3425)
    # Wilson 95% interval for 81/263 (Newcombe's single-proportion example): 0.2553 to 0.3662
    low, high = wilson_interval(263, 81)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_counts_are_checked() -> None:
    with pytest.raises(ValueError):
        fisher_exact(10, 11, 10, 1)
    with pytest.raises(ValueError):
        verdict(10, 1, 10, 1, min_after=5, alpha=1.5)


def stream(rng: random.Random, n: int, rate: float) -> int:
    """Failures among ``n`` seeded Bernoulli(rate) conversations."""
    return sum(rng.random() < rate for _ in range(n))


@pytest.mark.parametrize(
    "after_rate,expected", [(0.10, "fixed"), (0.30, "no_effect"), (0.55, "regressed")]
)
def test_verdicts_on_synthetic_before_after_streams(after_rate: float, expected: str) -> None:
    rng = random.Random(42)
    before = stream(rng, 300, 0.30)
    after = stream(rng, 300, after_rate)
    v, p, low, high = verdict(300, before, 300, after, min_after=30, alpha=0.05)
    assert v == expected
    assert low <= after / 300 - before / 300 <= high
    assert (p < 0.05) == (expected != "no_effect")


def test_not_enough_data_below_min_after() -> None:
    assert verdict(300, 90, 29, 0, min_after=30, alpha=0.05)[0] == "not_enough_data"
    assert verdict(29, 20, 300, 3, min_after=30, alpha=0.05)[0] == "not_enough_data"


def test_z_alone_is_not_enough_when_fisher_disagrees() -> None:
    # 30/30 conversations: 9 failures before, 2 after. z says p=0.020, Fisher p=0.042 -> both < 0.05
    assert verdict(30, 9, 30, 2, min_after=30, alpha=0.05)[0] == "fixed"
    # 8 -> 2: z p=0.038 but Fisher p=0.080 -> not claimed as fixed
    _, p_z = two_proportion_z(30, 8, 30, 2)
    assert p_z < 0.05 < fisher_exact(30, 8, 30, 2)
    assert verdict(30, 8, 30, 2, min_after=30, alpha=0.05)[0] == "no_effect"


def test_traffic_share_shift_is_flagged_as_confounded() -> None:
    target = Counts(300, 90, 300, 30)
    # the intent was 10% of traffic before and 40% after: a different population
    reason = confounding(target, [], total_before=3000, total_after=750, alpha=0.05)
    assert "share of traffic" in reason
    v = guarded_verdict(target, [], total_before=3000, total_after=750, min_after=30, alpha=0.05)
    assert v[0] == "no_effect" and v[4] == reason


def test_controls_moving_the_same_way_are_flagged() -> None:
    target = Counts(300, 90, 300, 30)  # 30% -> 10%
    controls = [Counts(1000, 300, 1000, 150), Counts(500, 150, 500, 80)]  # pooled 30% -> 15.3%
    v = guarded_verdict(
        target, controls, total_before=1800, total_after=1800, min_after=30, alpha=0.05
    )
    assert v[0] == "no_effect" and "control intents moved the same way" in v[4]
    steady = [Counts(1000, 300, 1000, 290), Counts(500, 150, 500, 155)]
    v = guarded_verdict(
        target, steady, total_before=1800, total_after=1800, min_after=30, alpha=0.05
    )
    assert v[0] == "fixed" and v[4] == ""
