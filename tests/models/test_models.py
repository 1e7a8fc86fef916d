import pytest
import torch
from torch import nn

from normlab import nn as nlnn
from normlab.models import CNN, MLP

NORMS = ["batchnorm", "torch-batchnorm", "none"]


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_shapes_and_backward(norm):
    model = MLP(64, (32, 16), 10, norm=norm)
    x = torch.randn(8, 1, 8, 8)
    out = model(x)
    assert out.shape == (8, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_eval_is_deterministic(norm):
    model = MLP(64, 32, 10, norm=norm)
    model(torch.randn(16, 64))  # one training step of running statistics
    model.eval()
    x = torch.randn(4, 64)
    assert torch.equal(model(x), model(x))
    # in eval mode a sample's output does not depend on the rest of the batch
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-6)


def test_mlp_layers_follow_tutorial_order():
    model = MLP(64, (32, 16), 10, norm="batchnorm")
    kinds = [type(m).__name__ for m in model.layers]
    assert kinds == [
        "Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"
    ]
    assert isinstance(model.layers[2], nlnn.BatchNorm1d)
    # a linear layer followed by a normalization has no bias; the output layer has one
    assert model.layers[1].bias is None
    assert model.layers[-1].bias is not None


def test_mlp_without_norm_keeps_bias():
    model = MLP(64, 32, 10, norm="none")
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Linear))
    assert not any("Norm" in type(m).__name__ for m in model.modules())


def test_mlp_rejects_wrong_input_size():
    model = MLP(64, 32, 10)
    with pytest.raises(ValueError, match="expects 64 values per sample.*784"):
        model(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden": 0}, "hidden widths"),
        ({"activation": "gelu"}, "unknown activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm": "batchnrom"}, "unknown normalization 'batchnrom'"),
    ],
)
def test_mlp_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(64, **{"hidden": 8, **kwargs})


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("channels, size", [(1, 8), (1, 28), (3, 32)])
def test_cnn_shapes_and_backward(norm, channels, size):
    model = CNN(channels, 10, size, norm=norm, channels=(8, 16), hidden=32)
    out = model(torch.randn(4, channels, size, size))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_parameter_count():
    # conv 1->64 (576) + BN (128) + conv 64->128 (73,728) + BN (256)
    # + fc 128*2*2->256 (131,072) + BN1d (512) + fc 256->10 (2,570)
    model = CNN(1, 10, 8, norm="batchnorm")
    assert sum(p.numel() for p in model.parameters()) == 208_842


def test_cnn_uses_2d_and_1d_batchnorm():
    model = CNN(3, 10, 32, norm="batchnorm")
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(nlnn.BatchNorm2d) == 2
    assert kinds.count(nlnn.BatchNorm1d) == 1


def test_cnn_rejects_wrong_input_shape():
    model = CNN(1, 10, 8)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\), got \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32))


def test_cnn_rejects_size_not_divisible_by_four():
    with pytest.raises(ValueError, match="multiple of 4, got 30"):
        CNN(1, 10, 30)
