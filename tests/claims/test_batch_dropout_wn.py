"""The batch-size, dropout and weightnorm-generalization claims.

Each decision test builds one RunRecord per config of the claim's grid, with final
metrics chosen so that the verdict is known in advance. The variance-shift measurement
runs on real models, and the end-to-end tests train the claims through the CLI on
shrunken budgets.
"""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from normlab import cli
from normlab.claims import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    StudyContext,
    budget,
    get_claim,
)
from normlab.claims.batch_size import reference_batch, run_settings
from normlab.claims.dropout import (
    VarianceShiftConfig,
    measure_variance_shift,
    train_with_variance_shift,
)
from normlab.data import load_classification
from normlab.models import MLP
from normlab.nn import BatchNorm1d
from normlab.store import RunRecord
from normlab.train import loop
from normlab.train.config import TrainConfig, config_from_dict

DATA = SimpleNamespace(num_classes=10, source="synthetic", train=range(1077))
CLAIM_IDS = ["batch-size", "dropout", "weightnorm-generalization"]


def context(seeds=3, scale="quick"):
    return StudyContext("digits", DATA, scale, seeds)


def synthetic_records(claim_id, ctx, final_of, diverged=lambda config: False):
    """Return one record per config of the claim, with ``final_of(config)`` as final."""
    records = {}
    for config in get_claim(claim_id).configs(ctx):
        status = "diverged" if diverged(config) else "finished"
        final = final_of(config) if status == "finished" else {"val_acc": math.nan}
        history = [
            {"step": step, "epoch": 1, "train_loss": 1.0, "val_loss": 1.0,
             "val_acc": final.get("val_acc", 0.0) * step / 40}
            for step in range(4, 44, 4)
        ] if status == "finished" else []
        step_loss = []
        if status == "finished":
            step_loss = [2.0 - step / 40 for step in range(40)]
        records[config.key()] = RunRecord(
            config.key(), config, status, steps=40, final=final, history=history,
            step_loss=step_loss,
        )
    return records


def noise(seed, values=(0.0, 0.004, -0.004)):
    return values[seed % len(values)]


# batch-size


def batch_final(accs):
    """Return final metrics with val acc ``accs[norm][batch size]`` plus seed noise."""

    def final_of(config):
        return {"val_acc": accs[config.norm][config.batch_size] + noise(config.seed)}

    return final_of


FLAT_BATCH = {2: 0.95, 8: 0.95, 32: 0.95, 128: 0.95}
BN_PEAKED = {2: 0.70, 8: 0.93, 32: 0.96, 128: 0.95}


def test_batch_size_grid_scales_lr_and_evaluation():
    ctx = context()
    configs = get_claim("batch-size").configs(ctx)
    assert len(configs) == 3 * 4 * 3
    assert {c.norm for c in configs} == {"batchnorm", "groupnorm", "layernorm"}
    assert {c.batch_size for c in configs} == {2, 8, 32, 128}
    assert {c.epochs for c in configs} == {4}
    for config in configs:
        assert config.lr == pytest.approx(0.1 * config.batch_size / 64)
    # the quick budget evaluates every 2 steps of 64 samples: every 128 samples
    assert run_settings(ctx, 2)["eval_every"] == 64
    assert run_settings(ctx, 128)["eval_every"] == 1
    assert run_settings(context(scale="full"), 2)["epochs"] == 40


def test_batch_size_reference_is_largest_in_range():
    assert reference_batch("quick") == 32
    assert reference_batch("full") == 64


def test_batch_size_supported_when_bn_collapses():
    ctx = context()
    accs = {"batchnorm": BN_PEAKED, "groupnorm": FLAT_BATCH, "layernorm": FLAT_BATCH}
    verdict = get_claim("batch-size").decide(
        ctx, synthetic_records("batch-size", ctx, batch_final(accs))
    )
    assert verdict.verdict == SUPPORTED
    # BN drops 0.96 - 0.70, GN 0.95 - 0.95
    assert verdict.effect == pytest.approx(0.26)
    assert verdict.details["bn_best_batch_size"]["0"] == [32]
    assert verdict.details["bn_best_in_16_64_in_most_seeds"] is True
    assert "in 3 of 3 seeds" in verdict.summary
    assert "part holds" in verdict.summary


def test_batch_size_not_supported_when_flat():
    ctx = context()
    accs = dict.fromkeys(["batchnorm", "groupnorm", "layernorm"], FLAT_BATCH)
    verdict = get_claim("batch-size").decide(
        ctx, synthetic_records("batch-size", ctx, batch_final(accs))
    )
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(0.0)
    # every batch size ties, so 32 counts as a best one
    assert verdict.details["bn_best_in_16_64"] == {"0": True, "1": True, "2": True}


def test_batch_size_best_range_fails_for_large_batch():
    ctx = context()
    bn = {2: 0.70, 8: 0.90, 32: 0.93, 128: 0.97}
    accs = {"batchnorm": bn, "groupnorm": FLAT_BATCH, "layernorm": FLAT_BATCH}
    verdict = get_claim("batch-size").decide(
        ctx, synthetic_records("batch-size", ctx, batch_final(accs))
    )
    assert verdict.verdict == SUPPORTED
    assert verdict.details["bn_best_batch_size"]["1"] == [128]
    assert verdict.details["bn_best_in_16_64_in_most_seeds"] is False
    assert "part does not hold" in verdict.summary


def test_batch_size_inconclusive_for_noisy_drops():
    ctx = context()
    drops = {0: 0.10, 1: -0.08, 2: 0.01}

    def final_of(config):
        acc = 0.95
        if config.norm == "batchnorm" and config.batch_size == 2:
            acc -= drops[config.seed]
        return {"val_acc": acc}

    verdict = get_claim("batch-size").decide(
        ctx, synthetic_records("batch-size", ctx, final_of)
    )
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect == pytest.approx(0.01)


def test_batch_size_counts_divergence_as_chance():
    ctx = context()
    accs = dict.fromkeys(["batchnorm", "groupnorm", "layernorm"], FLAT_BATCH)
    records = synthetic_records(
        "batch-size", ctx, batch_final(accs),
        diverged=lambda c: c.norm == "batchnorm" and c.batch_size == 2,
    )
    verdict = get_claim("batch-size").decide(ctx, records)
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.95 - 0.1)
    assert "BatchNorm at 2" in verdict.summary


def test_batch_size_inconclusive_without_small_batch():
    ctx = context()
    accs = dict.fromkeys(["batchnorm", "groupnorm", "layernorm"], FLAT_BATCH)
    records = synthetic_records("batch-size", ctx, batch_final(accs))
    without_two = {k: r for k, r in records.items() if r.config.batch_size != 2}
    verdict = get_claim("batch-size").decide(ctx, without_two)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None


# dropout


def dropout_final(accs, shift=2.0):
    """Return final metrics with val acc ``accs[(position, rate)]`` and fixed shifts.

    No dropout has val acc ``accs[None]``.
    """

    def final_of(config):
        key = None if config.dropout == 0 else (config.dropout_position, config.dropout)
        before = config.dropout_position == "before" and config.dropout > 0
        return {
            "val_acc": accs[key] + noise(config.seed),
            "var_shift_bn1": shift if before else 1.0,
            "var_shift_bn2": shift if config.dropout > 0 else 1.0,
            "running_shift_bn1": 1.0,
            "running_shift_bn2": 1.0,
        }

    return final_of


def dropout_accs(before_half, after_half=0.95):
    return {
        None: 0.96,
        ("before", 0.1): 0.95,
        ("after", 0.1): 0.95,
        ("before", 0.5): before_half,
        ("after", 0.5): after_half,
    }


def test_dropout_grid_measures_every_condition():
    configs = get_claim("dropout").configs(context())
    assert len(configs) == 5 * 3
    assert all(isinstance(c, VarianceShiftConfig) for c in configs)
    assert {(c.dropout_position, c.dropout) for c in configs} == {
        ("after", 0.0), ("before", 0.1), ("before", 0.5), ("after", 0.1),
        ("after", 0.5),
    }
    assert {c.norm for c in configs} == {"batchnorm"}


def test_variance_shift_config_round_trip():
    config = VarianceShiftConfig(dropout=0.5, dropout_position="before")
    plain = TrainConfig(dropout=0.5, dropout_position="before")
    assert config.key() != plain.key()
    assert config_from_dict(config.task, config.to_dict()) == config
    with pytest.raises(ValueError, match="variance_passes"):
        VarianceShiftConfig(variance_passes=0)


def test_dropout_supported_when_before_hurts():
    ctx = context()
    records = synthetic_records("dropout", ctx, dropout_final(dropout_accs(0.85)))
    verdict = get_claim("dropout").decide(ctx, records)
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.10)
    shifts = verdict.details["variance_shift"]
    assert shifts["before, rate 0.5"] == {"bn1": pytest.approx(2.0),
                                          "bn2": pytest.approx(2.0)}
    assert shifts["after, rate 0.5"]["bn1"] == pytest.approx(1.0)
    assert shifts["no dropout"]["bn2"] == pytest.approx(1.0)
    assert "before, rate 0.5 2.000 and 2.000" in verdict.summary


def test_dropout_not_supported_for_equal_accuracy():
    ctx = context()
    records = synthetic_records("dropout", ctx, dropout_final(dropout_accs(0.95)))
    verdict = get_claim("dropout").decide(ctx, records)
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(0.0)


def test_dropout_inconclusive_for_noisy_effect():
    ctx = context()
    base = dropout_final(dropout_accs(0.95))
    shifts = {0: 0.06, 1: -0.04, 2: 0.01}

    def final_of(config):
        final = base(config)
        if config.dropout_position == "before" and config.dropout == 0.5:
            final["val_acc"] -= shifts[config.seed]
        return final

    verdict = get_claim("dropout").decide(
        ctx, synthetic_records("dropout", ctx, final_of)
    )
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect == pytest.approx(0.01)


def test_dropout_inconclusive_without_decision_rate():
    ctx = context()
    records = synthetic_records("dropout", ctx, dropout_final(dropout_accs(0.85)))
    without_after = {
        k: r for k, r in records.items()
        if not (r.config.dropout_position == "after" and r.config.dropout == 0.5)
    }
    verdict = get_claim("dropout").decide(ctx, without_after)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None


def test_dropout_counts_divergence_as_chance():
    ctx = context()
    records = synthetic_records(
        "dropout", ctx, dropout_final(dropout_accs(0.95)),
        diverged=lambda c: c.dropout_position == "before" and c.dropout == 0.5,
    )
    verdict = get_claim("dropout").decide(ctx, records)
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.95 - 0.1)
    assert verdict.details["variance_shift"]["before, rate 0.5"]["bn1"] is None
    assert "Diverged runs (before, rate 0.5)" in verdict.summary


# variance-shift measurement


def test_variance_shift_matches_inverted_dropout_formula():
    # Dropout keeps a unit h with probability 1 - p and scales it by 1 / (1 - p), so its
    # variance becomes E[h^2] / (1 - p) - E[h]^2: (1 + 1) / 0.5 - 1 = 3 for h ~ N(1, 1).
    torch.manual_seed(0)
    x = torch.randn(20000, 8) + 1.0
    model = nn.Sequential(nn.Dropout(0.5), BatchNorm1d(8))
    shifts = measure_variance_shift(model, x, passes=2, seed=0)
    assert shifts["var_shift_bn1"] == pytest.approx(3.0, rel=0.03)
    # a fresh layer has running_var 1, the eval-mode variance of x
    assert shifts["running_shift_bn1"] == pytest.approx(1.0, rel=0.03)


def test_variance_shift_is_one_without_dropout():
    torch.manual_seed(0)
    model = MLP(16, (12, 12), 3, norm="batchnorm")
    shifts = measure_variance_shift(model, torch.randn(200, 16))
    assert set(shifts) == {"var_shift_bn1", "var_shift_bn2", "running_shift_bn1",
                           "running_shift_bn2"}
    assert shifts["var_shift_bn1"] == pytest.approx(1.0)
    assert shifts["var_shift_bn2"] == pytest.approx(1.0)


def test_variance_shift_follows_dropout_position():
    torch.manual_seed(0)
    x = torch.randn(500, 16)
    before = MLP(16, (12, 12), 3, dropout=0.5, dropout_position="before")
    after = MLP(16, (12, 12), 3, dropout=0.5, dropout_position="after")
    shifts_before = measure_variance_shift(before, x)
    shifts_after = measure_variance_shift(after, x)
    assert shifts_before["var_shift_bn1"] > 1.5
    assert shifts_before["var_shift_bn2"] > 1.5
    # the first BN of the "after" layout has no dropout upstream
    assert shifts_after["var_shift_bn1"] == pytest.approx(1.0)
    assert shifts_after["var_shift_bn2"] > 1.05


def test_variance_shift_restores_modes_and_random_state():
    model = MLP(16, (12, 12), 3, dropout=0.5, dropout_position="before")
    x = torch.randn(10, 16)
    model.train()
    state = torch.random.get_rng_state()
    measure_variance_shift(model, x, seed=3)
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.random.get_rng_state(), state)
    model.eval()
    measure_variance_shift(model, x)
    assert not any(m.training for m in model.modules())


def test_variance_shift_is_nan_for_constant_input():
    model = nn.Sequential(nn.Dropout(0.5), BatchNorm1d(4))
    shifts = measure_variance_shift(model, torch.ones(10, 4))
    assert math.isnan(shifts["var_shift_bn1"])
    assert math.isnan(shifts["running_shift_bn1"])


def test_variance_shift_run_trains_like_plain_run():
    data = load_classification("digits", None, download=False)
    settings = dict(dropout=0.5, dropout_position="before", epochs=1, eval_every=8)
    build_model = loop.build_model
    measured = train_with_variance_shift(VarianceShiftConfig(**settings), data)
    plain = loop.train_classifier(TrainConfig(**settings), data)
    assert loop.build_model is build_model
    assert measured.step_loss == plain.step_loss
    assert measured.final["val_acc"] == plain.final["val_acc"]
    assert measured.final["var_shift_bn1"] > 1.0
    assert "var_shift_bn1" not in plain.final


# weightnorm-generalization


def wn_final(test_acc, val_acc=None):
    """Return finals with ``test_acc[(norm, lr)]`` and val acc ``val_acc`` or the test.

    Every run fits its training samples (training accuracy 1.0).
    """

    def final_of(config):
        key = (config.norm, config.lr)
        test = test_acc.get(key, 0.5) + noise(config.seed)
        val = (val_acc or test_acc).get(key, 0.5) + noise(config.seed)
        return {"train_acc": 1.0, "test_acc": test, "val_acc": val,
                "train_loss": 0.01, "test_loss": 0.3}

    return final_of


def test_weightnorm_grid_shares_bn_runs():
    ctx = context()
    configs = get_claim("weightnorm-generalization").configs(ctx)
    assert len(configs) == 2 * 5 * 3
    assert {c.norm for c in configs} == {"batchnorm", "weightnorm"}
    bn = {c.key() for c in configs if c.norm == "batchnorm"}
    faster = {c.key() for c in get_claim("faster-convergence").configs(ctx)}
    assert bn <= faster


def test_weightnorm_supported_at_selected_lrs():
    ctx = context()
    # BN is best at lr 0.1 and WN at 0.316228 on validation; test follows validation
    accs = {("batchnorm", 0.1): 0.97, ("batchnorm", 1.0): 0.90,
            ("weightnorm", 0.316228): 0.94, ("weightnorm", 0.1): 0.92}
    verdict = get_claim("weightnorm-generalization").decide(
        ctx, synthetic_records("weightnorm-generalization", ctx, wn_final(accs))
    )
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.03)
    assert verdict.details["best_lr"] == {"batchnorm": 0.1, "weightnorm": 0.316228}
    selected = verdict.details["at_best_lr"]["weightnorm"]
    assert selected["mean_gap"] == pytest.approx(0.06)
    assert selected["mean_train_acc"] == pytest.approx(1.0)
    # the synthetic step losses fall linearly from 2.0, and the first 10 of 40
    # average 1.8875
    assert selected["mean_early_train_loss"] == pytest.approx(1.8875)


def test_weightnorm_selects_on_validation_not_test():
    ctx = context()
    test = {("batchnorm", 0.1): 0.95, ("batchnorm", 1.0): 0.99,
            ("weightnorm", 0.1): 0.95}
    val = {("batchnorm", 0.1): 0.96, ("batchnorm", 1.0): 0.90,
           ("weightnorm", 0.1): 0.96}
    verdict = get_claim("weightnorm-generalization").decide(
        ctx, synthetic_records("weightnorm-generalization", ctx, wn_final(test, val))
    )
    assert verdict.details["best_lr"]["batchnorm"] == 0.1
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(0.0)


def test_weightnorm_inconclusive_for_noisy_effect():
    ctx = context()
    accs = {("batchnorm", 0.1): 0.95, ("weightnorm", 0.1): 0.95}
    base = wn_final(accs)
    shifts = {0: 0.06, 1: -0.04, 2: 0.01}

    def final_of(config):
        final = base(config)
        if config.norm == "weightnorm":
            final["test_acc"] -= shifts[config.seed]
        return final

    verdict = get_claim("weightnorm-generalization").decide(
        ctx, synthetic_records("weightnorm-generalization", ctx, final_of)
    )
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect == pytest.approx(0.01)


def test_weightnorm_skips_lr_where_runs_diverge():
    ctx = context()
    accs = {("batchnorm", 0.1): 0.95, ("weightnorm", 1.0): 0.99,
            ("weightnorm", 0.1): 0.95}
    records = synthetic_records(
        "weightnorm-generalization", ctx, wn_final(accs),
        diverged=lambda c: c.norm == "weightnorm" and c.lr == 1.0 and c.seed > 0,
    )
    verdict = get_claim("weightnorm-generalization").decide(ctx, records)
    # two of three seeds at lr 1 count as chance, so their mean is 0.397
    assert verdict.details["best_lr"]["weightnorm"] == 0.1
    assert verdict.verdict == NOT_SUPPORTED


# plots and the CLI


def plot_records(claim_id, ctx):
    finals = {
        "batch-size": batch_final(
            {"batchnorm": BN_PEAKED, "groupnorm": FLAT_BATCH, "layernorm": FLAT_BATCH}
        ),
        "dropout": dropout_final(dropout_accs(0.9)),
        "weightnorm-generalization": wn_final(
            {("batchnorm", 0.1): 0.97, ("weightnorm", 0.316228): 0.94}
        ),
    }
    return synthetic_records(claim_id, ctx, finals[claim_id])


@pytest.mark.parametrize("claim_id", CLAIM_IDS)
def test_plots_are_written_with_claim_prefix(claim_id, tmp_path):
    ctx = context()
    paths = get_claim(claim_id).plot(ctx, plot_records(claim_id, ctx), tmp_path)
    assert paths
    for path in paths:
        assert path.name.startswith(f"{claim_id}_")
        assert path.suffix == ".png"
        assert path.stat().st_size > 10_000


@pytest.mark.parametrize("claim_id", CLAIM_IDS)
def test_claim_end_to_end_on_tiny_budget(claim_id, tmp_path, monkeypatch):
    tiny = {"epochs": 1, "eval_every": 4}
    monkeypatch.setitem(budget.BUDGETS, ("digits", "quick"), tiny)
    argv = ["verify", "--claims", claim_id, "--seeds", "2", "--out", str(tmp_path),
            "--no-progress"]
    assert cli.main(argv) == 0
    verdicts = json.loads((tmp_path / "verdicts.json").read_text())
    assert [v["claim"] for v in verdicts] == [claim_id]
    verdict = verdicts[0]
    assert verdict["verdict"] in (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)
    assert verdict["runs"] == len(get_claim(claim_id).configs(context(seeds=2)))
    assert verdict["plots"]
    for plot in verdict["plots"]:
        assert (tmp_path / os.path.basename(plot)).stat().st_size > 10_000


def test_batch_size_quick_mnist_uses_a_subset():
    from types import SimpleNamespace

    from normlab.claims import StudyContext, get_claim

    data = SimpleNamespace(num_classes=10, source="synthetic")
    configs = get_claim("batch-size").configs(StudyContext("mnist", data, "quick", 2))
    assert {c.train_size for c in configs} == {6000}
    full = get_claim("batch-size").configs(StudyContext("mnist", data, "full", 2))
    assert {c.train_size for c in full} == {None}
