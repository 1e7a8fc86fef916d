"""Decision rules of the probe claims on synthetic runs, and one tiny end-to-end run."""

import json
import math
import os
import sqlite3
from types import SimpleNamespace

import pytest

from normlab import cli
from normlab.claims import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    StudyContext,
    budget,
    get_claim,
)
from normlab.claims.gradient_stability import MAX_DECADES, abs_decades, probe_ratios
from normlab.claims.ics import NOISY_BN, condition_of
from normlab.store import RunRecord

DATA = SimpleNamespace(num_classes=10, source="synthetic")
SEEDS = 3


def context(seeds=SEEDS):
    return StudyContext("digits", DATA, "quick", seeds)


def make_records(claim_id, build, skip=None):
    """Return a RunRecord per config of the claim, with the fields of ``build``."""
    records = {}
    for config in get_claim(claim_id).configs(context()):
        if skip is not None and skip(config):
            continue
        fields = {"status": "finished", "final": {}, "history": []}
        fields.update(build(config))
        records[config.key()] = RunRecord(config.key(), config, steps=100, **fields)
    return records


# -- ics -------------------------------------------------------------------------------


def ics_records(accuracy, status=None, skip=None):
    """``accuracy[condition][seed]`` is the final val acc; ICS rows are fixed."""

    def build(config):
        condition = condition_of(config)
        l2 = {"none": 0.1, "batchnorm": 0.2, NOISY_BN: 0.4}[condition]
        history = [
            {"step": step, "epoch": 1, "ics_l2_layer2": l2, "ics_cos_layer2": 0.9,
             "ics_l2_layer3": l2, "ics_cos_layer3": math.nan}
            for step in (0, 10)
        ]
        fields = {"final": {"val_acc": accuracy[condition][config.seed]},
                  "history": history}
        if status is not None and status(config):
            fields["status"] = "diverged"
            fields["final"] = {"val_acc": math.nan}
        return fields

    return make_records("ics", build, skip)


def accuracies(bn, noisy, none=(0.9, 0.9, 0.9)):
    return {"batchnorm": dict(enumerate(bn)), NOISY_BN: dict(enumerate(noisy)),
            "none": dict(enumerate(none))}


def test_ics_supported_when_noisy_matches_bn():
    verdict = get_claim("ics").decide(
        context(), ics_records(accuracies([0.95, 0.96, 0.97], [0.95, 0.955, 0.97]))
    )
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.005 / 3)
    assert verdict.runs == 3 * SEEDS
    ics = verdict.details["ics"]
    assert ics["batchnorm"]["l2"] == pytest.approx(0.2)
    assert ics["none"]["cos"] == pytest.approx(0.9)
    assert "BatchNorm's ICS l2 is not lower" in verdict.summary


def test_ics_not_supported_when_noisy_is_worse():
    verdict = get_claim("ics").decide(
        context(), ics_records(accuracies([0.95, 0.96, 0.97], [0.85, 0.86, 0.88]))
    )
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(0.0967, abs=1e-3)


def test_ics_inconclusive_when_seeds_disagree():
    verdict = get_claim("ics").decide(
        context(), ics_records(accuracies([0.95, 0.95, 0.95], [0.95, 0.90, 0.97]))
    )
    assert verdict.verdict == INCONCLUSIVE
    low, high = verdict.interval
    assert low < 0.02 < high


def test_ics_diverged_noisy_run_counts_as_chance():
    records = ics_records(
        accuracies([0.95] * 3, [0.95] * 3),
        status=lambda c: condition_of(c) == NOISY_BN and c.seed == 0,
    )
    verdict = get_claim("ics").decide(context(), records)
    assert verdict.details["per_seed_gap"][0] == pytest.approx(0.85)
    assert verdict.verdict == INCONCLUSIVE


def test_ics_inconclusive_without_a_seed():
    records = ics_records(
        accuracies([0.95] * 3, [0.95] * 3),
        skip=lambda c: condition_of(c) == NOISY_BN and c.seed == 2,
    )
    verdict = get_claim("ics").decide(context(), records)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None


# -- smoothness ------------------------------------------------------------------------


def smoothness_records(beta, skip=None):
    """``beta[norm][seed]`` is the beta of every probe row of the run."""

    def build(config):
        value = beta[config.norm][config.seed]
        history = [
            {"step": step, "epoch": 1, "beta": value, "loss_variation": 0.1,
             "grad_pred": value / 10}
            for step in (0, 10, 20)
        ]
        return {"history": history}

    return make_records("smoothness", build, skip)


def test_smoothness_supported_when_bn_beta_is_lower():
    beta = {"batchnorm": [1.0, 1.1, 0.9], "none": [3.0, 3.3, 2.7]}
    records = smoothness_records(beta)
    verdict = get_claim("smoothness").decide(context(), records)
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(math.log10(3))
    ratios = verdict.details["log10_ratio_none_over_bn"]
    assert ratios["grad_pred"]["mean"] == pytest.approx(math.log10(3))
    assert ratios["loss_variation"]["mean"] == pytest.approx(0.0)


def test_smoothness_not_supported_when_beta_is_equal():
    beta = {"batchnorm": [2.0, 2.1, 1.9], "none": [2.0, 2.0, 2.0]}
    records = smoothness_records(beta)
    verdict = get_claim("smoothness").decide(context(), records)
    assert verdict.verdict == NOT_SUPPORTED


def test_smoothness_inconclusive_when_seeds_disagree():
    beta = {"batchnorm": [1.0, 1.0, 1.0], "none": [5.0, 1.0, 2.0]}
    records = smoothness_records(beta)
    verdict = get_claim("smoothness").decide(context(), records)
    assert verdict.verdict == INCONCLUSIVE


def test_smoothness_inconclusive_without_finite_beta():
    records = smoothness_records(
        {"batchnorm": [1.0, math.nan, 1.0], "none": [3.0, 3.0, 3.0]}
    )
    verdict = get_claim("smoothness").decide(context(), records)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None


# -- gradient-stability ----------------------------------------------------------------


def stability_records(ratio, skip=None):
    """``ratio(config)`` is the gradient ratio of every probe row of the run."""

    def build(config):
        value = ratio(config)
        history = [
            {"step": step, "epoch": 1, "grad_ratio": value, "grad_first": value,
             "grad_last": 1.0}
            for step in (0, 10, 20)
        ]
        return {"history": history}

    return make_records("gradient-stability", build, skip)


def test_stability_supported_when_bn_ratio_is_one():
    records = stability_records(
        lambda c: 1.0 if c.norm == "batchnorm" else 10.0 ** -(3 + 0.1 * c.seed)
    )
    verdict = get_claim("gradient-stability").decide(context(), records)
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(3.1)
    assert verdict.details["effect_by_activation"]["relu"]["mean"] == pytest.approx(3.1)


def test_stability_not_supported_when_ratios_match():
    records = stability_records(lambda c: 10.0 ** (-0.01 * c.seed))
    verdict = get_claim("gradient-stability").decide(context(), records)
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(0.0)


def test_stability_inconclusive_when_seeds_disagree():
    records = stability_records(
        lambda c: 1.0 if c.norm == "batchnorm" else [1e-3, 1.0, 10 ** -0.1][c.seed]
    )
    verdict = get_claim("gradient-stability").decide(context(), records)
    assert verdict.verdict == INCONCLUSIVE


def test_stability_inconclusive_without_deepest_run():
    records = stability_records(
        lambda c: 1.0,
        skip=lambda c: (
            len(c.hidden) == 16 and c.activation == "sigmoid" and c.seed == 1
        ),
    )
    verdict = get_claim("gradient-stability").decide(context(), records)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None


def test_stability_ratio_of_zero_or_infinity_is_capped():
    assert abs_decades(0.0) == MAX_DECADES
    assert abs_decades(math.inf) == MAX_DECADES
    assert abs_decades(1e-3) == pytest.approx(3.0)
    assert math.isnan(abs_decades(math.nan))
    # the store writes an infinite ratio as missing; the gradient norms rebuild it
    record = SimpleNamespace(history=[
        {"step": 0, "grad_ratio": math.nan, "grad_first": 2.0, "grad_last": 0.0},
        {"step": 10, "grad_ratio": 0.5, "grad_first": 1.0, "grad_last": 2.0},
        {"step": 12, "val_acc": 0.5},
    ])
    assert probe_ratios(record) == [(0, math.inf), (10, 0.5)]


# -- end to end ----------------------------------------------------------------------


def test_probe_claims_end_to_end(monkeypatch, tmp_path, capsys):
    tiny_budget = {"epochs": 2, "eval_every": 4}
    monkeypatch.setitem(budget.BUDGETS, ("digits", "quick"), tiny_budget)
    out = tmp_path / "out"
    argv = ["verify", "--claims", "ics,smoothness,gradient-stability", "--seeds", "2",
            "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    capsys.readouterr()

    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [v["claim"] for v in verdicts] == ["ics", "smoothness", "gradient-stability"]
    assert [v["runs"] for v in verdicts] == [3 * 2, 2 * 2, 2 * 2 * 3 * 2]
    for v in verdicts:
        assert v["verdict"] in (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)
        assert v["plots"], v["claim"]
        for plot in v["plots"]:
            assert (out / os.path.basename(plot)).stat().st_size > 10_000
    with sqlite3.connect(out / "normlab.db") as db:
        names = {name for (name,) in db.execute("SELECT DISTINCT name FROM metrics")}
        tasks = {task for (task,) in db.execute("SELECT DISTINCT task FROM runs")}
    assert tasks == {"classify-probed"}
    for name in ("ics_l2_layer2", "ics_cos_layer3", "beta", "loss_variation",
                 "grad_pred", "grad_ratio", "val_acc"):
        assert name in names, name
