"""Tests of convert_norm, which swaps the BatchNorm layers of a built model."""

import copy
import functools
import itertools

import pytest
import torch
from torch import nn

from normlab import nn as nlnn

BATCHNORM_NAMES = ["batchnorm", "torch-batchnorm", "frozen-batchnorm"]

# Class that each BatchNorm-family name builds, by dims.
CLASSES = {
    "batchnorm": {1: nlnn.BatchNorm1d, 2: nlnn.BatchNorm2d},
    "torch-batchnorm": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d},
    "frozen-batchnorm": {1: nlnn.FrozenBatchNorm1d, 2: nlnn.FrozenBatchNorm2d},
    "layernorm": {1: nlnn.LayerNorm, 2: nlnn.LayerNorm},
    "groupnorm": {1: nlnn.GroupNorm, 2: nlnn.GroupNorm},
    "instancenorm": {1: nlnn.InstanceNorm1d, 2: nlnn.InstanceNorm2d},
    "none": {1: nn.Identity, 2: nn.Identity},
    "weightnorm": {1: nn.Identity, 2: nn.Identity},
}


class SmallCNN(nn.Module):
    """Conv-norm-ReLU twice, then a nested head with a norm on (N, C) features."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nlnn.create_norm(norm, 8, dims=2),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, bias=False),
            nlnn.create_norm(norm, 16, dims=2),
            nn.ReLU(),
        )
        self.head = nn.ModuleDict(
            {
                "fc": nn.Linear(16 * 3 * 3, 12, bias=False),
                "norm": nlnn.create_norm(norm, 12, dims=1),
                "out": nn.Linear(12, 4),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        x = torch.relu(self.head["norm"](self.head["fc"](x)))
        return self.head["out"](x)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Return the three normalization slots of a SmallCNN."""
    return [model.features[1], model.features[4], model.head["norm"]]


def trained_cnn(norm: str) -> SmallCNN:
    """Return a SmallCNN in eval mode with trained weights and running statistics."""
    torch.manual_seed(0)
    model = SmallCNN(norm)
    with torch.no_grad():
        for layer in norm_layers(model):
            for name in ("weight", "bias", "running_mean"):
                getattr(layer, name).normal_()
            layer.running_var.uniform_(0.5, 2.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = model(torch.randn(8, 3, 8, 8) * 2 + 0.5).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize(
    "source, target", list(itertools.permutations(BATCHNORM_NAMES, 2))
)
def test_convert_batchnorm_family_keeps_eval_outputs(source, target):
    model = trained_cnn(source)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    sources = norm_layers(model)

    assert nlnn.convert_norm(model, target) is model

    targets = norm_layers(model)
    assert [type(layer) for layer in targets] == [
        CLASSES[target][2],
        CLASSES[target][2],
        CLASSES[target][1],
    ]
    for old, new in zip(sources, targets):
        assert new is not old
        assert not new.training
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(new, name), getattr(old, name)), name
        if "frozen-batchnorm" not in (source, target):
            assert torch.equal(new.num_batches_tracked, old.num_batches_tracked)
            assert new.num_batches_tracked > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", BATCHNORM_NAMES)
def test_convert_batchnorm_family_to_itself(target):
    model = trained_cnn(target)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    old = norm_layers(model)
    nlnn.convert_norm(model, target)
    assert all(new is not layer for new, layer in zip(norm_layers(model), old))
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("target", sorted(CLASSES))
def test_convert_builds_target_per_dims(target):
    model = SmallCNN("batchnorm")
    old_layers = norm_layers(model)
    nlnn.convert_norm(model, target)
    assert [type(layer) for layer in norm_layers(model)] == [
        CLASSES[target][2],
        CLASSES[target][2],
        CLASSES[target][1],
    ]
    for module in model.modules():
        assert all(module is not layer for layer in old_layers)


@pytest.mark.parametrize("target", ["layernorm", "groupnorm", "none", "weightnorm"])
def test_convert_model_still_trains(target):
    torch.manual_seed(0)
    model = nlnn.convert_norm(SmallCNN("batchnorm").train(), target)
    output = model(torch.randn(4, 3, 8, 8))
    assert output.shape == (4, 4)
    output.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name


def test_convert_to_instancenorm_conv_only():
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    nlnn.convert_norm(model, "instancenorm")
    assert type(model[1]) is nlnn.InstanceNorm1d
    assert type(model[3]) is nlnn.InstanceNorm2d
    assert model[1](torch.randn(2, 4, 5)).shape == (2, 4, 5)


def test_convert_passes_kwargs():
    model = SmallCNN("batchnorm")
    nlnn.convert_norm(model, "groupnorm", num_groups=4, eps=1e-3)
    for layer in norm_layers(model):
        assert layer.num_groups == 4
        assert layer.eps == 1e-3


def test_convert_default_groupnorm_groups():
    model = nlnn.convert_norm(SmallCNN("torch-batchnorm"), "groupnorm")
    # the last layer normalizes 12 (N, C) features, so it gets one group of 12
    assert [layer.num_groups for layer in norm_layers(model)] == [8, 16, 1]


def test_convert_inherits_batchnorm_hyperparameters():
    model = nn.Sequential(
        nn.BatchNorm2d(4, eps=1e-3, momentum=0.3),
        nn.BatchNorm1d(4, affine=False, track_running_stats=False),
        nlnn.BatchNorm1d(4, bias=False),
    )
    nlnn.convert_norm(model, "batchnorm")
    assert model[0].eps == 1e-3
    assert model[0].momentum == 0.3
    assert not model[1].affine
    assert not model[1].track_running_stats
    assert model[1].running_mean is None
    assert model[2].affine
    assert model[2].bias is None


def test_convert_kwargs_override_inherited():
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, momentum=0.3))
    nlnn.convert_norm(model, "batchnorm", eps=1e-4)
    assert model[0].eps == 1e-4
    assert model[0].momentum == 0.3


def test_convert_to_frozen_inherits_eps_only():
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-2, momentum=0.5))
    nlnn.convert_norm(model, "frozen-batchnorm")
    assert model[0].eps == 1e-2


def test_convert_non_affine_to_frozen_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3, affine=False))
    for _ in range(2):
        model(torch.randn(4, 3, 2, 2) + 1)
    model.eval()
    x = torch.randn(2, 3, 2, 2)
    expected = model(x)
    nlnn.convert_norm(model, "frozen-batchnorm")
    torch.testing.assert_close(model(x), expected)


def test_convert_keeps_train_and_eval_mode():
    model = SmallCNN("batchnorm").train()
    model.features[4].eval()
    nlnn.convert_norm(model, "torch-batchnorm")
    assert [layer.training for layer in norm_layers(model)] == [True, False, True]


def test_convert_keeps_dtype():
    model = SmallCNN("torch-batchnorm").double()
    for target in ("batchnorm", "groupnorm", "frozen-batchnorm"):
        nlnn.convert_norm(model, target)
        for layer in norm_layers(model):
            for tensor in list(layer.parameters()) + list(layer.buffers()):
                if tensor.is_floating_point():
                    assert tensor.dtype == torch.float64, target
        output = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
        assert output.dtype == torch.float64


def test_convert_keeps_meta_device():
    model = SmallCNN("batchnorm").to("meta")
    nlnn.convert_norm(model, "layernorm")
    for layer in norm_layers(model):
        assert layer.weight.device.type == "meta"


def test_convert_leaves_other_layers():
    model = SmallCNN("batchnorm")
    conv = model.features[0]
    linear = model.head["out"]
    nlnn.convert_norm(model, "layernorm")
    assert model.features[0] is conv
    assert model.head["out"] is linear


def test_convert_top_level_batchnorm_returns_new_layer():
    layer = nn.BatchNorm2d(4)
    converted = nlnn.convert_norm(layer, "frozen-batchnorm")
    assert type(converted) is nlnn.FrozenBatchNorm2d
    assert converted.num_features == 4


def test_convert_unknown_target_changes_nothing():
    model = SmallCNN("batchnorm")
    before = [type(layer) for layer in norm_layers(model)]
    with pytest.raises(ValueError, match="unknown normalization 'bn'") as info:
        nlnn.convert_norm(model, "bn")
    assert "groupnorm" in str(info.value)
    assert [type(layer) for layer in norm_layers(model)] == before


def test_convert_unknown_target_without_batchnorm():
    with pytest.raises(ValueError, match="unknown normalization"):
        nlnn.convert_norm(nn.Linear(3, 2), "bn")


def test_convert_accepts_callable():
    model = nlnn.convert_norm(SmallCNN("batchnorm"), lambda c: nn.GroupNorm(2, c))
    assert all(type(layer) is nn.GroupNorm for layer in norm_layers(model))


def test_convert_callable_batchnorm_copies_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model(torch.randn(8, 3, 5, 5) + 2)
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    nlnn.convert_norm(model, functools.partial(nlnn.BatchNorm2d, momentum=0.2))
    assert type(model[1]) is nlnn.BatchNorm2d
    assert model[1].momentum == 0.2
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_convert_weightnorm_does_not_wrap_layers():
    model = nlnn.convert_norm(SmallCNN("batchnorm"), "weightnorm")
    conv = model.features[0]
    assert "weight" in dict(conv.named_parameters())
    assert not hasattr(conv, "parametrizations")


def test_convert_model_copy_is_independent():
    model = trained_cnn("batchnorm")
    converted = nlnn.convert_norm(copy.deepcopy(model), "frozen-batchnorm")
    assert type(model.features[1]) is nlnn.BatchNorm2d
    assert type(converted.features[1]) is nlnn.FrozenBatchNorm2d
