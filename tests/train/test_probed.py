import math
import re

import pytest
import torch
from torch import nn

from normlab.data import load_classification
from normlab.models import MLP
from normlab.nn.batchnorm import BatchNorm1d
from normlab.store import RunStore
from normlab.train import TrainConfig, train_classifier
from normlab.train.config import config_from_dict
from normlab.train.probed import (
    NoisyBatchNorm,
    ProbedConfig,
    add_batchnorm_noise,
    train_probed,
)


@pytest.fixture(scope="module")
def digits():
    return load_classification("digits")


def tiny(**changes) -> ProbedConfig:
    settings = dict(
        dataset="digits", hidden=(16, 16), epochs=1, eval_every=4, lr=0.1,
        probe_every=5,
    )
    settings.update(changes)
    return ProbedConfig(**settings)


def probe_steps(result, name):
    return [row["step"] for row in result.history if name in row]


def test_ics_probe_rows_every_probe_interval(digits):
    result = train_probed(tiny(probes=("ics",)), digits)
    assert result.status == "finished"
    assert result.steps == 17
    assert probe_steps(result, "ics_l2_layer2") == [0, 5, 10, 15]
    assert probe_steps(result, "ics_cos_layer3") == [0, 5, 10, 15]
    assert probe_steps(result, "ics_grad_layer2") == [0, 5, 10, 15]
    assert not any("ics_l2_layer1" in row for row in result.history)
    shifts = [row["ics_l2_layer2"] for row in result.history if "ics_l2_layer2" in row]
    assert min(shifts) > 0


def test_landscape_and_ratio_probe_rows(digits):
    result = train_probed(tiny(probes=("landscape", "grad-ratio")), digits)
    first = result.history[0]
    assert first["step"] == 0
    assert first["epoch"] == 0
    for name in ("loss_variation", "grad_pred", "beta", "probe_loss"):
        assert math.isfinite(first[name]), name
    ratio = first["grad_first"] / first["grad_last"]
    assert first["grad_ratio"] == pytest.approx(ratio)
    assert probe_steps(result, "beta") == [0, 5, 10, 15]


def test_evaluation_rows_merge_with_probes(digits):
    result = train_probed(tiny(probes=("grad-ratio",), probe_every=4), digits)
    steps = [row["step"] for row in result.history]
    assert steps == sorted(set(steps))
    row = next(r for r in result.history if r["step"] == 4)
    assert "val_acc" in row
    assert "grad_ratio" in row
    assert row["epoch"] == 1


def test_probes_leave_training_unchanged(digits):
    plain = train_classifier(
        TrainConfig(dataset="digits", hidden=(16, 16), epochs=1, eval_every=4, lr=0.1),
        digits,
    )
    probed = train_probed(tiny(probes=("ics", "landscape", "grad-ratio")), digits)
    assert probed.step_loss == plain.step_loss
    assert probed.final == plain.final


def test_same_seed_gives_same_probe_values(digits):
    config = tiny(probes=("ics",), noise_shift=1.0, noise_scale=0.5)
    first = train_probed(config, digits)
    second = train_probed(config, digits)
    assert first.history == second.history
    assert first.step_loss == second.step_loss
    other = train_probed(config.replace(seed=1), digits)
    assert other.step_loss != first.step_loss


def test_max_steps_stops_training(digits):
    result = train_probed(tiny(probes=("grad-ratio",), max_steps=7, epochs=3), digits)
    assert result.steps == 7
    assert len(result.step_loss) == 7
    assert result.history[-1]["step"] == 7
    assert probe_steps(result, "grad_ratio") == [0, 5]


def test_noise_changes_training(digits):
    clean = train_probed(tiny(), digits)
    noisy = train_probed(tiny(noise_shift=1.0, noise_scale=0.5), digits)
    assert clean.step_loss != noisy.step_loss


def test_store_keeps_probe_rows(digits, tmp_path):
    config = tiny(probes=("ics", "grad-ratio"))
    result = train_probed(config, digits)
    with RunStore(tmp_path / "runs.db") as store:
        store.finish(store.start(config), result)
        record = store.load(config.key())
    assert isinstance(record.config, ProbedConfig)
    assert record.config == config
    stored = {row["step"]: row for row in record.history}
    for row in result.history:
        for name, value in row.items():
            assert stored[row["step"]][name] == pytest.approx(value), name


def test_config_round_trip_and_key():
    config = tiny(probes=["ics", "landscape"], max_steps=9)
    assert config.probes == ("ics", "landscape")
    assert config_from_dict("classify-probed", config.to_dict()) == config
    plain = TrainConfig(dataset="digits", hidden=(16, 16), epochs=1, eval_every=4)
    assert ProbedConfig.from_train_config(plain).key() != plain.key()
    assert ProbedConfig.from_train_config(plain, probes=("ics",)).probes == ("ics",)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"probes": ("hessian",)}, "probes must be names from"),
        ({"probe_every": 0}, "probe_every must be a positive integer"),
        ({"landscape_points": 1}, "landscape_points must be at least 2"),
        ({"max_steps": 0}, "max_steps must be None or a positive integer"),
        ({"noise_shift": -1.0}, "noise_shift must be >= 0"),
        ({"noise_scale": 1.0}, "noise_scale must be in [0, 1)"),
        ({"norm": "none", "noise_shift": 0.5}, "apply to norm batchnorm"),
    ],
)
def test_config_rejects_invalid_fields(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny(**changes)


def test_noisy_batchnorm_noise_only_in_train_mode():
    torch.manual_seed(0)
    norm = BatchNorm1d(6)
    noisy = NoisyBatchNorm(norm, shift=1.0, scale=0.5)
    x = torch.randn(32, 6)
    clean = norm(x)
    out = noisy(x)
    assert not torch.allclose(out, clean)
    noisy.eval()
    assert torch.equal(noisy(x), norm(x))


def test_noisy_batchnorm_per_channel_affine_noise():
    torch.manual_seed(0)
    norm = BatchNorm1d(6)
    noisy = NoisyBatchNorm(norm, shift=1.0, scale=0.5)
    x = torch.randn(32, 6)
    clean = norm(x)
    out = noisy(x)
    # out = clean * s + m with one s and one m per channel
    s = (out[0] - out[1]) / (clean[0] - clean[1])
    m = out[0] - clean[0] * s
    assert torch.allclose(out, clean * s + m, atol=1e-5)
    assert ((s >= 0.5) & (s <= 1.5)).all()
    assert ((m >= -1.0) & (m <= 1.0)).all()
    assert m.abs().max() > 0.1


def test_noisy_batchnorm_redraws_every_step():
    torch.manual_seed(0)
    noisy = NoisyBatchNorm(nn.BatchNorm1d(4), shift=1.0, scale=0.5)
    x = torch.randn(16, 4)
    first = noisy(x)
    second = noisy(x)
    assert not torch.allclose(first, second)


def test_add_batchnorm_noise_keeps_parameter_order():
    model = MLP(64, (8, 8), 10, norm="batchnorm")
    shapes = [p.shape for p in model.parameters()]
    assert add_batchnorm_noise(model, 1.0, 0.5) == 2
    noisy_layers = [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]
    assert len(noisy_layers) == 2
    assert [p.shape for p in model.parameters()] == shapes
    assert add_batchnorm_noise(MLP(64, (8, 8), 10, norm="none"), 1.0, 0.5) == 0
