"""Decision rule of gan-weightnorm on synthetic runs, and one tiny CLI run."""

import json
import math
from types import SimpleNamespace

import pytest

from normlab import cli
from normlab.claims import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    StudyContext,
    gan_weightnorm,
    get_claim,
)
from normlab.claims.gan_weightnorm import BN, NO_NORM, WN, relative_reduction
from normlab.store import RunRecord
from normlab.train import gan
from normlab.train.gan import GANConfig

DATA = SimpleNamespace(source="synthetic")
MEAN_IMAGE_MSE = 0.2
TINY = dict(
    image_size=8, latent_dim=4, features=4, batch_size=8, steps=4, eval_every=2,
    recon_images=4, recon_steps=2, recon_restarts=1,
)


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setitem(gan_weightnorm.BUDGETS, ("digits", "quick"), TINY)


def context(seeds=3):
    return StudyContext("digits", DATA, "quick", seeds)


def record(norm, seed, recon, status="finished", diversity=0.8, d_loss=1.0,
           g_loss=1.0):
    config = GANConfig(norm=norm, seed=seed, **TINY)
    final = {
        "recon_mse": recon if status == "finished" else math.nan,
        "recon_mse_mean_image": MEAN_IMAGE_MSE,
        "diversity": diversity if status == "finished" else math.nan,
        "d_loss": d_loss,
        "g_loss": g_loss,
        "batch_dependence_train": 0.1 if norm == BN else 0.0,
        "batch_dependence_eval": 0.0,
    }
    return RunRecord(key=config.key(), config=config, status=status, final=final)


def records_from(table, overrides=None):
    """Build runs from ``{norm: [recon per seed]}``.

    ``overrides`` maps ``(norm, seed)`` to keyword arguments of :func:`record`.
    """
    overrides = overrides or {}
    runs = {}
    for norm, values in table.items():
        for seed, recon in enumerate(values):
            kwargs = overrides.get((norm, seed), {})
            run = record(norm, seed, recon, **kwargs)
            runs[run.key] = run
    return runs


def decide(table, seeds=3, overrides=None):
    claim = get_claim("gan-weightnorm")
    return claim.decide(context(seeds), records_from(table, overrides))


def test_relative_reduction():
    assert relative_reduction(0.1, 0.09) == pytest.approx(0.1)
    assert relative_reduction(0.1, 0.12) == pytest.approx(-0.2)


def test_supported_when_wn_clearly_lower():
    verdict = decide({BN: [0.10, 0.11, 0.10], WN: [0.080, 0.088, 0.081],
                      NO_NORM: [0.15, 0.16, 0.2]})
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.195, abs=0.01)
    assert verdict.interval[0] > 0
    assert verdict.runs == 9
    assert "reduces the BatchNorm error by +19" in verdict.summary


def test_not_supported_when_wn_worse():
    verdict = decide({BN: [0.05, 0.05, 0.06], WN: [0.08, 0.09, 0.085],
                      NO_NORM: [0.15, 0.16, 0.2]})
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect < 0
    assert verdict.interval[1] < 0.05


def test_inconclusive_when_seeds_disagree():
    verdict = decide({BN: [0.10, 0.10, 0.10], WN: [0.05, 0.13, 0.09],
                      NO_NORM: [0.15, 0.16, 0.2]})
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.interval[0] < 0.05 < verdict.interval[1]


def test_not_supported_when_gain_below_margin():
    # consistently lower, but by only 2%: the interval excludes 0 and stays below 5%
    verdict = decide({BN: [0.100, 0.100, 0.100], WN: [0.098, 0.0981, 0.0979],
                      NO_NORM: [0.15, 0.16, 0.2]})
    assert verdict.interval[0] > 0
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.interval[1] < 0.05


def test_inconclusive_with_one_seed():
    verdict = decide({BN: [0.10], WN: [0.08], NO_NORM: [0.15]}, seeds=1)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None
    assert "at least 2" in verdict.summary


def test_diverged_run_scores_mean_image():
    verdict = decide(
        {BN: [0.10, 0.10, 0.10], WN: [0.08, 0.08, 0.08], NO_NORM: [0.15, 0.16, 0.2]},
        overrides={(BN, 1): {"status": "diverged"}},
    )
    assert verdict.details["recon_mse"][BN]["1"] == MEAN_IMAGE_MSE
    assert verdict.details["diverged"] == {BN: 1, WN: 0, NO_NORM: 0}
    assert verdict.details["outcomes"][BN]["1"] == "diverged"
    effects = verdict.details["per_seed_effect"]
    assert effects["1"] == pytest.approx((0.2 - 0.08) / 0.2)
    assert "BatchNorm 0 collapsed and 1 diverged" in verdict.summary


def test_collapsed_runs_counted_and_scored():
    verdict = decide(
        {BN: [0.10, 0.10, 0.10], WN: [0.08, 0.08, 0.08], NO_NORM: [0.15, 0.16, 0.2]},
        overrides={(NO_NORM, 0): {"diversity": 0.05},
                   (WN, 2): {"d_loss": 0.01, "g_loss": 9.0}},
    )
    assert verdict.details["collapsed"] == {BN: 0, WN: 1, NO_NORM: 1}
    assert verdict.details["outcomes"][WN]["2"] == "collapsed"
    # a collapsed run keeps its measured error
    assert verdict.details["recon_mse"][WN]["2"] == 0.08
    assert verdict.verdict == SUPPORTED


def test_batch_dependence_in_details():
    verdict = decide({BN: [0.10, 0.11, 0.10], WN: [0.08, 0.088, 0.081],
                      NO_NORM: [0.15, 0.16, 0.2]})
    table = verdict.details["batch_dependence"]
    assert table[BN] == {"train": 0.1, "eval": 0.0}
    assert table[WN] == {"train": 0.0, "eval": 0.0}
    assert "up to 0.1 in train mode and 0 in eval mode" in verdict.summary


def test_configs_cap_quick_seeds():
    claim = get_claim("gan-weightnorm")
    configs = claim.configs(context(seeds=5))
    assert len(configs) == 3 * 3
    assert {c.norm for c in configs} == {BN, WN, NO_NORM}
    assert all(c.task == "gan" for c in configs)


def test_configs_reject_unknown_dataset():
    claim = get_claim("gan-weightnorm")
    with pytest.raises(ValueError, match="no GAN budget"):
        claim.configs(StudyContext("svhn", DATA, "quick", 2))


def test_verify_gan_end_to_end(tiny_budget, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["verify", "--claims", "gan-weightnorm", "--seeds", "2", "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    assert "gan-weightnorm" in capsys.readouterr().out

    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [v["claim"] for v in verdicts] == ["gan-weightnorm"]
    verdict = verdicts[0]
    assert verdict["runs"] == 3 * 2
    assert verdict["verdict"] in (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)
    names = [plot.split("/")[-1] for plot in verdict["plots"]]
    assert names == [
        "gan-weightnorm_recon.png",
        "gan-weightnorm_curves.png",
        "gan-weightnorm_samples_batchnorm.png",
        "gan-weightnorm_samples_weightnorm.png",
        "gan-weightnorm_samples_none.png",
        "gan-weightnorm_bn_pitfall.png",
    ]
    for name in names:
        assert (out / name).stat().st_size > 5_000
    pitfall = verdict["details"]["batch_dependence"]
    assert pitfall[BN]["train"] > pitfall[BN]["eval"]

    # a second call trains nothing: the runs come from the store and the generators
    # from the checkpoints
    gan._KEPT_WEIGHTS.clear()
    monkeypatch.setattr(gan, "train_gan", _fail_if_called)
    assert cli.main(argv) == 0
    again = json.loads((out / "verdicts.json").read_text())
    assert [(v["verdict"], v["effect"]) for v in again] == [
        (verdict["verdict"], verdict["effect"])
    ]


def _fail_if_called(*args, **kwargs):
    raise AssertionError("a stored run was trained again")
