"""When a version counts as an improvement on its parent: the rule behind `model_version.improved`.

The change is measured the way benchmark_step measures it (direction-aware: positive = better), then held against
the threshold (HOKUSAI_IMPROVEMENT_THRESHOLD, default 0.01):

- both values in [0, 1] (accuracy, F1, AUC, an error rate): the absolute change must reach the threshold, so 0.01
  means one percentage point (0.80 -> 0.81 counts, 0.80 -> 0.805 does not);
- otherwise (a loss, an RMSE, a count): the change relative to the parent's magnitude must reach it, so 0.01 means
  one per cent (an RMSE of 2.0 -> 1.98 counts, 2.0 -> 1.99 does not); a parent of exactly 0 has no relative scale,
  and any strict improvement on it counts.

A regression, no change, a change below the threshold, or a side without a (finite) value is never an improvement.
Pure: no I/O, so the rule is tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher_is_better", "lower_is_better"]
Rule = Literal["absolute", "relative", "zero_parent"]
# Slack for the comparison with the threshold: 0.82 - 0.81 is 0.00999999999999989 in binary floating point, and one
# percentage point must count as one percentage point.
THRESHOLD_SLACK = 1e-9


@dataclass(frozen=True)
class ImprovementCheck:
    """A version's benchmark value measured against its parent's, and whether the change earns `improved`."""

    metric: str
    value: float
    parent_value: float
    delta: float  # value - parent_value, signed as measured
    improvement: float  # direction-aware: positive = better
    relative: float | None  # improvement / |parent_value|; None when the parent is 0
    threshold: float
    direction: Direction
    rule: Rule  # which test applied: absolute (both in [0, 1]), relative, or zero_parent
    improved: bool


def unit_interval(value: float) -> bool:
    return 0.0 <= value <= 1.0


def reaches(amount: float, threshold: float) -> bool:
    """`amount >= threshold`, forgiving the rounding of a subtraction of two decimals."""
    return amount >= threshold - THRESHOLD_SLACK * max(1.0, abs(threshold))


def check_improvement(
    metric: str, value: float | None, parent_value: float | None, lower_is_better: bool, threshold: float
) -> ImprovementCheck | None:
    """The measure of `value` against `parent_value` on `metric`; None when either is missing or not finite."""
    if value is None or parent_value is None or not (math.isfinite(value) and math.isfinite(parent_value)):
        return None
    delta = value - parent_value
    improvement = -delta if lower_is_better else delta
    relative = improvement / abs(parent_value) if parent_value != 0 else None
    if unit_interval(value) and unit_interval(parent_value):
        rule: Rule = "absolute"
        improved = improvement > 0 and reaches(improvement, threshold)
    elif relative is not None:
        rule = "relative"
        improved = improvement > 0 and reaches(relative, threshold)
    else:  # a parent of 0 outside [0, 1] (the value is not): nothing to be relative to
        rule = "zero_parent"
        improved = improvement > 0
    return ImprovementCheck(
        metric=metric,
        value=value,
        parent_value=parent_value,
        delta=delta,
        improvement=improvement,
        relative=relative,
        threshold=threshold,
        direction="lower_is_better" if lower_is_better else "higher_is_better",
        rule=rule,
        improved=improved,
    )
