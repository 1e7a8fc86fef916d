"""Tests of the registered normalizations: every name, and each layer against torch."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from normlab import nn as nlnn
from normlab.nn import factory

# Input shapes per dims: (N, C) and (N, C, L) for dims 1, images, volumes.
SHAPES = [(1, (4, 6)), (1, (4, 6, 5)), (2, (4, 6, 5, 3)), (3, (2, 6, 3, 4, 2))]
SHAPE_IDS = ["1d-features", "1d-sequence", "2d", "3d"]

# (name, input rank) pairs that raise ValueError in forward by design.
INVALID_INPUT = {("instancenorm", 2)}

TORCH_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
OUR_INSTANCE = {1: nlnn.InstanceNorm1d, 2: nlnn.InstanceNorm2d, 3: nlnn.InstanceNorm3d}
OUR_FROZEN = {
    1: nlnn.FrozenBatchNorm1d,
    2: nlnn.FrozenBatchNorm2d,
    3: nlnn.FrozenBatchNorm3d,
}


def randomize_(module: nn.Module) -> nn.Module:
    """Fill every floating-point parameter and buffer with random values (var > 0)."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(
            module.named_buffers()
        ):
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            else:
                tensor.normal_()
    return module


def forward_backward(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor):
    """Return the output, the input gradient and the parameter gradients by name."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad()
    output = module(x)
    output.backward(grad_output)
    grads = {name: p.grad for name, p in module.named_parameters()}
    return output, x.grad, grads


def assert_same_function(ours, theirs, x, **tolerance):
    """Check outputs and input and parameter gradients of ours against theirs."""
    grad_output = torch.randn_like(x)
    out_ours, dx_ours, grads_ours = forward_backward(ours, x, grad_output)
    out_theirs, dx_theirs, grads_theirs = forward_backward(theirs, x, grad_output)
    torch.testing.assert_close(out_ours, out_theirs, **tolerance)
    torch.testing.assert_close(dx_ours, dx_theirs, **tolerance)
    assert grads_ours.keys() == grads_theirs.keys()
    for name in grads_ours:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name], **tolerance)


def copy_into(ours: nn.Module, theirs: nn.Module) -> None:
    """Load the state_dict of theirs into ours (the keys must match)."""
    ours.load_state_dict(theirs.state_dict())


# Every registered name ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(nlnn.NORMS))
@pytest.mark.parametrize("dims, shape", SHAPES, ids=SHAPE_IDS)
def test_registered_norm_forward_backward(name, dims, shape):
    torch.manual_seed(0)
    layer = nlnn.create_norm(name, shape[1], dims=dims)
    x = torch.randn(shape, requires_grad=True)
    if (name, len(shape)) in INVALID_INPUT:
        with pytest.raises(ValueError):
            layer(x)
        return
    output = layer(x)
    assert output.shape == x.shape
    assert output.dtype == x.dtype
    output.square().sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    for param_name, param in layer.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", sorted(nlnn.NORMS))
@pytest.mark.parametrize("dims, shape", SHAPES, ids=SHAPE_IDS)
def test_registered_norm_eval_is_per_sample(name, dims, shape):
    torch.manual_seed(0)
    layer = randomize_(nlnn.create_norm(name, shape[1], dims=dims)).eval()
    x = torch.randn(shape)
    if (name, len(shape)) in INVALID_INPUT:
        with pytest.raises(ValueError):
            layer(x)
        return
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
        alone = layer(x[:1])
    assert torch.equal(first, second)
    # In eval mode no normalization mixes samples of a batch.
    torch.testing.assert_close(alone, first[:1])


@pytest.mark.parametrize("name", sorted(nlnn.NORMS))
def test_registered_norm_eval_keeps_state(name):
    torch.manual_seed(0)
    layer = randomize_(nlnn.create_norm(name, 6, dims=2)).eval()
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    with torch.no_grad():
        layer(torch.randn(4, 6, 3, 3))
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("name", sorted(nlnn.NORMS))
def test_registered_norm_float64(name):
    layer = nlnn.create_norm(name, 6, dims=2).to(torch.float64)
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    assert layer(x).dtype == torch.float64


@pytest.mark.parametrize("name", sorted(nlnn.NORMS))
def test_registered_norm_rejects_bad_dims(name):
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3, got 0"):
        nlnn.create_norm(name, 6, dims=0)


@pytest.mark.parametrize("name", sorted(nlnn.NORMS))
def test_registered_norm_state_dict_round_trip(name):
    torch.manual_seed(0)
    source = randomize_(nlnn.create_norm(name, 6, dims=2)).eval()
    target = nlnn.create_norm(name, 6, dims=2).eval()
    target.load_state_dict(source.state_dict())
    x = torch.randn(4, 6, 3, 3)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize(
    "name", sorted(set(nlnn.NORMS) - {"none", "weightnorm"})
)
def test_registered_norm_rejects_wrong_channels(name):
    layer = nlnn.create_norm(name, 6, dims=2)
    # torch's own BatchNorm raises RuntimeError, the layers of normlab ValueError.
    error = RuntimeError if name == "torch-batchnorm" else ValueError
    with pytest.raises(error, match="6"):
        layer(torch.randn(4, 5, 3, 3))


# Factory entries --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, dims, expected",
    [
        ("frozen-batchnorm", 1, nlnn.FrozenBatchNorm1d),
        ("frozen-batchnorm", 2, nlnn.FrozenBatchNorm2d),
        ("frozen-batchnorm", 3, nlnn.FrozenBatchNorm3d),
        ("layernorm", 1, nlnn.LayerNorm),
        ("layernorm", 2, nlnn.LayerNorm),
        ("layernorm", 3, nlnn.LayerNorm),
        ("groupnorm", 1, nlnn.GroupNorm),
        ("groupnorm", 2, nlnn.GroupNorm),
        ("groupnorm", 3, nlnn.GroupNorm),
        ("instancenorm", 1, nlnn.InstanceNorm1d),
        ("instancenorm", 2, nlnn.InstanceNorm2d),
        ("instancenorm", 3, nlnn.InstanceNorm3d),
        ("weightnorm", 1, nn.Identity),
        ("weightnorm", 2, nn.Identity),
        ("weightnorm", 3, nn.Identity),
    ],
)
def test_create_norm_builds_class(name, dims, expected):
    assert type(nlnn.create_norm(name, 8, dims=dims)) is expected


def test_create_norm_passes_kwargs_to_new_norms():
    groupnorm = nlnn.create_norm("groupnorm", 64, num_groups=8, eps=1e-3)
    assert groupnorm.num_groups == 8
    assert groupnorm.eps == 1e-3
    layernorm = nlnn.create_norm("layernorm", 8, dims=1, affine=False)
    assert list(layernorm.parameters()) == []
    frozen = nlnn.create_norm("frozen-batchnorm", 8, eps=1e-3)
    assert frozen.eps == 1e-3
    instance = nlnn.create_norm("instancenorm", 8, dims=3, bias=False)
    assert instance.bias is None
    assert instance.weight.shape == (8,)


def test_create_norm_name_spellings():
    assert type(nlnn.create_norm("GroupNorm", 8)) is nlnn.GroupNorm
    assert type(nlnn.create_norm("FROZEN_BATCHNORM", 8)) is nlnn.FrozenBatchNorm2d


def test_uses_bias_for_new_norms():
    assert factory.uses_bias("weightnorm")
    # frozen-batchnorm drops the bias like batchnorm, so checkpoints load both ways
    for name in ("frozen-batchnorm", "layernorm", "groupnorm", "instancenorm"):
        assert not factory.uses_bias(name), name


@pytest.mark.parametrize("features, groups", [(20, 1), (32, 2), (64, 4), (100, 5), (256, 16)])
def test_groupnorm_on_features_keeps_groups_large(features, groups):
    layer = nlnn.create_norm("groupnorm", features, dims=1)
    assert layer.num_groups == groups
    x = torch.randn(8, features, requires_grad=True)
    layer(x).square().mul(torch.randn(8, features)).sum().backward()
    # a group of one feature would make every output equal to the bias
    assert x.grad.abs().sum() > 0
    assert not torch.allclose(layer(x)[0], layer(x)[1])


def test_weightnorm_slot_is_identity():
    layer = nlnn.create_norm("weightnorm", 8, dims=2)
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(layer(x), x)


# LayerNorm ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layernorm_features_matches_torch_layernorm(dtype):
    torch.manual_seed(0)
    ours = nlnn.LayerNorm(10, dtype=dtype)
    theirs = randomize_(nn.LayerNorm(10, dtype=dtype))
    copy_into(ours, theirs)
    x = torch.randn(7, 10, dtype=dtype) * 3 + 2
    assert_same_function(ours, theirs, x)


@pytest.mark.parametrize("dims, shape", SHAPES[1:], ids=SHAPE_IDS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layernorm_conv_matches_torch_groupnorm(dims, shape, dtype):
    torch.manual_seed(0)
    ours = nlnn.create_norm("layernorm", shape[1], dims=dims).to(dtype)
    theirs = randomize_(nn.GroupNorm(1, shape[1], dtype=dtype))
    copy_into(ours, theirs)
    x = torch.randn(shape, dtype=dtype) * 3 + 2
    assert_same_function(ours, theirs, x)


def test_layernorm_normalizes_each_sample():
    x = torch.randn(3, 4, 5, 5) * 4 + 7
    with torch.no_grad():
        y = nlnn.LayerNorm(4, eps=0.0)(x)
    var, mean = torch.var_mean(y.flatten(1), dim=1, correction=0)
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(3), atol=1e-5, rtol=0)


def test_layernorm_accepts_any_spatial_size():
    layer = nlnn.LayerNorm(4)
    assert layer(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)
    assert layer(torch.randn(2, 4, 9, 5)).shape == (2, 4, 9, 5)


# GroupNorm ------------------------------------------------------------------------


@pytest.mark.parametrize("dims, shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("num_groups", [1, 2, 3, 6])
def test_groupnorm_matches_torch(dims, shape, num_groups):
    torch.manual_seed(0)
    ours = nlnn.create_norm(
        "groupnorm", shape[1], dims=dims, num_groups=num_groups
    ).double()
    theirs = randomize_(nn.GroupNorm(num_groups, shape[1], dtype=torch.float64))
    copy_into(ours, theirs)
    x = torch.randn(shape, dtype=torch.float64) * 2 - 1
    assert_same_function(ours, theirs, x)


@pytest.mark.parametrize("dims, shape", SHAPES, ids=SHAPE_IDS)
def test_groupnorm_float32_matches_torch(dims, shape):
    torch.manual_seed(0)
    ours = nlnn.create_norm("groupnorm", shape[1], dims=dims, num_groups=3)
    theirs = randomize_(nn.GroupNorm(3, shape[1]))
    copy_into(ours, theirs)
    # Groups of 2 values in (N, C) input can have a variance near eps, which
    # amplifies float32 rounding, hence the looser tolerance.
    x = torch.randn(shape) * 5 + 3
    assert_same_function(ours, theirs, x, atol=1e-4, rtol=1e-4)


def test_groupnorm_default_groups_matches_torch():
    torch.manual_seed(0)
    ours = nlnn.GroupNorm(64)
    theirs = randomize_(nn.GroupNorm(32, 64))
    copy_into(ours, theirs)
    assert ours.num_groups == 32
    assert_same_function(ours, theirs, torch.randn(2, 64, 3, 3))


@pytest.mark.parametrize(
    "num_channels, expected",
    [
        (1, 1),
        (3, 3),
        (8, 8),
        (32, 32),
        (48, 24),
        (64, 32),
        (96, 32),
        (97, 1),
        (100, 25),
    ],
)
def test_default_num_groups_table(num_channels, expected):
    assert nlnn.default_num_groups(num_channels) == expected
    assert nlnn.GroupNorm(num_channels).num_groups == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=4096))
def test_default_num_groups_is_largest_divisor(num_channels):
    num_groups = nlnn.default_num_groups(num_channels)
    assert num_channels % num_groups == 0
    assert num_groups <= 32
    larger = range(num_groups + 1, 33)
    assert all(num_channels % candidate for candidate in larger)


def test_default_num_groups_rejects_zero():
    expected = "num_channels must be a positive integer, got 0"
    with pytest.raises(ValueError, match=expected):
        nlnn.default_num_groups(0)


@pytest.mark.parametrize("num_groups", [5, 0, -2, 12])
def test_groupnorm_rejects_non_divisor(num_groups):
    expected = f"num_channels=6, got num_groups={num_groups}"
    with pytest.raises(ValueError, match=expected):
        nlnn.GroupNorm(6, num_groups=num_groups)


def test_groupnorm_torch_argument_order_raises():
    # torch's order is (num_groups, num_channels): (2, 8) reads as 8 groups of 2.
    with pytest.raises(ValueError, match="num_channels=2, got num_groups=8"):
        nlnn.GroupNorm(2, 8)


def test_groupnorm_empty_batch():
    layer = nlnn.GroupNorm(6, num_groups=3)
    output = layer(torch.randn(0, 6, 4, 4))
    assert output.shape == (0, 6, 4, 4)


def test_groupnorm_repr_names_groups():
    expected = "GroupNorm(48, num_groups=24, eps=1e-05, affine=True)"
    assert repr(nlnn.GroupNorm(48)) == expected


def test_groupnorm_channels_last_matches_contiguous():
    torch.manual_seed(0)
    layer = randomize_(nlnn.GroupNorm(8, num_groups=4))
    x = torch.randn(2, 8, 5, 5)
    expected = layer(x)
    actual = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected)


# group_norm ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_half_input(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 4, 4)
    weight = torch.randn(8)
    bias = torch.randn(8)
    expected = nn.functional.group_norm(x, 4, weight, bias)
    actual = nlnn.group_norm(x.to(dtype), 4, weight, bias)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, atol=2e-2, rtol=2e-2)


def test_group_norm_large_offset_is_stable():
    # Values near 1e4 with unit spread. With torch 2.13 on CPU, over 5 random draws,
    # the one-pass E[x^2] - E[x]^2 in float32 was off by about 1e3 and torch's
    # group_norm by up to 2e-3.
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8) + 1e4
    expected = nn.functional.group_norm(x.double(), 2)
    actual = nlnn.group_norm(x, 2)
    torch.testing.assert_close(actual.double(), expected, atol=1e-3, rtol=0)


def test_group_norm_rejects_integer_input():
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        nlnn.group_norm(torch.ones(2, 4, dtype=torch.long), 2)


def test_group_norm_rejects_1d_input():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        nlnn.group_norm(torch.randn(4), 2)


def test_group_norm_rejects_wrong_weight_size():
    with pytest.raises(ValueError, match="weight should contain 4 elements"):
        nlnn.group_norm(torch.randn(2, 4, 3), 2, weight=torch.ones(3))


# InstanceNorm -------------------------------------------------------------------------


@pytest.mark.parametrize("dims, shape", SHAPES[1:], ids=SHAPE_IDS[1:])
@pytest.mark.parametrize("training", [True, False])
def test_instancenorm_matches_torch(dims, shape, training):
    torch.manual_seed(0)
    ours = nlnn.create_norm("instancenorm", shape[1], dims=dims).double()
    theirs = TORCH_INSTANCE[dims](shape[1], affine=True, dtype=torch.float64)
    randomize_(theirs)
    copy_into(ours, theirs)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(shape, dtype=torch.float64) * 3 - 1
    assert_same_function(ours, theirs, x)


@pytest.mark.parametrize("dims, shape", SHAPES[1:], ids=SHAPE_IDS[1:])
def test_instancenorm_float32_matches_torch(dims, shape):
    torch.manual_seed(0)
    ours = nlnn.create_norm("instancenorm", shape[1], dims=dims)
    theirs = randomize_(TORCH_INSTANCE[dims](shape[1], affine=True))
    copy_into(ours, theirs)
    assert_same_function(ours, theirs, torch.randn(shape))


def test_instancenorm_affine_by_default():
    layer = nlnn.InstanceNorm2d(5)
    assert layer.affine
    assert layer.weight.shape == (5,)
    assert layer.bias.shape == (5,)
    assert list(layer.buffers()) == []


def test_instancenorm_without_affine_matches_torch_default():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 4)
    expected = nn.InstanceNorm2d(5)(x)
    torch.testing.assert_close(nlnn.InstanceNorm2d(5, affine=False)(x), expected)


def test_instancenorm1d_rejects_features():
    layer = nlnn.create_norm("instancenorm", 6, dims=1)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(4, 6))
    message = str(info.value)
    assert "InstanceNorm1d expected 3D input (N, C, L)" in message
    assert "got 2D input of size (4, 6)" in message
    assert "layernorm" in message


@pytest.mark.parametrize(
    "dims, bad_shape",
    [(1, (2, 6, 3, 3)), (2, (2, 6, 3)), (2, (2, 6, 2, 2, 2)), (3, (2, 6, 3, 3))],
)
def test_instancenorm_rejects_wrong_rank(dims, bad_shape):
    layer = OUR_INSTANCE[dims](6)
    with pytest.raises(ValueError, match=f"expected {dims + 2}D input"):
        layer(torch.randn(bad_shape))


def test_instancenorm_single_position_raises_in_training():
    layer = nlnn.InstanceNorm2d(3)
    x = torch.randn(2, 3, 1, 1)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        layer(x)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        nn.InstanceNorm2d(3)(x)
    layer.eval()
    # A single value per channel normalizes to 0, leaving the bias.
    expected = layer.bias.detach().view(1, 3, 1, 1).expand(2, 3, 1, 1)
    assert torch.equal(layer(x), expected)


# FrozenBatchNorm ----------------------------------------------------------------------


def trained_batchnorm(cls, num_features, shape):
    """Return a BatchNorm of class cls with random affine and trained statistics."""
    torch.manual_seed(0)
    layer = cls(num_features)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        for _ in range(3):
            layer(torch.randn(shape) * 2 + 1)
    return layer.eval()


@pytest.mark.parametrize("dims, shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("source", ["batchnorm", "torch-batchnorm"])
def test_frozen_batchnorm_equals_batchnorm_eval(dims, shape, source):
    bn_class = type(nlnn.create_norm(source, shape[1], dims=dims))
    batchnorm = trained_batchnorm(bn_class, shape[1], shape)
    frozen = OUR_FROZEN[dims](shape[1])
    frozen.load_state_dict(batchnorm.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        expected = batchnorm(x)
    for training in (True, False):
        frozen.train(training)
        with torch.no_grad():
            torch.testing.assert_close(frozen(x), expected, rtol=1e-6, atol=1e-6)


def test_frozen_batchnorm_formula():
    frozen = randomize_(nlnn.FrozenBatchNorm2d(3, eps=1e-3)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    view = (1, 3, 1, 1)
    expected = (x - frozen.running_mean.view(view)) / torch.sqrt(
        frozen.running_var.view(view) + 1e-3
    ) * frozen.weight.view(view) + frozen.bias.view(view)
    torch.testing.assert_close(frozen(x), expected)


def test_frozen_batchnorm_has_only_buffers():
    frozen = nlnn.FrozenBatchNorm2d(4)
    assert list(frozen.parameters()) == []
    assert sorted(dict(frozen.named_buffers())) == [
        "bias",
        "running_mean",
        "running_var",
        "weight",
    ]
    assert torch.equal(frozen.weight, torch.ones(4))
    assert torch.equal(frozen.bias, torch.zeros(4))
    assert torch.equal(frozen.running_mean, torch.zeros(4))
    assert torch.equal(frozen.running_var, torch.ones(4))


def test_frozen_batchnorm_grads_reach_input_only():
    frozen = randomize_(nlnn.FrozenBatchNorm1d(5, eps=0.0))
    x = torch.randn(3, 5, requires_grad=True)
    frozen(x).sum().backward()
    expected = frozen.weight / frozen.running_var.sqrt()
    torch.testing.assert_close(x.grad, expected.expand(3, 5))
    assert not frozen.weight.requires_grad


def test_frozen_batchnorm_train_step_changes_nothing():
    frozen = randomize_(nlnn.FrozenBatchNorm2d(3)).train()
    before = {key: value.clone() for key, value in frozen.state_dict().items()}
    frozen(torch.randn(4, 3, 2, 2))
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_frozen_batchnorm_load_requires_statistics():
    frozen = nlnn.FrozenBatchNorm2d(3)
    state = nn.BatchNorm2d(3, affine=False).state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        frozen.load_state_dict(state)


@pytest.mark.parametrize(
    "cls, bad_shape",
    [
        (nlnn.FrozenBatchNorm1d, (2, 3, 4, 4)),
        (nlnn.FrozenBatchNorm2d, (2, 3, 4)),
        (nlnn.FrozenBatchNorm3d, (2, 3, 4, 4)),
    ],
)
def test_frozen_batchnorm_rejects_wrong_rank(cls, bad_shape):
    with pytest.raises(ValueError, match=f"got {len(bad_shape)}D input"):
        cls(3)(torch.randn(bad_shape))


def test_frozen_batchnorm_rejects_bad_arguments():
    expected = "num_features must be a positive integer, got 0"
    with pytest.raises(ValueError, match=expected):
        nlnn.FrozenBatchNorm2d(0)
    with pytest.raises(ValueError, match="eps must be non-negative, got -1"):
        nlnn.FrozenBatchNorm2d(3, eps=-1)


def test_frozen_batchnorm_half_input_keeps_dtype():
    frozen = randomize_(nlnn.FrozenBatchNorm2d(3))
    x = torch.randn(2, 3, 4, 4)
    output = frozen(x.to(torch.bfloat16))
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), frozen(x), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: nlnn.LayerNorm(0), "num_features"),
        (lambda: nlnn.InstanceNorm2d(0), "num_features"),
        (lambda: nlnn.GroupNorm(0), "num_channels"),
        (lambda: nlnn.GroupNorm(0, num_groups=1), "num_channels"),
    ],
)
def test_per_sample_norm_rejects_zero_channels(build, argument):
    expected = f"{argument} must be a positive integer, got 0"
    with pytest.raises(ValueError, match=expected):
        build()
