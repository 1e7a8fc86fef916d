"""Decision rules of the restoration claims on synthetic runs, and one tiny CLI run."""

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
    dncnn_bn,
    edsr_no_bn,
    get_claim,
)
from normlab.claims.dncnn_bn import BN, PLAIN, RL, RL_BN, convergence
from normlab.models import EDSR
from normlab.probes import saved_tensor_bytes
from normlab.store import RunRecord
from normlab.train import restoration

DENOISE_DATA = SimpleNamespace(primary_test="skimage", channels=1, source="synthetic")
SR_DATA = SimpleNamespace(primary_test="skimage", channels=3, source="synthetic")

TINY_DENOISE = dict(
    depth=3, features=8, batch_size=4, patch_size=16, steps=6, patches_per_epoch=24,
    eval_every=3, val_crop=32, test_crop=32,
)
TINY_SR = dict(
    blocks=1, features=8, batch_size=2, lr_patch=8, steps=4, patches_per_epoch=8,
    eval_every=2, lr_milestones=(), val_crop=32, test_crop=32,
)


@pytest.fixture
def tiny_budgets(monkeypatch):
    monkeypatch.setitem(dncnn_bn.BUDGETS, "quick", TINY_DENOISE)
    monkeypatch.setitem(edsr_no_bn.BUDGETS, "quick", TINY_SR)


def denoise_context(seeds=3):
    return StudyContext("embedded-denoise", DENOISE_DATA, "quick", seeds)


def sr_context(seeds=3):
    return StudyContext("embedded-sr", SR_DATA, "quick", seeds)


def psnr_curve(final, reach_step=None, budget=120, every=20):
    """Return validation rows that are 3 dB below ``final`` until ``reach_step``."""
    rows = []
    for step in range(every, budget + 1, every):
        reached = reach_step is not None and step >= reach_step
        rows.append({"step": step, "epoch": 1, "train_loss": 0.01,
                     "val_psnr": final if reached else final - 3.0})
    return rows


def denoise_records(finals, status=None, reach=None):
    """Records of the 2x2 grid; ``finals[condition][seed]`` is the final test PSNR."""
    claim = get_claim("dncnn-bn")
    ctx = denoise_context(len(finals[RL_BN]))
    records = {}
    for condition, values in finals.items():
        for seed, value in enumerate(values):
            config = claim.config(ctx, condition, seed).replace(steps=120)
            run_status = (status or {}).get((condition, seed), "finished")
            reach_step = (reach or {}).get(condition, [20] * len(values))[seed]
            final = {"test_psnr": value if run_status == "finished" else math.nan,
                     "input_psnr": 20.5}
            record = RunRecord(config.key(), config, run_status, steps=120, final=final,
                               history=psnr_curve(value, reach_step))
            records[record.key] = record
    return records


GRID = {
    RL_BN: [28.5, 28.6, 28.4],
    RL: [28.0, 28.1, 28.0],
    BN: [27.0, 27.2, 27.1],
    PLAIN: [27.5, 27.4, 27.6],
}


def test_dncnn_supported_when_rl_bn_is_best():
    verdict = get_claim("dncnn-bn").decide(denoise_context(), denoise_records(GRID))
    assert verdict.verdict == SUPPORTED
    assert verdict.details["best_other"] == RL
    assert verdict.effect == pytest.approx(0.4666667)
    assert verdict.interval[0] > 0
    assert verdict.runs == 12
    assert verdict.details["gap_over"][BN]["mean"] == pytest.approx(1.4)


def test_dncnn_not_supported_when_rl_alone_is_better():
    grid = {**GRID, RL: [29.0, 29.1, 29.0]}
    verdict = get_claim("dncnn-bn").decide(denoise_context(), denoise_records(grid))
    assert verdict.verdict == NOT_SUPPORTED
    assert verdict.effect == pytest.approx(-0.5333333)


def test_dncnn_inconclusive_for_noisy_gap():
    grid = {**GRID, RL: [28.2, 28.9, 28.1]}
    verdict = get_claim("dncnn-bn").decide(denoise_context(), denoise_records(grid))
    assert verdict.verdict == INCONCLUSIVE


def test_dncnn_diverged_run_scores_noisy_input():
    records = denoise_records(GRID, status={(RL_BN, 1): "diverged"})
    verdict = get_claim("dncnn-bn").decide(denoise_context(), records)
    assert verdict.details["final_psnr"][RL_BN]["1"] == 20.5
    assert len(verdict.details["diverged_runs"]) == 1
    assert verdict.verdict != SUPPORTED


def test_dncnn_one_seed_is_inconclusive():
    grid = {c: values[:1] for c, values in GRID.items()}
    records = denoise_records(grid)
    verdict = get_claim("dncnn-bn").decide(denoise_context(seeds=1), records)
    assert verdict.verdict == INCONCLUSIVE
    assert verdict.effect is None


def test_convergence_speedup_of_bn():
    records = denoise_records(GRID, reach={RL_BN: [20, 20, 40], RL: [40, 60, 80]})
    speed = convergence(list(records.values()), [0, 1, 2])
    # target: the lower mean final validation PSNR (RL, 28.0333) minus 0.1 dB
    assert speed["target"] == pytest.approx(28.0333333 - 0.1)
    assert speed["steps"][RL_BN] == {"0": 20, "1": 20, "2": 40}
    assert speed["speedup"] == pytest.approx((2.0 * 3.0 * 2.0) ** (1 / 3))
    assert not speed["censored"]


def test_convergence_counts_never_as_budget():
    records = denoise_records(GRID, reach={RL_BN: [20, 20, 20], RL: [40, 40, 40]})
    # seed 2 without BN stays at 25 dB, below the target, for the whole run
    low = next(r for r in records.values() if r.config.norm == "none"
               and r.config.residual and r.config.seed == 2)
    low.history = [{**row, "val_psnr": 25.0} for row in low.history]
    speed = convergence(list(records.values()), [0, 1, 2])
    assert speed["censored"]
    assert speed["steps"][RL] == {"0": 40, "1": 40, "2": 120}
    assert speed["speedup"] == pytest.approx((2.0 * 2.0 * 6.0) ** (1 / 3))


def test_dncnn_summary_names_secondary_figures():
    verdict = get_claim("dncnn-bn").decide(denoise_context(), denoise_records(GRID))
    assert "the claim says about 1.5x" in verdict.summary
    assert "the claim says gains of up to 1 dB" in verdict.summary
    assert verdict.details["convergence"]["speedup"] == pytest.approx(1.0)


def test_quick_scale_caps_seeds():
    claim = get_claim("dncnn-bn")
    quick = StudyContext("embedded-denoise", DENOISE_DATA, "quick", 5)
    full = StudyContext("embedded-denoise", DENOISE_DATA, "full", 5)
    assert len(claim.configs(quick)) == 4 * 3
    assert len(claim.configs(full)) == 4 * 5
    assert len(get_claim("edsr-no-bn").configs(quick)) == 2 * 3


def sr_records(no_bn, bn, status=None):
    claim = get_claim("edsr-no-bn")
    ctx = sr_context(len(no_bn))
    records = {}
    for norm, values in (("none", no_bn), ("batchnorm", bn)):
        for seed, value in enumerate(values):
            config = claim.config(ctx, norm, seed)
            run_status = (status or {}).get((norm, seed), "finished")
            final = {"test_psnr": value if run_status == "finished" else math.nan,
                     "test_psnr_skimage": value, "test_ssim_skimage": 0.8,
                     "bicubic_psnr": 30.0}
            record = RunRecord(config.key(), config, run_status, steps=4, final=final,
                               history=psnr_curve(value, budget=4, every=2))
            records[record.key] = record
    return records


def test_edsr_supported_when_no_bn_is_better(tiny_budgets):
    verdict = get_claim("edsr-no-bn").decide(
        sr_context(), sr_records([31.0, 31.2, 31.1], [30.5, 30.6, 30.6])
    )
    assert verdict.verdict == SUPPORTED
    assert verdict.effect == pytest.approx(0.5333333)
    assert verdict.details["bicubic_psnr"] == 30.0


def test_edsr_not_supported_when_bn_is_better(tiny_budgets):
    verdict = get_claim("edsr-no-bn").decide(
        sr_context(), sr_records([30.0, 30.1, 30.0], [30.5, 30.6, 30.6])
    )
    assert verdict.verdict == NOT_SUPPORTED


def test_edsr_diverged_bn_scores_bicubic(tiny_budgets):
    records = sr_records([31.0, 31.2, 31.1], [30.5, 30.6, 30.6],
                         status={("batchnorm", 0): "diverged"})
    verdict = get_claim("edsr-no-bn").decide(sr_context(), records)
    assert verdict.details["final_psnr"]["batchnorm"]["0"] == 30.0


def test_edsr_memory_saving_from_real_models(tiny_budgets):
    claim = get_claim("edsr-no-bn")
    memory = claim.memory(sr_context())
    # the same measurement made directly on independently built networks
    import torch
    import torch.nn.functional as F

    measured = {}
    for norm in ("none", "batchnorm"):
        model = EDSR(2, 3, TINY_SR["features"], TINY_SR["blocks"], norm=norm)
        inputs = torch.rand(TINY_SR["batch_size"], 3, 8, 8)
        target = torch.rand(TINY_SR["batch_size"], 3, 16, 16)
        report = saved_tensor_bytes(model, inputs, lambda out: F.l1_loss(out, target))
        measured[norm] = report.activation_bytes
    assert memory["activation_bytes"] == measured
    expected = 1 - measured["none"] / measured["batchnorm"]
    assert memory["saving"] == pytest.approx(expected)
    # BN saves the conv output in each of the block's two convolutions
    assert 0.1 < memory["saving"] < 0.6
    verdict = claim.decide(sr_context(), sr_records([31.0, 31.2], [30.5, 30.6]))
    assert f"{100 * memory['saving']:.0f}% less without BN" in verdict.summary
    assert "GPU memory" in verdict.summary


def test_verify_restoration_end_to_end(tiny_budgets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["verify", "--claims", "dncnn-bn,edsr-no-bn", "--seeds", "2",
            "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert "dncnn-bn" in capsys.readouterr().out

    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [v["claim"] for v in verdicts] == ["dncnn-bn", "edsr-no-bn"]
    assert [v["runs"] for v in verdicts] == [4 * 2, 2 * 2]
    assert [len(v["plots"]) for v in verdicts] == [2, 3]
    for v in verdicts:
        assert v["verdict"] in (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)
        assert v["dataset"] in ("embedded-denoise", "embedded-sr")
        for plot in v["plots"]:
            assert (out / plot.split("/")[-1]).stat().st_size > 5_000
    assert 0 < verdicts[1]["details"]["memory"]["saving"] < 1
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5

    # a second call trains nothing: runs come from the store, weights from checkpoints
    restoration._KEPT_WEIGHTS.clear()
    monkeypatch.setattr(restoration, "train_denoiser", _fail_if_called)
    monkeypatch.setattr(restoration, "train_sr", _fail_if_called)
    assert cli.main(argv) == 0
    again = json.loads((out / "verdicts.json").read_text())
    assert [(v["verdict"], v["effect"]) for v in again] == [
        (v["verdict"], v["effect"]) for v in verdicts
    ]


def _fail_if_called(*args, **kwargs):
    raise AssertionError("a stored run was trained again")
