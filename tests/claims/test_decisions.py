"""Decision rules applied to synthetic runs whose verdict is known in advance."""

import math
from types import SimpleNamespace

import pytest

from normlab.claims import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, StudyContext, get_claim
from normlab.claims.faster_convergence import LRS, steps_to_target
from normlab.claims.higher_lr import lr_grid
from normlab.claims.stats import accuracy_table, decide, decide_effects, t_interval
from normlab.claims.budget import base_config
from normlab.store import RunRecord

DATA = SimpleNamespace(num_classes=10, source="synthetic")


def context(seeds=3):
    return StudyContext("digits", DATA, "quick", seeds)


def record(norm, lr, seed, acc, status="finished", history=None):
    config = base_config("digits", "quick", norm=norm, lr=lr, seed=seed)
    final = {"val_acc": acc if status == "finished" else math.nan}
    return RunRecord(config.key(), config, status, steps=100, final=final,
                     history=history or [])


def test_t_interval_matches_student_t():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    # t(0.975, 2) = 4.3027, sd = 1, so the half width is 4.3027 / sqrt(3)
    assert high - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert mean - low == pytest.approx(high - mean)


def test_t_interval_of_equal_values_has_zero_width():
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "low, high, effect, expected",
    [
        (0.2, 1.0, 0.6, SUPPORTED),
        (0.2, 1.0, 0.4, INCONCLUSIVE),
        (-0.3, 0.4, 0.05, NOT_SUPPORTED),
        (-0.5, 1.5, 0.5, INCONCLUSIVE),
    ],
)
def test_decide_rule(low, high, effect, expected):
    assert decide(low, high, effect, margin=0.5) == expected


def higher_lr_records(bn_max, none_max, seeds=3):
    """BN trains (acc 0.95) up to bn_max[seed]; no-norm up to none_max[seed]."""
    records = {}
    for norm, limits in (("batchnorm", bn_max), ("none", none_max)):
        for lr in lr_grid("quick"):
            for seed in range(seeds):
                ok = lr <= limits[seed] + 1e-9
                r = record(norm, lr, seed, 0.95 if ok else math.nan,
                           "finished" if ok else "diverged")
                records[r.key] = r
    return records


def test_higher_lr_supported_decade_higher():
    claim = get_claim("higher-lr")
    verdict = claim.decide(context(), higher_lr_records([1.0] * 3, [0.1] * 3))
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(1.0)
    assert verdict.interval == pytest.approx((1.0, 1.0))
    assert verdict.runs == 2 * len(lr_grid("quick")) * 3


def test_higher_lr_not_supported_when_limits_are_equal():
    verdict = get_claim("higher-lr").decide(
        context(), higher_lr_records([0.316228] * 3, [0.316228] * 3)
    )
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == 0.0


def test_higher_lr_both_at_grid_top():
    top = lr_grid("quick")[-1]
    verdict = get_claim("higher-lr").decide(context(), higher_lr_records([top] * 3, [top] * 3))
    assert verdict.verdict == INCONCLUSIVE


def test_higher_lr_chance_accuracy_not_trained():
    records = higher_lr_records([1.0] * 3, [1.0] * 3)
    # no-norm runs at lr 1 finish but stay at chance: they did not train
    for r in records.values():
        if r.config.norm == "none" and r.config.lr == 1.0:
            r.final["val_acc"] = 0.1
    verdict = get_claim("higher-lr").decide(context(), records)
    assert verdict.details["max_trainable_lr"]["none"] == {"0": 0.316228, "1": 0.316228,
                                                          "2": 0.316228}
    assert verdict.effect == pytest.approx(0.5)


def curve(steps_to_reach, target=0.9, last=200, every=10):
    return [
        {"step": s, "epoch": 1, "train_loss": 1.0, "val_loss": 1.0,
         "val_acc": target + 0.01 if steps_to_reach is not None and s >= steps_to_reach
         else target - 0.2}
        for s in range(every, last + 1, every)
    ]


def convergence_records(bn_steps, none_steps, seeds=3):
    """At lr 0.1 each condition reaches the target at the given step; elsewhere never."""
    records = {}
    for norm, reach in (("batchnorm", bn_steps), ("none", none_steps)):
        for lr in LRS:
            for seed in range(seeds):
                hit = reach[seed] if lr == 0.1 else None
                r = record(norm, lr, seed, 0.95, history=curve(hit))
                r.steps = 200
                records[r.key] = r
    return records


def test_steps_to_target_finds_first_crossing():
    r = record("batchnorm", 0.1, 0, 0.95, history=curve(50))
    assert steps_to_target(r, 0.9) == 50
    assert steps_to_target(record("none", 0.1, 0, 0.5, history=curve(None)), 0.9) is None


def test_faster_convergence_supported_for_a_threefold_speedup():
    verdict = get_claim("faster-convergence").decide(
        context(), convergence_records([20, 20, 30], [60, 70, 90])
    )
    assert verdict.verdict == SUPPORTED
    assert verdict.details["best_lr"] == {"batchnorm": 0.1, "none": 0.1}
    assert verdict.effect == pytest.approx((3.0 * 3.5 * 3.0) ** (1 / 3))


def test_faster_convergence_not_supported_for_equal_speed():
    verdict = get_claim("faster-convergence").decide(
        context(), convergence_records([50, 60, 70], [50, 60, 70])
    )
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(1.0)


def test_faster_convergence_counts_never_as_the_budget():
    verdict = get_claim("faster-convergence").decide(
        context(), convergence_records([50, 50, 50], [None, None, None])
    )
    assert verdict.effect == pytest.approx(4.0)  # 200 budget steps / 50
    assert "count as 200 steps" in verdict.summary


def test_faster_convergence_inconclusive_when_nothing_reaches_target():
    verdict = get_claim("faster-convergence").decide(
        context(), convergence_records([None] * 3, [None] * 3)
    )
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None


def test_unknown_claim_lists_ids():
    with pytest.raises(ValueError, match="unknown claim 'bn-is-magic'.*higher-lr"):
        get_claim("bn-is-magic")


def test_claims_share_runs():
    ctx = context()
    higher = {c.key() for c in get_claim("higher-lr").configs(ctx)}
    faster = {c.key() for c in get_claim("faster-convergence").configs(ctx)}
    assert faster <= higher


def test_t_interval_of_one_value_is_unbounded():
    assert t_interval([0.7]) == (0.7, -math.inf, math.inf)


def test_higher_lr_one_seed_is_inconclusive():
    verdict = get_claim("higher-lr").decide(
        context(seeds=1), higher_lr_records([1.0], [0.1], seeds=1)
    )
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect == pytest.approx(1.0)


def test_faster_convergence_ignores_runs_that_diverged():
    records = convergence_records([50, 50, 50], [60, 60, 60])
    # at lr 1 BatchNorm reaches the target at step 10, then diverges
    for r in records.values():
        if r.config.norm == "batchnorm" and r.config.lr == 1.0:
            r.history = curve(10)
            r.status = "diverged"
    verdict = get_claim("faster-convergence").decide(context(), records)
    assert verdict.details["best_lr"]["batchnorm"] == 0.1
    assert verdict.effect == pytest.approx(1.2)


def test_faster_convergence_unresolved_at_first_evaluation():
    verdict = get_claim("faster-convergence").decide(
        context(), convergence_records([10, 10, 10], [60, 70, 90])
    )
    assert verdict.verdict == INCONCLUSIVE
    assert "first evaluation (step 10)" in verdict.summary


def test_accuracy_table_failed_runs_at_chance():
    runs = [record("batchnorm", 0.1, 0, 0.9), record("none", 0.1, 0, 0.5, "diverged"),
            record("none", 1.0, 1, math.nan)]
    table = accuracy_table(runs, chance=0.1, fields=("norm", "lr"))
    assert table == {("batchnorm", 0.1, 0): 0.9, ("none", 0.1, 0): 0.1, ("none", 1.0, 1): 0.1}


def test_decide_effects_returns_the_verdict_of_its_interval():
    verdict, mean, low, high = decide_effects([0.2, 0.3, 0.25], margin=0.1)
    assert (mean, low, high) == pytest.approx(t_interval([0.2, 0.3, 0.25]))
    assert verdict == SUPPORTED == decide(low, high, mean, 0.1)
    assert decide_effects([0.01, 0.02, 0.015], margin=0.1)[0] == NOT_SUPPORTED
