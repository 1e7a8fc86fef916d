"""Tests of the composite path: torch.func transforms, forward-mode AD, double backward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

from normlab.nn import batchnorm as bn
from normlab.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    batch_norm,
    batch_norm_backend,
)

NUM_MODELS = 3
STACKED_CASES = [
    pytest.param(BatchNorm1d, (6, 4), id="1d-NC"),
    pytest.param(BatchNorm1d, (5, 4, 3), id="1d-NCL"),
    pytest.param(BatchNorm2d, (4, 4, 3, 3), id="2d"),
]


def make_modules(cls, num_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    modules = []
    for _ in range(NUM_MODELS):
        module = cls(num_features)
        with torch.no_grad():
            module.weight.copy_(torch.rand(num_features, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(num_features, generator=generator))
            module.running_mean.copy_(torch.randn(num_features, generator=generator))
        modules.append(module)
    return modules


def batched_input(shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((NUM_MODELS,) + shape, generator=generator)
    # Each model gets another offset, so a mix-up between runs fails the comparison.
    offsets = torch.arange(NUM_MODELS, dtype=torch.float32) * 3
    return x + offsets.view((NUM_MODELS,) + (1,) * len(shape))


@pytest.mark.parametrize(("cls", "shape"), STACKED_CASES)
def test_vmap_matches_separate_modules(cls, shape):
    modules = make_modules(cls, shape[1])
    params, buffers = stack_module_state(modules)
    template = copy.deepcopy(modules[0]).to("meta")
    x = batched_input(shape)

    def forward(params, buffers, x):
        return functional_call(template, (params, buffers), (x,))

    # Two training steps, then eval with the updated running statistics.
    outputs = []
    for training in (True, True, False):
        template.train(training)
        outputs.append(vmap(forward)(params, buffers, x))

    for k, module in enumerate(modules):
        expected = [module.train(training)(x[k]) for training in (True, True, False)]
        for step, (actual, wanted) in enumerate(zip(outputs, expected, strict=True)):
            torch.testing.assert_close(actual[k], wanted, msg=f"step {step}")
        torch.testing.assert_close(buffers["running_mean"][k], module.running_mean)
        torch.testing.assert_close(buffers["running_var"][k], module.running_var)
        assert buffers["num_batches_tracked"][k].item() == 2


@pytest.mark.parametrize(("cls", "shape"), STACKED_CASES)
def test_vmap_grad_matches_autograd(cls, shape):
    modules = make_modules(cls, shape[1])
    params, buffers = stack_module_state(modules)
    template = copy.deepcopy(modules[0]).to("meta")
    x = batched_input(shape)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def loss(params, buffers, x, target):
        output = functional_call(template, (params, buffers), (x,))
        return (output * target).square().sum()

    grads = vmap(grad(loss, argnums=(0, 2)))(params, buffers, x, target)
    param_grads, input_grads = grads

    for k, module in enumerate(modules):
        x_k = x[k].clone().requires_grad_()
        (module(x_k) * target[k]).square().sum().backward()
        torch.testing.assert_close(param_grads["weight"][k], module.weight.grad)
        torch.testing.assert_close(param_grads["bias"][k], module.bias.grad)
        torch.testing.assert_close(input_grads[k], x_k.grad)
        torch.testing.assert_close(buffers["running_mean"][k], module.running_mean)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_composite_gradgradcheck(training):
    generator = torch.Generator().manual_seed(4)
    dtype = torch.float64
    x = torch.randn(3, 2, 3, 2, generator=generator, dtype=dtype, requires_grad=True)
    weight = (torch.rand(2, generator=generator, dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(2, generator=generator, dtype=dtype, requires_grad=True)
    running_mean = torch.randn(2, generator=generator, dtype=dtype)
    running_var = torch.rand(2, generator=generator, dtype=dtype) + 0.5

    def function(x, weight, bias):
        return batch_norm(
            x, running_mean.clone(), running_var.clone(), weight, bias, training
        )

    with batch_norm_backend("composite"):
        assert torch.autograd.gradcheck(function, (x, weight, bias))
        assert torch.autograd.gradgradcheck(function, (x, weight, bias))


def test_composite_gradient_penalty_matches_torch():
    x = torch.randn(
        8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    penalties = []
    for function in (batch_norm, F.batch_norm):
        x_leaf = x.clone().requires_grad_()
        weight = torch.full((3,), 1.5, dtype=torch.float64, requires_grad=True)
        with batch_norm_backend("composite"):
            y = function(x_leaf, None, None, weight, None, True)
        (grad_input,) = torch.autograd.grad(y.pow(3).sum(), x_leaf, create_graph=True)
        grad_input.square().sum().backward()
        penalties.append((x_leaf.grad, weight.grad))
    torch.testing.assert_close(penalties[0][0], penalties[1][0])
    torch.testing.assert_close(penalties[0][1], penalties[1][1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ad_matches_torch(training):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)
    tangent = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)
    weight = torch.rand(3, generator=generator, dtype=torch.float64) + 0.5
    stats = (
        torch.randn(3, dtype=torch.float64),
        torch.rand(3, dtype=torch.float64) + 1,
    )

    # jvp rejects in-place updates of captured tensors, so training runs without
    # running statistics there. The dual_level check below updates them.
    results = []
    for function in (batch_norm, F.batch_norm):

        def apply(x, function=function):
            mean, var = (t.clone() for t in stats) if not training else (None, None)
            return function(x, mean, var, weight, None, training)

        results.append(jvp(apply, (x,), (tangent,)))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])

    running = [t.clone() for t in stats]
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        output = batch_norm(dual, *running, weight, None, training)
        _, output_tangent = torch.autograd.forward_ad.unpack_dual(output)
    torch.testing.assert_close(output_tangent, results[1][1])
    if training:
        torch.testing.assert_close(running[0], 0.9 * stats[0] + 0.1 * x.mean((0, 2)))


def test_default_path_unchanged_outside_transforms():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    assert bn.get_batch_norm_backend() in bn.BACKENDS
    y = BatchNorm2d(3)(x)
    assert "BatchNorm" in type(y.grad_fn).__name__
    with batch_norm_backend("composite"):
        y_composite = BatchNorm2d(3)(x)
        assert bn.get_batch_norm_backend() == "composite"
    assert "BatchNorm" not in type(y_composite.grad_fn).__name__
    torch.testing.assert_close(y_composite, y)


def test_invalid_backend_raises():
    with pytest.raises(
        ValueError, match=r"invalid batch_norm backend 'fast'.*composite"
    ):
        bn.set_batch_norm_backend("fast")
