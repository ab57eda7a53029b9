"""Verification statistics for layer 5: did a merged change move its intent's failure rate?

Pure functions over counts. The verdict compares the failure rate of an intent before a
change (``before_n`` conversations, ``before_fail`` of them failed) with its rate after it:

* ``not_enough_data`` — fewer than ``min_after`` conversations on either side;
* ``fixed`` / ``regressed`` — the rate went down / up and *both* the two-proportion z-test
  and Fisher's exact test reject "no difference" at ``alpha`` (the reported p-value is the
  larger of the two: the z-test is an approximation that is too eager on small or extreme
  samples, Fisher's test is exact but conservative; requiring both keeps false "fixed"
  claims rare);
* ``no_effect`` — otherwise, or when :func:`confounding` finds a reason not to attribute
  the difference to the change.

>>> verdict(200, 60, 200, 20, min_after=30, alpha=0.05)[0]
'fixed'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binomtest, norm
from scipy.stats import fisher_exact as _scipy_fisher_exact

FIXED = "fixed"
NO_EFFECT = "no_effect"
REGRESSED = "regressed"
NOT_ENOUGH_DATA = "not_enough_data"
VERDICTS = (FIXED, NO_EFFECT, REGRESSED, NOT_ENOUGH_DATA)

CONFIDENCE = 0.95
Z_95 = float(norm.ppf(0.5 + CONFIDENCE / 2))
# An intent whose share of all traffic grew or shrank by more than this factor between the two
# windows is a different population: users (or the taxonomy) moved, not only the agent.
SHARE_SHIFT_FACTOR = 2.0
# Controls explain the change when they moved the same way by at least this fraction of it.
CONTROL_SHIFT_FRACTION = 0.5


def two_proportion_z(n1: int, x1: int, n2: int, x2: int) -> tuple[float, float]:
    """Pooled two-proportion z-test of ``x1/n1`` vs ``x2/n2``: ``(z, two-sided p)``.

    ``z`` is positive when the second rate is higher. No variance (all or none failed on
    both sides) gives ``(0.0, 1.0)``.
    """
    _check(n1, x1)
    _check(n2, x2)
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    p = (x1 + x2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x2 / n2 - x1 / n1) / se
    return z, min(1.0, float(2 * norm.sf(abs(z))))


def fisher_exact(n1: int, x1: int, n2: int, x2: int) -> float:
    """Two-sided p-value of Fisher's exact test on the 2x2 table [[x1, n1-x1], [x2, n2-x2]]
    (scipy's: the tables with the same margins at most as likely as the observed one)."""
    _check(n1, x1)
    _check(n2, x2)
    if n1 + n2 == 0:
        return 1.0
    return min(1.0, float(_scipy_fisher_exact([[x1, n1 - x1], [x2, n2 - x2]])[1]))


def wilson_interval(n: int, x: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion ``x/n`` (scipy's ``binomtest(...).proportion_ci``)."""
    _check(n, x)
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(x, n).proportion_ci(confidence_level=confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def newcombe_interval(
    n1: int, x1: int, n2: int, x2: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Newcombe's hybrid score interval (his method 10) for ``x2/n2 - x1/n1``.

    Good coverage down to small samples and never outside [-1, 1], unlike Wald.
    """
    p1 = x1 / n1 if n1 else 0.0
    p2 = x2 / n2 if n2 else 0.0
    l1, u1 = wilson_interval(n1, x1, confidence)
    l2, u2 = wilson_interval(n2, x2, confidence)
    d = p2 - p1
    low = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    high = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return max(-1.0, low), min(1.0, high)


def wald_interval(n1: int, x1: int, n2: int, x2: int, z: float = Z_95) -> tuple[float, float]:
    """The textbook Wald interval for ``x2/n2 - x1/n1`` (for comparison; prefer Newcombe)."""
    _check(n1, x1)
    _check(n2, x2)
    if n1 == 0 or n2 == 0:
        return -1.0, 1.0
    p1, p2 = x1 / n1, x2 / n2
    half = z * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return max(-1.0, p2 - p1 - half), min(1.0, p2 - p1 + half)


def _check(n: int, x: int) -> None:
    if n < 0 or x < 0 or x > n:
        raise ValueError(f"counts must satisfy 0 <= failures <= n, got failures={x}, n={n}")


def verdict(
    before_n: int, before_fail: int, after_n: int, after_fail: int, min_after: int, alpha: float
) -> tuple[str, float, float, float]:
    """``(verdict, p_value, ci_low, ci_high)``; the interval is for ``rate_after - rate_before``.

    >>> verdict(200, 60, 10, 0, min_after=30, alpha=0.05)[0]
    'not_enough_data'
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be within (0, 1), got {alpha}")
    low, high = newcombe_interval(before_n, before_fail, after_n, after_fail)
    if before_n < min_after or after_n < min_after:
        return NOT_ENOUGH_DATA, 1.0, low, high
    _, p_z = two_proportion_z(before_n, before_fail, after_n, after_fail)
    p = max(p_z, fisher_exact(before_n, before_fail, after_n, after_fail))
    if p >= alpha:
        return NO_EFFECT, p, low, high
    after_rate, before_rate = after_fail / after_n, before_fail / before_n
    return (FIXED if after_rate < before_rate else REGRESSED), p, low, high


@dataclass(frozen=True)
class Counts:
    """Conversations and failures of one intent in the before and the after window."""

    before_n: int
    before_fail: int
    after_n: int
    after_fail: int

    @property
    def diff(self) -> float:
        """``rate_after - rate_before`` (0 when a side is empty)."""
        if not self.before_n or not self.after_n:
            return 0.0
        return self.after_fail / self.after_n - self.before_fail / self.before_n


def confounding(
    target: Counts, controls: Sequence[Counts], *, total_before: int, total_after: int, alpha: float
) -> str:
    """A reason why the target's change cannot be attributed to the merge, or ``""``.

    Two rules, applied only when there is a difference to explain:

    1. *Traffic shift*: the intent's share of all conversations changed by more than
       ``SHARE_SHIFT_FACTOR`` (e.g. 10% of traffic before, 3% after) — the population changed.
    2. *Common trend*: the control intents (pooled) moved in the same direction, by at least
       ``CONTROL_SHIFT_FRACTION`` of the target's change, and their own change is significant
       (z-test at ``alpha``) — something other than this change moved every intent.
    """
    if target.diff == 0:
        return ""
    if total_before and total_after and target.before_n and target.after_n:
        share_before = target.before_n / total_before
        share_after = target.after_n / total_after
        ratio = max(share_before, share_after) / min(share_before, share_after)
        if ratio > SHARE_SHIFT_FACTOR:
            return (
                f"the intent's share of traffic moved from {share_before:.1%} to "
                f"{share_after:.1%}; the population changed, not only the agent"
            )
    pooled = Counts(
        sum(c.before_n for c in controls),
        sum(c.before_fail for c in controls),
        sum(c.after_n for c in controls),
        sum(c.after_fail for c in controls),
    )
    if pooled.before_n and pooled.after_n:
        same_way = pooled.diff * target.diff > 0
        large = abs(pooled.diff) >= CONTROL_SHIFT_FRACTION * abs(target.diff)
        _, p = two_proportion_z(
            pooled.before_n, pooled.before_fail, pooled.after_n, pooled.after_fail
        )
        if same_way and large and p < alpha:
            return (
                f"control intents moved the same way ({pooled.diff:+.1%} vs {target.diff:+.1%} "
                f"for this intent, p={p:.3g}); the change cannot be attributed to the merge"
            )
    return ""


def guarded_verdict(
    target: Counts,
    controls: Sequence[Counts],
    *,
    total_before: int,
    total_after: int,
    min_after: int,
    alpha: float,
) -> tuple[str, float, float, float, str]:
    """:func:`verdict` for the target, downgraded to ``no_effect`` when :func:`confounding`
    objects; the fifth element is the objection (``""`` when none)."""
    v, p, low, high = verdict(
        target.before_n, target.before_fail, target.after_n, target.after_fail, min_after, alpha
    )
    if v not in (FIXED, REGRESSED):
        return v, p, low, high, ""
    reason = confounding(
        target, controls, total_before=total_before, total_after=total_after, alpha=alpha
    )
    return (NO_EFFECT if reason else v), p, low, high, reason
