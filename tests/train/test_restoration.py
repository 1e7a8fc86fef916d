"""Restoration trainers on tiny networks: history, determinism, divergence, storage."""

import logging
import math
import os

import numpy as np
import pytest
import torch

from normlab.data import DataError
from normlab.store import RunStore
from normlab.sweep import TRAINERS, run_sweep
from normlab.train.config import config_from_dict
from normlab.train.restoration import (
    DenoiseConfig,
    SRConfig,
    _KEPT_WEIGHTS,
    center_crop,
    load_claim_data,
    load_restoration_data,
    measure_saved_memory,
    sr_pairs,
    baseline_scores,
    train_denoiser,
    train_sr,
    trained_model,
)

HISTORY_KEYS = {"step", "epoch", "train_loss", "val_psnr"}


@pytest.fixture(scope="module")
def denoise_data():
    return load_restoration_data("denoise")


@pytest.fixture(scope="module")
def sr_data():
    return load_restoration_data("sr")


def tiny_denoise(**changes) -> DenoiseConfig:
    settings = dict(
        depth=3, features=8, batch_size=4, patch_size=16, steps=6, patches_per_epoch=8,
        eval_every=3, val_crop=32, test_crop=32,
    )
    settings.update(changes)
    return DenoiseConfig(**settings)


def tiny_sr(**changes) -> SRConfig:
    settings = dict(
        blocks=1, features=8, batch_size=2, lr_patch=8, steps=4, patches_per_epoch=8,
        eval_every=2, lr_milestones=(), val_crop=32, test_crop=32,
    )
    settings.update(changes)
    return SRConfig(**settings)


def test_denoiser_history_and_metrics(denoise_data):
    result = train_denoiser(tiny_denoise(), denoise_data)
    assert result.status == "finished"
    assert result.steps == 6
    assert len(result.step_loss) == 6
    assert [row["step"] for row in result.history] == [3, 6]
    assert all(set(row) == HISTORY_KEYS for row in result.history)
    # 6 steps of 4 patches with 8 patches per epoch end in the third epoch
    assert [row["epoch"] for row in result.history] == [2, 3]
    final = result.final
    keys = ("test_psnr", "test_ssim", "test_psnr_skimage", "input_psnr", "best_psnr")
    for key in keys:
        assert math.isfinite(final[key]), key
    assert final["test_psnr"] == final["test_psnr_skimage"]
    assert final["best_psnr"] == max(row["val_psnr"] for row in result.history)
    assert 0.0 < final["test_ssim"] <= 1.0
    # sigma 25 on 8-bit images: the noisy input scores about 20.5 dB
    assert final["input_psnr"] == pytest.approx(20.5, abs=0.5)


def test_sr_history_and_metrics(sr_data):
    result = train_sr(tiny_sr(), sr_data)
    assert result.status == "finished"
    assert [row["step"] for row in result.history] == [2, 4]
    assert all(set(row) == HISTORY_KEYS for row in result.history)
    for key in ("test_psnr", "test_ssim", "bicubic_psnr", "bicubic_ssim", "best_psnr"):
        assert math.isfinite(result.final[key]), key
    assert result.final["bicubic_psnr"] > 25.0


@pytest.mark.parametrize("task", ["denoise", "sr"])
def test_same_seed_gives_same_numbers(task, denoise_data, sr_data):
    train, config, data = (
        (train_denoiser, tiny_denoise(seed=2), denoise_data)
        if task == "denoise" else (train_sr, tiny_sr(seed=2), sr_data)
    )
    first = train(config, data)
    second = train(config, data)
    assert first.step_loss == second.step_loss
    assert first.history == second.history
    assert first.final == second.final


def test_other_seed_gives_other_numbers(denoise_data):
    first = train_denoiser(tiny_denoise(seed=0), denoise_data)
    second = train_denoiser(tiny_denoise(seed=1), denoise_data)
    assert first.step_loss != second.step_loss


def test_training_leaves_global_rng_alone(denoise_data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_denoiser(tiny_denoise(steps=2), denoise_data)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("task", ["denoise", "sr"])
def test_huge_lr_diverges(task, denoise_data, sr_data):
    if task == "denoise":
        result = train_denoiser(tiny_denoise(lr=1e6, steps=20), denoise_data)
        floor = "input_psnr"
    else:
        result = train_sr(tiny_sr(lr=1e6, steps=20), sr_data)
        floor = "bicubic_psnr"
    assert result.status == "diverged"
    assert result.diverged_step is not None
    assert result.steps == result.diverged_step < 20
    assert math.isnan(result.final["test_psnr"])
    assert math.isfinite(result.final[floor])


def test_trainer_rejects_other_dataset(denoise_data, sr_data):
    with pytest.raises(ValueError, match="does not match the loaded data"):
        train_denoiser(tiny_denoise(dataset="bsd400"), denoise_data)
    with pytest.raises(ValueError, match="need RestorationData of task 'denoise'"):
        train_denoiser(tiny_denoise(), sr_data)
    with pytest.raises(ValueError, match="needs an SRConfig"):
        train_sr(tiny_denoise(), sr_data)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(lr=0.0), "lr must be a positive finite number"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(lr_milestones=(5, 3)), "lr_milestones must be increasing"),
        (dict(val_crop=8), "val_crop must be None"),
        (dict(dataset=""), "dataset must name"),
        (dict(depth=2), "depth must be an integer of at least 3"),
        (dict(sigma=-1.0), "sigma must be a non-negative number"),
        (dict(norm="nonorm"), "unknown normalization 'nonorm'"),
    ],
)
def test_denoise_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_denoise(**changes)


def test_sr_config_rejects_bad_scale():
    with pytest.raises(ValueError, match="scale must be 2, 3 or 4, got 5"):
        tiny_sr(scale=5)


def test_config_round_trip_and_key():
    config = tiny_denoise(lr_milestones=(3,), norm="BatchNorm")
    assert config.norm == "batchnorm"
    again = config_from_dict("denoise", config.to_dict())
    assert again == config
    assert again.key() == config.key()
    assert config.replace(seed=1).key() != config.key()
    sr = tiny_sr()
    assert config_from_dict("sr", sr.to_dict()) == sr
    with pytest.raises(ValueError, match="unknown DenoiseConfig fields: blocks"):
        DenoiseConfig.from_dict({**config.to_dict(), "blocks": 2})


def test_sweep_trains_and_stores_restoration_runs(tmp_path, denoise_data):
    import normlab.claims  # noqa: F401, registers the trainers as the CLI does

    assert {"denoise", "sr"} <= set(TRAINERS)
    config = tiny_denoise(steps=3)
    with RunStore(tmp_path / "runs.db") as store:
        records = run_sweep([config], store, denoise_data, progress=False)
    record = records[config.key()]
    assert record.status == "finished"
    assert record.config == config
    assert [set(row) for row in record.history] == [HISTORY_KEYS]
    assert record.final["test_psnr"] == pytest.approx(record.history[-1]["val_psnr"])


def test_trained_model_from_memory_file_and_retraining(tmp_path, denoise_data):
    config = tiny_denoise(seed=5, steps=3)
    train_denoiser(config, denoise_data)
    from_memory = trained_model(config, denoise_data, tmp_path)
    assert (tmp_path / f"{config.key()}.pt").is_file()
    assert not from_memory.training

    _KEPT_WEIGHTS.pop(config.key())
    from_file = trained_model(config, denoise_data, tmp_path)
    _KEPT_WEIGHTS.pop(config.key(), None)
    retrained = trained_model(config, denoise_data)
    for name, value in from_memory.state_dict().items():
        assert torch.equal(value, from_file.state_dict()[name]), name
        assert torch.equal(value, retrained.state_dict()[name]), name


def test_trained_model_of_diverged_run_is_none(denoise_data):
    assert trained_model(tiny_denoise(lr=1e6, steps=20), denoise_data) is None


def test_center_crop_keeps_lr_grid():
    image = np.arange(15 * 20).reshape(15, 20)
    crop = center_crop(image, 8, multiple=2)
    assert crop.shape == (8, 8)
    assert crop[0, 0] == image[2, 6]
    assert center_crop(image, None) is image
    assert center_crop(image, 100).shape == (15, 20)


def test_saved_memory_is_larger_with_bn():
    none = measure_saved_memory(tiny_sr(norm="none"), 3)
    batchnorm = measure_saved_memory(tiny_sr(norm="batchnorm"), 3)
    assert batchnorm.activation_bytes > none.activation_bytes
    assert "BatchNorm2d" in batchnorm.by_layer_type
    assert "BatchNorm2d" not in none.by_layer_type


def test_claim_data_falls_back_to_photographs(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_claim_data("sr", tmp_path)
    assert data.name == "embedded-sr"
    assert "scikit-image photographs instead" in caplog.text
    with pytest.raises(DataError, match="t91 not found"):
        load_restoration_data("sr", tmp_path)


def test_fingerprint_is_stable_and_task_specific(denoise_data, sr_data):
    assert denoise_data.fingerprint() == load_restoration_data("denoise").fingerprint()
    assert denoise_data.fingerprint() != sr_data.fingerprint()


DATA_DIR = os.environ.get("NORMLAB_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="NORMLAB_DATA_DIR is not set")


@needs_data
def test_real_sets_load_by_task():
    denoise = load_restoration_data("denoise", DATA_DIR)
    assert denoise.name == "bsd400"
    assert list(denoise.tests) == ["bsd68", "set12"]
    assert len(denoise.train_images) == 400
    sr = load_restoration_data("sr", DATA_DIR)
    assert sr.name in ("div2k", "t91")
    assert list(sr.tests) == ["set5", "set14"]


@needs_data
def test_bicubic_set5_matches_published_psnr():
    # Bicubic x2 on Set5 (Y, border 2) is 33.66 dB in the SR papers' tables, which
    # round Y to 8 bits; normlab keeps Y in float, about 0.03 dB higher.
    data = load_restoration_data("sr", DATA_DIR)
    pairs = sr_pairs(data, "set5", 2, None)
    value, _ = baseline_scores(tiny_sr(dataset=data.name), pairs)
    assert value == pytest.approx(33.69, abs=0.03)
