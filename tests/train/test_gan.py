"""DCGAN trainer on tiny settings, and the measurements it takes of a generator."""

import math
import re

import pytest
import torch
from torch import nn

from normlab.data import load_classification
from normlab.models import DCGANGenerator
from normlab.store import RunStore
from normlab.sweep import TRAINERS, run_sweep
from normlab.train import gan
from normlab.train.config import config_from_dict
from normlab.train.gan import (
    GANConfig,
    batch_dependence,
    collapse_reason,
    diversity_ratio,
    image_grid,
    mean_pairwise_distance,
    reconstruction_mse,
    to_gan_images,
    train_gan,
    trained_generator,
)

HISTORY_KEYS = {"step", "epoch", "d_loss", "g_loss", "d_real", "d_fake", "diversity"}
FINAL_KEYS = {
    "recon_mse", "recon_mse_mean_image", "recon_images", "diversity", "d_loss",
    "g_loss", "d_real", "d_fake", "batch_dependence_train", "batch_dependence_eval",
}


@pytest.fixture(scope="module")
def digits():
    return load_classification("digits")


def tiny(**changes) -> GANConfig:
    settings = dict(
        image_size=8, latent_dim=4, features=4, batch_size=8, steps=6, eval_every=3,
        recon_images=4, recon_steps=3, recon_restarts=2,
    )
    settings.update(changes)
    return GANConfig(**settings)


class LinearGenerator(nn.Module):
    """G(z) = W z, reshaped to 1x4x4 images."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(latent_dim, 16, bias=False)

    def forward(self, z):
        return self.linear(z).view(-1, 1, 4, 4)


def test_config_round_trip_and_key():
    config = tiny(norm="weightnorm")
    assert config_from_dict("gan", config.to_dict()) == config
    assert config.key() == tiny(norm="weightnorm").key()
    assert config.key() != tiny(norm="batchnorm").key()
    assert config.task == "gan"
    assert "gan" in TRAINERS


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(image_size=12), "power of 2"),
        (dict(batch_size=1), "at least 2"),
        (dict(beta1=1.0), "beta1 must be in [0, 1)"),
        (dict(recon_restarts=0), "recon_restarts must be a positive integer"),
        (dict(norm="bogus"), "unknown normalization"),
        (dict(lr=math.inf), "lr must be a positive finite number"),
    ],
)
def test_config_rejects_invalid_fields(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny(**changes)


def test_gan_images_on_tanh_scale(digits):
    images = to_gan_images(digits.train.x, digits, 16)
    assert images.shape == (len(digits.train), 1, 16, 16)
    assert images.min() >= -1.0
    assert images.max() <= 1.0
    # the digits' background is pixel value 0, which maps to -1
    assert images.min() == pytest.approx(-1.0)
    native = to_gan_images(digits.train.x, digits, 8)
    raw = digits.train.x * digits.std[0] + digits.mean[0]
    assert torch.allclose(native, raw.clamp(0, 1) * 2 - 1, atol=1e-6)


@pytest.mark.parametrize("norm", ["batchnorm", "weightnorm", "none"])
def test_train_gan_history_and_final(digits, norm):
    result = train_gan(tiny(norm=norm, image_size=16), digits)
    assert result.status == "finished"
    assert result.steps == 6
    assert result.diverged_step is None
    assert len(result.step_loss) == 6
    assert [row["step"] for row in result.history] == [3, 6]
    for row in result.history:
        assert set(row) == HISTORY_KEYS
        assert math.isfinite(row["d_loss"])
        assert math.isfinite(row["g_loss"])
        assert 0 <= row["d_real"] <= 1
    assert set(result.final) == FINAL_KEYS
    assert result.final["recon_mse"] > 0
    assert result.final["recon_mse"] < 4  # images on [-1, 1]
    assert result.final["recon_images"] == 4
    assert result.final["batch_dependence_eval"] < 1e-5


def test_train_gan_batch_dependence_only_for_batchnorm(digits):
    bn = train_gan(tiny(norm="batchnorm"), digits).final
    wn = train_gan(tiny(norm="weightnorm"), digits).final
    assert bn["batch_dependence_train"] > 1e-3
    assert bn["batch_dependence_eval"] < 1e-5
    assert wn["batch_dependence_train"] < 1e-5


def test_train_gan_deterministic_for_seed(digits):
    first = train_gan(tiny(), digits)
    second = train_gan(tiny(), digits)
    other = train_gan(tiny(seed=1), digits)
    assert first.step_loss == second.step_loss
    assert first.final == second.final
    assert first.step_loss != other.step_loss


def test_train_gan_leaves_global_rng(digits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_gan(tiny(), digits)
    assert torch.equal(torch.rand(3), expected)


def test_train_gan_diverges_on_huge_lr(digits):
    result = train_gan(tiny(lr=1e4, steps=30, diverge_loss=5.0), digits)
    assert result.status == "diverged"
    assert result.diverged_step is not None
    assert result.steps == result.diverged_step
    assert math.isnan(result.final["recon_mse"])
    assert math.isnan(result.final["batch_dependence_train"])
    assert math.isfinite(result.final["recon_mse_mean_image"])


def test_train_gan_rejects_other_dataset(digits):
    with pytest.raises(ValueError, match="does not match the loaded data"):
        train_gan(tiny(dataset="cifar10"), digits)


def test_reconstruction_exact_for_reachable_targets():
    torch.manual_seed(0)
    generator = LinearGenerator(latent_dim=4)
    with torch.no_grad():
        targets = generator(torch.randn(5, 4))
    errors = reconstruction_mse(generator, targets, 4, steps=500, lr=0.05, restarts=2)
    assert errors.shape == (5,)
    assert errors.max() < 1e-6
    # the generator is left trainable and in its mode
    assert all(p.requires_grad for p in generator.parameters())
    assert generator.training


def test_reconstruction_matches_least_squares():
    torch.manual_seed(0)
    generator = LinearGenerator(latent_dim=3)
    targets = torch.randn(4, 1, 4, 4)
    errors = reconstruction_mse(generator, targets, 3, steps=1500, lr=0.05, restarts=1)
    weight = generator.linear.weight.detach()
    solution = torch.linalg.lstsq(weight, targets.flatten(1).T).solution
    residual = ((weight @ solution).T - targets.flatten(1)) ** 2
    expected = residual.mean(1)
    assert torch.allclose(errors, expected, rtol=1e-3, atol=1e-6)


def test_reconstruction_keeps_best_restart():
    generator = LinearGenerator(latent_dim=2)
    targets = torch.randn(3, 1, 4, 4)
    one = reconstruction_mse(generator, targets, 2, steps=2, lr=0.01, restarts=1)
    three = reconstruction_mse(generator, targets, 2, steps=2, lr=0.01, restarts=3)
    assert torch.all(three <= one)


def test_batch_dependence_batchnorm_generator():
    torch.manual_seed(0)
    generator = DCGANGenerator(8, 1, 8, 4, "batchnorm")
    running = generator.layers[1].running_mean.clone()
    result = batch_dependence(generator, 8, batch_size=6, targets=3)
    assert result.train_diff > 1e-3
    assert result.eval_diff < 1e-6
    assert result.images[("train", "A")].shape == (3, 1, 8, 8)
    # the train-mode passes ran on a copy, so running statistics are unchanged
    assert torch.equal(generator.layers[1].running_mean, running)
    assert generator.training


@pytest.mark.parametrize("norm", ["none", "weightnorm"])
def test_batch_dependence_without_batchnorm(norm):
    torch.manual_seed(0)
    generator = DCGANGenerator(8, 1, 8, 4, norm)
    result = batch_dependence(generator, 8, batch_size=6, targets=3)
    assert result.train_diff < 1e-6
    assert result.eval_diff < 1e-6


def test_diversity_ratio_of_constant_generator():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(1, 1, 4, 4))

        def forward(self, z):
            return self.bias.expand(len(z), 1, 4, 4)

    real = torch.rand(10, 1, 4, 4)
    assert diversity_ratio(Constant(), 2, real) == 0.0
    assert mean_pairwise_distance(real) > 0


@pytest.mark.parametrize(
    "final, collapsed",
    [
        ({"diversity": 0.1, "d_loss": 1.0, "g_loss": 1.0}, True),
        ({"diversity": 0.8, "d_loss": 0.01, "g_loss": 8.0}, True),
        ({"diversity": 0.8, "d_loss": 0.01, "g_loss": 1.0}, False),
        ({"diversity": 0.8, "d_loss": 1.2, "g_loss": 0.9}, False),
        ({"diversity": math.nan, "d_loss": 1.2, "g_loss": 0.9}, False),
    ],
)
def test_collapse_reason(final, collapsed):
    assert (collapse_reason(final) is not None) == collapsed


def test_image_grid_shape_and_scale():
    images = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 3, 3)
    grid = image_grid(images, columns=2, padding=1)
    assert grid.shape == (5, 9)
    assert grid[1, 1] == 0
    assert grid[1, 5] == 255
    rgb = image_grid(torch.zeros(3, 3, 2, 2), columns=2)
    assert rgb.shape == (7, 7, 3)


def test_sweep_stores_gan_runs(digits, tmp_path):
    configs = [tiny(norm="batchnorm"), tiny(norm="weightnorm")]
    with RunStore(tmp_path / "runs.db") as store:
        records = run_sweep(configs, store, digits, progress=False)
    assert len(records) == 2
    for config in configs:
        record = records[config.key()]
        assert record.status == "finished"
        assert record.config == config
        assert [row["step"] for row in record.history] == [3, 6]
        assert math.isfinite(record.final["recon_mse"])


def test_trained_generator_from_checkpoint(digits, tmp_path, monkeypatch):
    config = tiny(norm="weightnorm", seed=3)
    train_gan(config, digits)
    first = trained_generator(config, digits, tmp_path)
    assert (tmp_path / f"{config.key()}.pt").is_file()
    gan._KEPT_WEIGHTS.clear()
    monkeypatch.setattr(gan, "train_gan", _fail_if_called)
    second = trained_generator(config, digits, tmp_path)
    z = torch.randn(4, config.latent_dim)
    with torch.no_grad():
        assert torch.equal(first(z), second(z))


def _fail_if_called(*args, **kwargs):
    raise AssertionError("a stored run was trained again")
