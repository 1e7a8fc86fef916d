import pytest

from normlab.train import TrainConfig


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"lr": -0.1}, "lr must be a positive finite number, got -0.1"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"epochs": 1.5}, "epochs must be a positive integer, got 1.5"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, got 'rmsprop'"),
        ({"model": "resnet"}, "model must be one of mlp, cnn"),
        ({"norm": "bn"}, "unknown normalization 'bn'"),
        ({"hidden": (10, 0)}, "hidden widths must be positive"),
    ],
)
def test_config_rejects_out_of_range(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)


def test_config_key_is_stable_and_field_sensitive():
    config = TrainConfig(lr=0.1, seed=2)
    assert config.key() == TrainConfig(lr=0.1, seed=2).key()
    assert config.key() != config.replace(seed=3).key()
    assert config.key() != config.replace(lr=0.2).key()
    assert len(config.key()) == 20


def test_config_round_trips_through_dict():
    config = TrainConfig(norm="Torch_BatchNorm", hidden=[50, 20])
    restored = TrainConfig.from_dict(config.to_dict())
    assert restored == config
    assert restored.norm == "torch-batchnorm"
    assert restored.hidden == (50, 20)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown TrainConfig fields: colour"):
        TrainConfig.from_dict({"colour": "red"})
