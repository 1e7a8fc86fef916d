"""The init, regularization, layer-order and momentum-eps claims on synthetic runs.

Each decision test builds one RunRecord per config of the claim's grid, with final
metrics chosen so that the verdict is known in advance. The end-to-end tests train the
claims through the CLI on shrunken budgets.
"""

import json
import math
import os
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
from normlab.claims.momentum_eps import setting_grid
from normlab.claims.regularization import small_data_budget
from normlab.store import RunRecord

DATA = SimpleNamespace(num_classes=10, source="synthetic", train=range(1077))
NEW_CLAIMS = ["init-insensitivity", "regularization", "layer-order", "momentum-eps"]


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
        records[config.key()] = RunRecord(
            config.key(), config, status, steps=40, final=final, history=history
        )
    return records


def noise(seed, values=(0.0, 0.004, -0.004)):
    return values[seed % len(values)]


# init-insensitivity


def init_final(bn_accs, none_accs):
    def final_of(config):
        accs = bn_accs if config.norm == "batchnorm" else none_accs
        return {"val_acc": accs[config.init_scale] + noise(config.seed)}

    return final_of


FLAT = {0.01: 0.95, 0.1: 0.95, 1.0: 0.95, 10.0: 0.95}


def test_init_grid_covers_scales_norms_and_seeds():
    configs = get_claim("init-insensitivity").configs(context())
    assert len(configs) == 4 * 2 * 3
    assert {c.init_scale for c in configs} == {0.01, 0.1, 1.0, 10.0}
    assert {c.lr for c in configs} == {0.1}


def test_init_supported_when_none_collapses_at_extremes():
    ctx = context()
    none_accs = {0.01: 0.2, 0.1: 0.9, 1.0: 0.95, 10.0: 0.95}
    records = synthetic_records(
        "init-insensitivity", ctx, init_final(FLAT, none_accs),
        diverged=lambda c: c.norm == "none" and c.init_scale == 10.0,
    )
    verdict = get_claim("init-insensitivity").decide(ctx, records)
    assert verdict.verdict == SUPPORTED
    # none: max 0.95 at scale 1, min 0.1 (diverged counts as chance); BN: flat
    assert verdict.effect == pytest.approx(0.85)
    assert verdict.details["spread"]["batchnorm"]["0"] == pytest.approx(0.0)
    assert "none at 10" in verdict.summary


def test_init_not_supported_when_both_are_flat():
    ctx = context()
    records = synthetic_records("init-insensitivity", ctx, init_final(FLAT, FLAT))
    verdict = get_claim("init-insensitivity").decide(ctx, records)
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(0.0)


def test_init_inconclusive_when_seeds_disagree():
    ctx = context()
    spreads = {0: 0.3, 1: -0.2, 2: 0.1}

    def final_of(config):
        low = 0.95 - max(spreads[config.seed], 0.0)
        if config.norm == "batchnorm":
            low = 0.95 - max(-spreads[config.seed], 0.0)
        return {"val_acc": low if config.init_scale == 0.01 else 0.95}

    verdict = get_claim("init-insensitivity").decide(
        ctx, synthetic_records("init-insensitivity", ctx, final_of)
    )
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect == pytest.approx(0.2 / 3)


def test_init_inconclusive_without_complete_seeds():
    ctx = context()
    records = synthetic_records("init-insensitivity", ctx, init_final(FLAT, FLAT))
    without_top_scale = {
        k: r for k, r in records.items() if r.config.init_scale != 10.0
    }
    verdict = get_claim("init-insensitivity").decide(ctx, without_top_scale)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None


# regularization


def regularization_final(test_acc):
    """Return final metrics with test accuracy ``test_acc[(norm, dropout)]``.

    Every run fits its training samples (training accuracy 1.0).
    """

    def final_of(config):
        test = test_acc[(config.norm, config.dropout)] + noise(config.seed)
        return {"train_acc": 1.0, "test_acc": test, "val_acc": test,
                "train_loss": 0.01, "test_loss": 0.3}

    return final_of


def test_regularization_grid_uses_small_data_and_scaled_epochs():
    ctx = context()
    configs = get_claim("regularization").configs(ctx)
    assert len(configs) == 4 * 3
    assert {c.train_size for c in configs} == {300}
    # 15 budget epochs over 1077 samples take as many steps as 54 epochs over 300
    assert small_data_budget(ctx) == (300, 54)
    assert {c.epochs for c in configs} == {54}
    assert {(c.norm, c.dropout) for c in configs} == {
        ("batchnorm", 0.0), ("none", 0.0), ("batchnorm", 0.5), ("none", 0.5)
    }


def test_regularization_supported_for_smaller_bn_gap():
    ctx = context()
    accs = {("batchnorm", 0.0): 0.95, ("none", 0.0): 0.90,
            ("batchnorm", 0.5): 0.95, ("none", 0.5): 0.94}
    verdict = get_claim("regularization").decide(
        ctx, synthetic_records("regularization", ctx, regularization_final(accs))
    )
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.05)
    cells = verdict.details["cells"]
    assert cells["none, dropout 0.5"]["mean_gap"] == pytest.approx(0.06)
    assert cells["batchnorm, dropout 0"]["mean_loss_gap"] == pytest.approx(0.29)
    assert "With dropout 0.5" in verdict.summary


def test_regularization_not_supported_for_equal_gaps():
    ctx = context()
    accs = dict.fromkeys(
        [("batchnorm", 0.0), ("none", 0.0), ("batchnorm", 0.5), ("none", 0.5)], 0.92
    )
    verdict = get_claim("regularization").decide(
        ctx, synthetic_records("regularization", ctx, regularization_final(accs))
    )
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(0.0)


def test_regularization_inconclusive_for_noisy_gaps():
    ctx = context()
    accs = dict.fromkeys(
        [("batchnorm", 0.0), ("none", 0.0), ("batchnorm", 0.5), ("none", 0.5)], 0.92
    )
    base = regularization_final(accs)
    shifts = {0: 0.06, 1: -0.04, 2: 0.02}

    def final_of(config):
        final = base(config)
        if config.norm == "none" and config.dropout == 0.0:
            final["test_acc"] -= shifts[config.seed]
        return final

    verdict = get_claim("regularization").decide(
        ctx, synthetic_records("regularization", ctx, final_of)
    )
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect == pytest.approx(0.04 / 3)


def test_regularization_inconclusive_when_bn_diverged():
    ctx = context()
    accs = dict.fromkeys(
        [("batchnorm", 0.0), ("none", 0.0), ("batchnorm", 0.5), ("none", 0.5)], 0.92
    )
    records = synthetic_records(
        "regularization", ctx, regularization_final(accs),
        diverged=lambda c: c.norm == "batchnorm" and c.dropout == 0.0,
    )
    verdict = get_claim("regularization").decide(ctx, records)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None


# layer-order


def order_final(norm_act, act_norm):
    def final_of(config):
        acc = norm_act if config.order == "norm-act" else act_norm
        return {"val_acc": acc[config.seed]}

    return final_of


@pytest.mark.parametrize(
    "norm_act, act_norm, expected, effect, phrase",
    [
        ([0.97, 0.96, 0.97], [0.93, 0.93, 0.92], SUPPORTED, 0.04, "difference +0.040"),
        ([0.95, 0.96, 0.95], [0.95, 0.958, 0.952], NOT_SUPPORTED, 0.0, "equal within"),
        (
            [0.90, 0.91, 0.90], [0.95, 0.95, 0.96], NOT_SUPPORTED, -0.05,
            "ReLU -> BN is better",
        ),
        ([0.97, 0.90, 0.96], [0.93, 0.95, 0.92], INCONCLUSIVE, 0.01, "95% CI"),
    ],
)
def test_layer_order_verdicts(norm_act, act_norm, expected, effect, phrase):
    ctx = context()
    records = synthetic_records("layer-order", ctx, order_final(norm_act, act_norm))
    verdict = get_claim("layer-order").decide(ctx, records)
    assert verdict.verdict == expected
    assert verdict.effect == pytest.approx(effect)
    assert phrase in verdict.summary


def test_layer_order_reports_steps_to_target():
    ctx = context()
    records = synthetic_records(
        "layer-order", ctx, order_final([0.97] * 3, [0.5] * 3),
    )
    verdict = get_claim("layer-order").decide(ctx, records)
    steps = verdict.details["steps_to_target"]
    # history accuracy rises linearly to the final one at step 40
    assert steps["norm-act"]["0"] == 40
    assert steps["act-norm"]["0"] is None


def test_layer_order_shares_runs_with_higher_lr():
    ctx = context()
    norm_act = {c.key() for c in get_claim("layer-order").configs(ctx)
                if c.order == "norm-act"}
    higher = {c.key() for c in get_claim("higher-lr").configs(ctx)}
    assert norm_act <= higher


# momentum-eps


def momentum_final(acc_of):
    def final_of(config):
        return {"val_acc": acc_of(config.norm_momentum, config.norm_eps)
                + noise(config.seed)}

    return final_of


def test_momentum_eps_grids():
    assert len(setting_grid("quick")) == 6
    assert len(setting_grid("full")) == 12
    assert (None, 1e-5) in setting_grid("quick")
    assert (0.1, 1e-1) in setting_grid("quick")
    configs = get_claim("momentum-eps").configs(context())
    assert len(configs) == 6 * 3
    assert {c.norm for c in configs} == {"batchnorm"}


def test_momentum_eps_supported_when_foreign_momentum_hurts():
    ctx = context()
    records = synthetic_records(
        "momentum-eps", ctx, momentum_final(lambda m, e: 0.80 if m == 0.9 else 0.95)
    )
    verdict = get_claim("momentum-eps").decide(ctx, records)
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.15)
    accs = verdict.details["mean_val_acc"]
    assert accs["momentum None (cumulative), eps 1e-05"] == pytest.approx(0.95)
    assert accs["momentum 0.1, eps 0.1"] == pytest.approx(0.95)


def test_momentum_eps_not_supported_when_momentum_is_irrelevant():
    ctx = context()
    records = synthetic_records("momentum-eps", ctx, momentum_final(lambda m, e: 0.95))
    verdict = get_claim("momentum-eps").decide(ctx, records)
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(0.0)


def test_momentum_eps_inconclusive_for_noisy_effect():
    ctx = context()
    shifts = {0: 0.05, 1: -0.03, 2: 0.01}

    def final_of(config):
        shift = shifts[config.seed] if config.norm_momentum == 0.9 else 0.0
        return {"val_acc": 0.95 - shift}

    verdict = get_claim("momentum-eps").decide(
        ctx, synthetic_records("momentum-eps", ctx, final_of)
    )
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect == pytest.approx(0.01)


def test_momentum_eps_counts_divergence_as_chance():
    ctx = context()
    records = synthetic_records(
        "momentum-eps", ctx, momentum_final(lambda m, e: 0.95),
        diverged=lambda c: c.norm_momentum == 0.9,
    )
    verdict = get_claim("momentum-eps").decide(ctx, records)
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.85)


# plots and the CLI


def plot_records(claim_id, ctx):
    finals = {
        "init-insensitivity": init_final(FLAT, FLAT),
        "regularization": regularization_final(
            dict.fromkeys([("batchnorm", 0.0), ("none", 0.0), ("batchnorm", 0.5),
                           ("none", 0.5)], 0.92)
        ),
        "layer-order": order_final([0.97] * 3, [0.95] * 3),
        "momentum-eps": momentum_final(lambda m, e: 0.95),
    }
    return synthetic_records(claim_id, ctx, finals[claim_id])


@pytest.mark.parametrize("claim_id", NEW_CLAIMS)
def test_plots_are_written_with_claim_prefix(claim_id, tmp_path):
    ctx = context()
    paths = get_claim(claim_id).plot(ctx, plot_records(claim_id, ctx), tmp_path)
    assert paths
    for path in paths:
        assert path.name.startswith(f"{claim_id}_")
        assert path.suffix == ".png"
        assert path.stat().st_size > 10_000


@pytest.mark.parametrize("claim_id", NEW_CLAIMS)
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
