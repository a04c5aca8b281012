"""How the benches read a step target: the median of per-round ratios with a distribution-free
95% interval (bench.harness.median_interval), and a target met or missed only by the whole
interval (bench.lora_step.report.step_target)."""

from __future__ import annotations

import random

import pytest

from bench.harness import median_interval
from bench.lora_step.report import check_targets, step_target, target_verdict


def test_the_interval_holds_the_median_as_often_as_it_says():
    # Independent check by simulation: draws from a skewed noise (a step slowed at random,
    # as on this VM) whose median is known; the interval must hold it at least 95% of the
    # time, and not much more often than its exact binomial coverage allows.
    rng = random.Random(0)
    true_median = 1.0 + 0.1 * 0.6931471805599453  # of 1 + Exp(mean 0.1): 1 + 0.1 ln 2
    held = trials = 0
    for _ in range(4000):
        values = [1.0 + rng.expovariate(10.0) for _ in range(16)]
        low, high = median_interval(values)
        held += low <= true_median <= high
        trials += 1
    # n = 16: [x(4), x(13)] covers 1 - 2 * P(Bin(16, 1/2) <= 3) = 0.9787; x(5)..x(12) only 0.9232.
    assert 0.965 <= held / trials <= 0.99


def test_the_interval_is_those_order_statistics_and_needs_six_values():
    values = list(range(16, 0, -1))  # 16 .. 1, unsorted on purpose
    assert median_interval(values) == (4, 13)
    assert median_interval([1, 2, 3, 4, 5, 6]) == (1, 6)  # 1 - 2/64 = 0.969
    assert median_interval([1, 2, 3, 4, 5]) is None  # 1 - 2/32 = 0.9375 < 0.95


def found(per_round):
    from statistics import median

    return {"median_of_rounds": median(per_round), "interval": median_interval(per_round),
            "of_min": 1.0, "per_round": per_round}


@pytest.mark.parametrize("per_round, expected", [
    ([0.80 + 0.002 * i for i in range(16)], True),   # all of it below 0.90
    ([0.95 + 0.002 * i for i in range(16)], False),  # all of it above
    ([0.86 + 0.006 * i for i in range(16)], None),   # median 0.905, interval 0.878-0.932: spans it
])
def test_a_step_target_is_met_or_missed_only_by_its_whole_interval(per_round, expected):
    value, interval, met = step_target(found(per_round), 0.90)
    assert met is expected
    assert interval[0] <= value <= interval[1]


def test_an_undecided_target_says_so_with_its_interval():
    row = {"to_peft": found([0.86 + 0.006 * i for i in range(16)])}
    (check,) = [c for c in check_targets({"peftkit-all-linear": row, "peft-all-linear": {}})
                if c["case"] == "peftkit-all-linear" and c["metric"] == "step" and c["reference"] != "floor"]
    verdict = target_verdict(check)
    assert verdict.startswith("**undecided**") and "95% interval 0.878-0.932" in verdict
    too_few = step_target(found([0.5, 0.5, 0.5]), 0.90)
    assert too_few[2] is None and too_few[1] is None
