import functools

import pytest
import torch
from torch import nn

from normlab import nn as nlnn


@pytest.mark.parametrize(
    "dims, ours, theirs",
    [
        (1, nlnn.BatchNorm1d, nn.BatchNorm1d),
        (2, nlnn.BatchNorm2d, nn.BatchNorm2d),
        (3, nlnn.BatchNorm3d, nn.BatchNorm3d),
    ],
)
def test_create_norm_builds_batchnorms(dims, ours, theirs):
    assert type(nlnn.create_norm("batchnorm", 8, dims=dims)) is ours
    assert type(nlnn.create_norm("torch-batchnorm", 8, dims=dims)) is theirs


def test_create_norm_none_is_identity():
    layer = nlnn.create_norm("none", 8)
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(layer(x), x)


def test_create_norm_passes_kwargs():
    layer = nlnn.create_norm("batchnorm", 4, dims=1, momentum=0.3, eps=1e-3)
    assert layer.momentum == 0.3
    assert layer.eps == 1e-3


def test_create_norm_normalizes_names():
    assert type(nlnn.create_norm(" Torch_BatchNorm ", 4)) is nn.BatchNorm2d


def test_create_norm_accepts_callable():
    layer = nlnn.create_norm(functools.partial(nn.GroupNorm, 2), 4)
    assert isinstance(layer, nn.GroupNorm)
    assert layer.num_channels == 4


def test_create_norm_unknown_name_lists_names():
    with pytest.raises(ValueError) as info:
        nlnn.create_norm("bn", 4)
    message = str(info.value)
    assert "unknown normalization 'bn'" in message
    for name in ("batchnorm", "torch-batchnorm", "none"):
        assert name in message


def test_create_norm_rejects_bad_dims():
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3, got 4"):
        nlnn.create_norm("batchnorm", 4, dims=4)


def test_register_norm_rejects_duplicate():
    with pytest.raises(ValueError, match="already registered"):
        nlnn.register_norm("none")(lambda num_features, dims: nn.Identity())
