"""Every model with every registered normalization, plus a callable one."""

import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from normlab import nn as nlnn
from normlab.models import CNN, EDSR, MLP, DCGANDiscriminator, DCGANGenerator, DnCNN


@dataclass(frozen=True)
class ModelCase:
    build: Callable[[object], nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    output_shape: tuple[int, ...]


# Tiny sizes. Every case runs with a batch of 2, and with non-square images where the
# model accepts them.
MODELS = {
    "mlp": ModelCase(lambda norm: MLP(48, (16, 16), 10, norm=norm), (3, 4, 4), (10,)),
    "cnn": ModelCase(
        lambda norm: CNN(3, 10, 8, norm=norm, channels=(8, 16), hidden=16),
        (3, 8, 8),
        (10,),
    ),
    "dncnn-gray": ModelCase(
        lambda norm: DnCNN(1, depth=5, features=8, norm=norm), (1, 9, 6), (1, 9, 6)
    ),
    "dncnn-color": ModelCase(
        lambda norm: DnCNN(3, depth=5, features=8, norm=norm, residual=False),
        (3, 6, 7),
        (3, 6, 7),
    ),
    "edsr-color-x2": ModelCase(
        lambda norm: EDSR(2, 3, features=8, blocks=2, norm=norm), (3, 5, 4), (3, 10, 8)
    ),
    "edsr-gray-x3": ModelCase(
        lambda norm: EDSR(3, 1, features=8, blocks=2, norm=norm), (1, 4, 3), (1, 12, 9)
    ),
    "dcgan-generator": ModelCase(
        lambda norm: DCGANGenerator(8, 3, 16, features=8, norm=norm), (8,), (3, 16, 16)
    ),
    "dcgan-discriminator": ModelCase(
        lambda norm: DCGANDiscriminator(1, 16, features=8, norm=norm), (1, 16, 16), ()
    ),
}

WEIGHTED_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)

NAMES = sorted(nlnn.NORMS)
NORMS = NAMES + [functools.partial(nn.GroupNorm, 4)]
NORM_IDS = NAMES + ["callable-groupnorm"]

# Combinations that are invalid by design, with the error their constructor raises:
# instance statistics need spatial positions, and MLP and CNN normalize (N, C) features.
INSTANCE_ERROR = "instancenorm cannot normalize them"
INVALID = {
    ("mlp", "instancenorm"): INSTANCE_ERROR,
    ("cnn", "instancenorm"): INSTANCE_ERROR,
}

VALID = [
    pytest.param(case, norm, id=f"{model}-{norm_id}")
    for model, case in MODELS.items()
    for norm, norm_id in zip(NORMS, NORM_IDS)
    if (model, norm_id) not in INVALID
]

model_cases = pytest.mark.parametrize("case", MODELS.values(), ids=MODELS.keys())
valid_combinations = pytest.mark.parametrize("case, norm", VALID)


@valid_combinations
def test_forward_shape_and_backward(case, norm):
    torch.manual_seed(0)
    model = case.build(norm).train()
    out = model(torch.randn(2, *case.input_shape))
    assert out.shape == (2, *case.output_shape)
    out.square().mean().backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@valid_combinations
def test_eval_is_deterministic(case, norm):
    torch.manual_seed(0)
    model = case.build(norm).train()
    with torch.no_grad():
        # one training-mode pass moves the running statistics away from their init
        model(torch.randn(4, *case.input_shape))
        model.eval()
        x = torch.randn(3, *case.input_shape)
        first = model(x)
        second = model(x)
        alone = model(x[:1])
    assert torch.equal(first, second)
    # in eval mode a sample's output does not depend on the rest of the batch
    torch.testing.assert_close(alone, first[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("norm", NAMES)
def test_named_norm_is_placed(model_name, norm):
    case = MODELS[model_name]
    if (model_name, norm) in INVALID:
        with pytest.raises(ValueError, match=INVALID[model_name, norm]):
            case.build(norm)
        return
    model = case.build(norm)
    expected = {type(nlnn.create_norm(norm, 8, dims=dims)) for dims in (1, 2)}
    assert any(type(m) in expected for m in model.modules())
    if norm == "weightnorm":
        layers = [m for m in model.modules() if isinstance(m, WEIGHTED_LAYERS)]
        assert any("weight" not in dict(m.named_parameters()) for m in layers)


@model_cases
def test_callable_norm_is_used(case):
    model = case.build(functools.partial(nn.GroupNorm, 4))
    groupnorms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groupnorms
    assert all(m.num_groups == 4 for m in groupnorms)



@pytest.mark.parametrize("model, norm", INVALID, ids=[f"{m}-{n}" for m, n in INVALID])
def test_invalid_combination_raises(model, norm):
    case = MODELS[model]
    with pytest.raises(ValueError, match=INVALID[model, norm]):
        case.build(norm)
