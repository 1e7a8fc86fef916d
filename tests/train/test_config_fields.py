"""TrainConfig's architecture and data fields: validation, model layout and training."""

import pytest
import torch
from torch import nn

from normlab.data import load_classification
from normlab.nn.factory import NORMS, create_norm
from normlab.train import TrainConfig, build_model, train_classifier
from normlab.train.loop import NORM_OPTIONS, norm_kwargs

# The first three step losses of TrainConfig(dataset="digits", hidden=(32, 32),
# epochs=2, eval_every=4, norm=...), recorded with torch 2.13 on CPU before the fields
# order, dropout, dropout_position, init_scale, norm_momentum, norm_eps and train_size
# existed.
REFERENCE_LOSSES = {
    "batchnorm": [2.3861470222473145, 2.193214178085327, 1.963853120803833],
    "none": [2.3312668800354004, 2.311032295227051, 2.314497709274292],
}


@pytest.fixture(scope="module")
def digits():
    return load_classification("digits")


def tiny(**changes) -> TrainConfig:
    settings = dict(dataset="digits", hidden=(32, 32), epochs=1, eval_every=4)
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"order": "act-norm-act"}, "order must be one of norm-act, act-norm"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        (
            {"dropout_position": "middle"},
            "dropout_position must be one of before, after",
        ),
        ({"init_scale": 0.0}, "init_scale must be a positive finite number, got 0.0"),
        ({"init_scale": float("inf")}, "init_scale must be a positive finite number"),
        ({"norm_momentum": 1.5}, r"norm_momentum must be None or in \[0, 1\], got 1.5"),
        ({"norm_eps": 0.0}, "norm_eps must be a positive finite number, got 0.0"),
        ({"train_size": 1}, "train_size must be None or an integer >= 2, got 1"),
        ({"train_size": 10.5}, "train_size must be None or an integer >= 2, got 10.5"),
    ],
)
def test_new_fields_reject_invalid_values(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"order": "act-norm"},
        {"dropout": 0.5},
        {"dropout_position": "before"},
        {"norm_momentum": None},
        {"norm_eps": 1e-3},
    ],
)
def test_cnn_rejects_mlp_only_fields(changes):
    name = next(iter(changes))
    with pytest.raises(ValueError, match=f"{name}=.* applies to model 'mlp' only"):
        TrainConfig(model="cnn", **changes)


def test_cnn_accepts_init_scale_and_train_size():
    config = TrainConfig(model="cnn", init_scale=2.0, train_size=100)
    assert config.init_scale == 2.0
    assert config.train_size == 100


def test_new_fields_change_the_key():
    config = TrainConfig()
    changes = [
        {"order": "act-norm"},
        {"dropout": 0.1},
        {"dropout_position": "before"},
        {"init_scale": 2.0},
        {"norm_momentum": None},
        {"norm_eps": 1e-3},
        {"train_size": 100},
    ]
    keys = {config.key()} | {config.replace(**change).key() for change in changes}
    assert len(keys) == len(changes) + 1


def test_none_momentum_round_trips_through_dict():
    config = TrainConfig(norm_momentum=None, train_size=50)
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("norm", sorted(REFERENCE_LOSSES))
def test_default_fields_keep_reference_losses(digits, norm):
    losses = train_classifier(tiny(norm=norm, epochs=2), digits).step_loss[:3]
    assert losses == pytest.approx(REFERENCE_LOSSES[norm], rel=1e-5)


def layer_types(model) -> list[type]:
    return [type(m) for m in model.layers]


def test_default_mlp_is_linear_norm_act(digits):
    model = build_model(tiny(), digits)
    hidden_block = layer_types(model)[1:4]
    assert hidden_block[0] is nn.Linear
    assert hidden_block[2] is nn.ReLU
    assert model.layers[1].bias is None


def test_act_norm_order_keeps_linear_bias(digits):
    model = build_model(tiny(order="act-norm"), digits)
    linear, activation, norm = model.layers[1:4]
    assert isinstance(linear, nn.Linear)
    assert linear.bias is not None
    assert isinstance(activation, nn.ReLU)
    assert "BatchNorm" in type(norm).__name__


@pytest.mark.parametrize(
    "order, position, expected",
    [
        ("norm-act", "after", ["Linear", "norm", "ReLU", "Dropout"]),
        ("norm-act", "before", ["Linear", "Dropout", "norm", "ReLU"]),
        ("act-norm", "after", ["Linear", "ReLU", "norm", "Dropout"]),
        ("act-norm", "before", ["Linear", "ReLU", "Dropout", "norm"]),
    ],
)
def test_dropout_position_in_block(digits, order, position, expected):
    config = tiny(order=order, dropout=0.3, dropout_position=position)
    names = [
        "norm" if "BatchNorm" in t.__name__ else t.__name__
        for t in layer_types(build_model(config, digits))
    ]
    assert names[1:5] == expected
    assert names.count("Dropout") == 2


def test_init_scale_multiplies_weights_only(digits):
    torch.manual_seed(0)
    plain = build_model(tiny(norm="none"), digits)
    torch.manual_seed(0)
    scaled = build_model(tiny(norm="none", init_scale=3.0), digits)
    for (name, before), (_, after) in zip(
        plain.named_parameters(), scaled.named_parameters()
    ):
        factor = 3.0 if name.endswith("weight") else 1.0
        assert torch.allclose(after, before * factor), name


def test_init_scale_scales_weight_normalized_layers(digits):
    torch.manual_seed(0)
    plain = build_model(tiny(norm="weightnorm"), digits)
    torch.manual_seed(0)
    scaled = build_model(tiny(norm="weightnorm", init_scale=0.5), digits)
    assert torch.allclose(scaled.layers[1].weight, plain.layers[1].weight * 0.5)
    assert torch.allclose(scaled.layers[-1].weight, plain.layers[-1].weight * 0.5)


def test_init_scale_scales_cnn_convolutions(digits):
    torch.manual_seed(0)
    plain = build_model(TrainConfig(model="cnn"), digits)
    torch.manual_seed(0)
    scaled = build_model(TrainConfig(model="cnn", init_scale=2.0), digits)
    convs = [
        (a, b) for a, b in zip(plain.modules(), scaled.modules())
        if isinstance(a, nn.Conv2d)
    ]
    assert convs
    for before, after in convs:
        assert torch.allclose(after.weight, before.weight * 2.0)


def test_norm_momentum_and_eps_reach_batchnorm(digits):
    model = build_model(tiny(norm_momentum=None, norm_eps=1e-3), digits)
    norms = [m for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert len(norms) == 2
    for layer in norms:
        assert layer.momentum is None
        assert layer.eps == 1e-3


def test_norm_kwargs_skip_norms_without_them():
    assert norm_kwargs(TrainConfig(norm="none", norm_eps=1e-3)) == {}
    assert norm_kwargs(TrainConfig(norm="layernorm", norm_eps=1e-3)) == {"eps": 1e-3}


@pytest.mark.parametrize("name", sorted(NORM_OPTIONS))
def test_norm_options_are_accepted(name):
    assert name in NORMS
    values = {"momentum": 0.3, "eps": 1e-3}
    kwargs = {option: values[option] for option in NORM_OPTIONS[name]}
    layer = create_norm(name, 32, dims=2, **kwargs)
    for option, value in kwargs.items():
        assert getattr(layer, option) == value


def test_cumulative_momentum_changes_eval_only(digits):
    default = train_classifier(tiny(), digits)
    cumulative = train_classifier(tiny(norm_momentum=None), digits)
    # running statistics are used in eval mode only, so training is unchanged
    assert cumulative.step_loss == default.step_loss
    assert cumulative.final["val_loss"] != default.final["val_loss"]


def test_train_size_limits_steps_and_train_metrics(digits):
    result = train_classifier(tiny(train_size=100, batch_size=32, epochs=2), digits)
    # 100 samples in batches of 32: three full batches and one of 4
    assert result.steps == 2 * 4
    # the training accuracy is measured on the 100 samples, a multiple of 1/100
    assert round(result.final["train_acc"] * 100, 6).is_integer()


def test_train_size_above_split_raises(digits):
    with pytest.raises(ValueError, match="train_size 5000 exceeds the 1077 training"):
        train_classifier(tiny(train_size=5000), digits)
