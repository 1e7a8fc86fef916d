import math

import pytest
import torch

from normlab.data import load_classification
from normlab.train import TrainConfig, train_classifier


@pytest.fixture(scope="module")
def digits():
    return load_classification("digits")


def tiny(**changes) -> TrainConfig:
    settings = dict(dataset="digits", hidden=(32, 32), epochs=2, eval_every=4, lr=0.1)
    settings.update(changes)
    return TrainConfig(**settings)


def test_same_seed_gives_same_numbers(digits):
    first = train_classifier(tiny(seed=3), digits)
    second = train_classifier(tiny(seed=3), digits)
    assert first.step_loss == second.step_loss
    assert first.history == second.history
    assert first.final == second.final


def test_other_seed_gives_other_numbers(digits):
    first = train_classifier(tiny(seed=0), digits)
    second = train_classifier(tiny(seed=1), digits)
    assert first.step_loss != second.step_loss


def test_training_leaves_global_rng_alone(digits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(tiny(), digits)
    assert torch.equal(torch.rand(3), expected)


def test_steps_history_and_metrics(digits):
    result = train_classifier(tiny(batch_size=64), digits)
    steps_per_epoch = math.ceil(len(digits.train) / 64)
    assert result.status == "finished"
    assert result.steps == 2 * steps_per_epoch
    assert len(result.step_loss) == result.steps
    assert [row["step"] for row in result.history][:3] == [4, 8, 12]
    assert result.history[-1]["step"] == result.steps
    assert result.final["val_acc"] > 0.5
    assert result.final["best_val_acc"] >= result.history[-1]["val_acc"]
    for split in ("train", "val", "test"):
        assert 0.0 <= result.final[f"{split}_acc"] <= 1.0


def test_learning_reduces_loss(digits):
    result = train_classifier(tiny(epochs=3), digits)
    assert result.history[-1]["train_loss"] < 0.5 * result.step_loss[0]


def test_exploding_run_is_recorded_as_diverged(digits):
    result = train_classifier(tiny(norm="none", lr=100.0), digits)
    assert result.status == "diverged"
    assert result.diverged_step is not None
    assert result.steps == result.diverged_step
    assert math.isnan(result.final["test_acc"])


def test_nan_input_is_recorded_as_diverged(digits):
    import copy

    poisoned = copy.deepcopy(digits)
    poisoned.train.x[:] = float("nan")
    result = train_classifier(tiny(), poisoned)
    assert result.status == "diverged"
    assert result.diverged_step == 1


def test_ours_and_torch_batchnorm_train_alike(digits):
    ours = train_classifier(tiny(norm="batchnorm"), digits)
    theirs = train_classifier(tiny(norm="torch-batchnorm"), digits)
    assert ours.step_loss == pytest.approx(theirs.step_loss, rel=1e-4, abs=1e-5)
    assert ours.final["val_acc"] == pytest.approx(theirs.final["val_acc"], abs=1 / 360)


def test_last_batch_of_one_is_skipped(digits):
    # 1077 training samples with batch 2 leave one sample over each epoch
    result = train_classifier(tiny(batch_size=2, epochs=1, eval_every=1000), digits)
    assert result.status == "finished"
    assert result.steps == len(digits.train) // 2


def test_adam_trains(digits):
    result = train_classifier(tiny(optimizer="adam", lr=1e-3, epochs=3), digits)
    assert result.final["val_acc"] > 0.8


def test_cuda_without_gpu_raises(digits):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_classifier(tiny(device="cuda"), digits)
