"""Tests of normlab.nn.batchnorm against torch and against values worked by hand."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from normlab.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _BatchNorm,
    batch_norm,
    batch_norm_backend,
)

# Every path must conform: the pure-PyTorch reference, the C++ kernels and the composite
# path of differentiable torch operations. The C++ kernels take float32 and float64 input,
# so other dtypes run the reference path under "cpp" too.
PATHS = ["reference", "cpp", "composite"]

TORCH_CLASSES = {
    BatchNorm1d: torch.nn.BatchNorm1d,
    BatchNorm2d: torch.nn.BatchNorm2d,
    BatchNorm3d: torch.nn.BatchNorm3d,
}
CLASS_FOR_RANK = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}

# Elementwise tolerances per dtype. The float16 and bfloat16 rtol values are the
# defaults of torch.testing.assert_close, about one (float16) and two (bfloat16) units
# in the last place. Their atol is about the dtype's spacing near 1, the scale of the
# normalized outputs.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}


@pytest.fixture(params=PATHS)
def path(request):
    """Run the test with each batch_norm backend selected."""
    with batch_norm_backend(request.param):
        yield request.param


def reduction_dims(x: torch.Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def per_channel(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.view((1, -1) + (1,) * (x.dim() - 2))


def normalized_reference(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Return (x - mean) / sqrt(var + eps) in float64 with biased batch statistics."""
    x64 = x.double()
    var, mean = torch.var_mean(x64, dim=reduction_dims(x), correction=0)
    return (x64 - per_channel(mean, x)) / per_channel(torch.sqrt(var + eps), x)


def assert_close(actual, expected, dtype, extra_atol=0.0):
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual,
        expected,
        rtol=tolerance["rtol"],
        atol=tolerance["atol"] + extra_atol,
    )


def assert_channel_sum_close(actual, expected, terms, dtype):
    """Compare per-channel sums such as dweight, allowing for float rounding.

    A sum of M terms computed in floating point carries an error proportional to the
    sum of the absolute terms, which can far exceed the result when terms cancel.
    """
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    magnitude = float(terms.abs().sum(dim=reduction_dims(terms)).max())
    extra_atol = 4 * torch.finfo(compute_dtype).eps * magnitude
    assert_close(actual, expected, dtype, extra_atol)


def make_pair(cls, num_features, param_dtype=None, seed=0, **kwargs):
    """Build a normlab module and the torch module with the same random state."""
    reference = TORCH_CLASSES[cls](num_features, dtype=param_dtype, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if reference.weight is not None:
            weight = torch.rand(num_features, generator=generator) + 0.5
            reference.weight.copy_(weight)
        if reference.bias is not None:
            reference.bias.copy_(torch.randn(num_features, generator=generator))
    module = cls(num_features, dtype=param_dtype, **kwargs)
    module.load_state_dict(reference.state_dict())
    return module, reference


def random_input(shape, dtype, generator, memory_format=None):
    # Channels get different means and spreads so a per-channel mistake shows.
    channels = shape[1]
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    spread = torch.rand(channels, generator=generator, dtype=torch.float64) * 2 + 0.5
    offset = torch.randn(channels, generator=generator, dtype=torch.float64) * 3
    x = x * per_channel(spread, x) + per_channel(offset, x)
    x = x.to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x


def run_step(module, reference, x, grad_output):
    """Run forward and backward on both modules and compare every result."""
    dtype = x.dtype
    module.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    x_ours = x.detach().clone().requires_grad_()
    x_torch = x.detach().clone().requires_grad_()
    y_ours = module(x_ours)
    y_torch = reference(x_torch)
    y_ours.backward(grad_output)
    y_torch.backward(grad_output)

    assert y_ours.dtype == y_torch.dtype
    assert y_ours.shape == y_torch.shape
    assert_close(y_ours, y_torch, dtype)
    assert_close(x_ours.grad, x_torch.grad, dtype)

    param_dtype = dtype if reference.weight is None else reference.weight.dtype
    if reference.weight is not None:
        use_batch_stats = reference.training or reference.running_mean is None
        eps = reference.eps
        if use_batch_stats:
            terms = grad_output.double() * normalized_reference(x, eps)
        else:
            mean = per_channel(reference.running_mean.double(), x)
            std = per_channel(torch.sqrt(reference.running_var.double() + eps), x)
            terms = grad_output.double() * (x.double() - mean) / std
        assert module.weight.grad.dtype == reference.weight.grad.dtype
        assert_channel_sum_close(
            module.weight.grad, reference.weight.grad, terms, param_dtype
        )
    if reference.bias is not None:
        assert module.bias.grad.dtype == reference.bias.grad.dtype
        assert_channel_sum_close(
            module.bias.grad, reference.bias.grad, grad_output.double(), param_dtype
        )
    if reference.running_mean is not None:
        stats_dtype = reference.running_mean.dtype
        assert module.running_mean.dtype == stats_dtype
        assert_close(module.running_mean, reference.running_mean, stats_dtype)
        assert_close(module.running_var, reference.running_var, stats_dtype)
        assert module.num_batches_tracked.item() == reference.num_batches_tracked.item()
    return y_ours, x_ours.grad


@dataclasses.dataclass
class Case:
    cls: type
    shape: tuple[int, ...]
    kwargs: dict = dataclasses.field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype | None = None
    memory_format: torch.memory_format | None = None
    train_steps: int = 3
    eval_steps: int = 1
    transpose_input: bool = False


CL = torch.channels_last
CL3D = torch.channels_last_3d
F16 = torch.float16
BF16 = torch.bfloat16
F64 = torch.float64

CASES = [
    pytest.param(Case(BatchNorm1d, (8, 5)), id="1d-NC"),
    pytest.param(Case(BatchNorm1d, (6, 5, 7)), id="1d-NCL"),
    pytest.param(Case(BatchNorm2d, (4, 5, 6, 7)), id="2d-NCHW"),
    pytest.param(Case(BatchNorm3d, (3, 4, 3, 4, 5)), id="3d-NCDHW"),
    pytest.param(Case(BatchNorm1d, (2, 3)), id="1d-batch-of-2"),
    pytest.param(Case(BatchNorm2d, (2, 3, 1, 1)), id="2d-two-values-per-channel"),
    pytest.param(Case(BatchNorm2d, (4, 5, 6, 7), train_steps=0), id="2d-eval-first"),
    pytest.param(Case(BatchNorm1d, (8, 5), train_steps=0), id="1d-eval-first"),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), {"momentum": None}), id="2d-momentum-none"
    ),
    pytest.param(Case(BatchNorm1d, (8, 5), {"momentum": None}), id="1d-momentum-none"),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 3, 3), {"momentum": 0.7}), id="2d-momentum-0.7"
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), {"track_running_stats": False}),
        id="2d-no-running-stats",
    ),
    pytest.param(
        Case(BatchNorm1d, (6, 5, 7), {"track_running_stats": False}),
        id="1d-no-running-stats",
    ),
    pytest.param(
        Case(BatchNorm3d, (3, 4, 3, 4, 5), {"track_running_stats": False}),
        id="3d-no-running-stats",
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), {"affine": False}), id="2d-affine-false"
    ),
    pytest.param(
        Case(BatchNorm1d, (8, 5), {"affine": False, "track_running_stats": False}),
        id="1d-affine-false-no-running-stats",
    ),
    pytest.param(Case(BatchNorm2d, (4, 5, 6, 7), {"bias": False}), id="2d-bias-false"),
    pytest.param(Case(BatchNorm2d, (4, 5, 6, 7), {"eps": 1e-3}), id="2d-eps-1e-3"),
    pytest.param(Case(BatchNorm2d, (4, 5, 6, 7), {"eps": 0.5}), id="2d-eps-0.5"),
    pytest.param(Case(BatchNorm1d, (8, 5), {"eps": 1e-8}), id="1d-eps-1e-8"),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), memory_format=CL), id="2d-channels-last"
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), memory_format=CL, train_steps=0),
        id="2d-channels-last-eval-first",
    ),
    pytest.param(
        Case(
            BatchNorm2d, (4, 5, 6, 7), {"track_running_stats": False}, memory_format=CL
        ),
        id="2d-channels-last-no-running-stats",
    ),
    pytest.param(
        Case(BatchNorm3d, (3, 4, 3, 4, 5), memory_format=CL3D), id="3d-channels-last-3d"
    ),
    pytest.param(
        Case(BatchNorm1d, (6, 5, 7), transpose_input=True), id="1d-NCL-non-contiguous"
    ),
    pytest.param(
        Case(BatchNorm1d, (8, 5), dtype=F64, param_dtype=F64), id="1d-NC-float64"
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), dtype=F64, param_dtype=F64), id="2d-float64"
    ),
    pytest.param(
        Case(BatchNorm3d, (3, 4, 3, 4, 5), dtype=F64, param_dtype=F64), id="3d-float64"
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), {"momentum": None}, dtype=F64, param_dtype=F64),
        id="2d-float64-momentum-none",
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), dtype=F64, param_dtype=F64, memory_format=CL),
        id="2d-float64-channels-last",
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), dtype=F16, param_dtype=F16), id="2d-float16"
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), dtype=BF16, param_dtype=BF16), id="2d-bfloat16"
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), dtype=F16), id="2d-float16-input-float32-params"
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), dtype=BF16),
        id="2d-bfloat16-input-float32-params",
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), dtype=F16, memory_format=CL),
        id="2d-float16-input-channels-last",
    ),
    pytest.param(
        Case(BatchNorm1d, (8, 5), dtype=F16, param_dtype=F16), id="1d-NC-float16"
    ),
    pytest.param(
        Case(BatchNorm2d, (4, 5, 6, 7), {"affine": False}, dtype=F16, param_dtype=F16),
        id="2d-float16-affine-false",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_torch(case, path):
    module, reference = make_pair(
        case.cls, case.shape[1], param_dtype=case.param_dtype, **case.kwargs
    )
    generator = torch.Generator().manual_seed(1)
    modes = [True] * case.train_steps + [False] * case.eval_steps
    for training in modes:
        module.train(training)
        reference.train(training)
        if case.transpose_input:
            # A (N, C, L) view of an (L, C, N) tensor: strided, neither layout.
            transposed = (case.shape[2], case.shape[1], case.shape[0])
            x = random_input(transposed, case.dtype, generator).transpose(0, 2)
        else:
            x = random_input(case.shape, case.dtype, generator, case.memory_format)
        grad_output = torch.randn(case.shape, generator=generator).to(case.dtype)
        y, grad_input = run_step(module, reference, x, grad_output)
        if case.memory_format is not None:
            assert y.is_contiguous(memory_format=case.memory_format)
            assert grad_input.is_contiguous(memory_format=case.memory_format)


def test_float16_input_float32_params_dtypes(path):
    # torch 2.13 on CPU keeps float32 parameters and running statistics for half
    # input and returns half output and half input gradients.
    module = BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2).half().requires_grad_()
    y = module(x)
    y.sum().backward()
    assert y.dtype == torch.float16
    assert x.grad.dtype == torch.float16
    assert module.weight.grad.dtype == torch.float32
    assert module.bias.grad.dtype == torch.float32
    assert module.running_mean.dtype == torch.float32
    assert module.running_var.dtype == torch.float32


def test_float16_statistics_accumulate_in_float32(path):
    # 65536 values near 100 sum to about 6.6e6, past the float16 maximum of 65504.
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(64, 2, 32, 32, generator=generator) + 100).half()
    module = BatchNorm2d(2, dtype=torch.float16, momentum=1.0)
    y = module(x)
    values = x.double().transpose(0, 1).reshape(2, -1)
    expected_mean = values.mean(dim=1)
    expected_var = values.var(dim=1, correction=1)
    assert torch.isfinite(y).all()
    assert_close(module.running_mean.double(), expected_mean, torch.float16)
    assert_close(module.running_var.double(), expected_var, torch.float16)


def test_worked_example_by_hand(path):
    # Channel 0 contains 1..4, 2..5, 3..6, 4..7 across the 4 samples: 16 values from 1
    # to 7 with mean 4, biased variance 40 / 16 = 2.5 and unbiased 40 / 15 = 8 / 3.
    # Channel 1 doubles channel 0 (mean 8, variances 10 and 32 / 3). Channel 2 is 5.
    base = torch.arange(4.0).view(4, 1) + torch.arange(1.0, 5.0).view(1, 4)
    x = torch.stack([base, 2 * base, torch.full((4, 4), 5.0)], dim=1)
    assert x.shape == (4, 3, 4)
    module = BatchNorm1d(3)

    y = module(x)

    # running = 0.9 * initial + 0.1 * batch, from mean 0 and variance 1.
    assert module.running_mean.tolist() == pytest.approx([0.4, 0.8, 0.5], abs=1e-6)
    assert module.running_var[0].item() == pytest.approx(1.1666667, abs=1e-6)
    assert module.running_var[1].item() == pytest.approx(1.9666667, abs=1e-6)
    assert module.running_var[2].item() == pytest.approx(0.9, abs=1e-6)
    assert module.num_batches_tracked.item() == 1
    # (1 - 4) / sqrt(2.5 + 1e-5) and (7 - 4) / sqrt(2.5 + 1e-5).
    assert y[0, 0, 0].item() == pytest.approx(-1.8973628, abs=1e-6)
    assert y[3, 0, 3].item() == pytest.approx(1.8973628, abs=1e-6)
    # Channel 1 is channel 0 scaled by 2, which normalization removes.
    assert y[0, 1, 0].item() == pytest.approx(-1.8973657, abs=1e-6)
    # A constant channel has zero variance and normalizes to 0.
    assert y[:, 2].abs().max().item() == 0.0

    module.eval()
    y_eval = module(x)
    # (4 - 0.4) / sqrt(7 / 6 + 1e-5) with the running statistics.
    assert y_eval[0, 0, 3].item() == pytest.approx(3.3329381, abs=1e-6)


def test_variance_stable_for_large_offset(path):
    # Values near 1e4 with unit spread: in float32 E[x^2] is about 1e8, whose spacing
    # of 8 swamps a variance of 1 in E[x^2] - E[x]^2.
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, 8, 8, generator=generator) + 1e4
    values = x.transpose(0, 1).reshape(4, -1)
    expected_var = values.double().var(dim=1, correction=1)

    naive_var = (values * values).mean(dim=1) - values.mean(dim=1).square()
    naive_var = naive_var * (values.size(1) / (values.size(1) - 1))
    assert (naive_var.double() - expected_var).abs().max() > 0.1

    module = BatchNorm2d(4, momentum=1.0)
    torch.testing.assert_close(
        module(x).double(), normalized_reference(x, module.eps), rtol=0.0, atol=1e-5
    )
    torch.testing.assert_close(
        module.running_var.double(), expected_var, rtol=1e-5, atol=0.0
    )


def test_gradients_accurate_for_large_offset(path):
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(64, 4, 8, 8, generator=generator) + 1e4
    grad_output = torch.randn(64, 4, 8, 8, generator=generator)
    x_ours = x.clone().requires_grad_()
    module = BatchNorm2d(4)
    module(x_ours).backward(grad_output)

    # Float64 autograd through the definition is the reference.
    x_reference = x.double().requires_grad_()
    reference = normalized_reference(x_reference, module.eps)
    reference.backward(grad_output.double())
    expected_weight_grad = (grad_output.double() * reference.detach()).sum((0, 2, 3))

    torch.testing.assert_close(
        x_ours.grad.double(), x_reference.grad, rtol=0.0, atol=1e-5
    )
    torch.testing.assert_close(
        module.weight.grad.double(), expected_weight_grad, rtol=0.0, atol=1e-4
    )


def test_eval_large_running_mean_matches_torch(path):
    # Both round shift = bias - mean * scale, so both lose about 4e-4 here, but they
    # must lose it identically.
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(64, 4, 8, 8, generator=generator) + 1e4
    module, reference = make_pair(BatchNorm2d, 4)
    for layer in (module, reference):
        layer.eval()
        with torch.no_grad():
            layer.running_mean.fill_(1e4 + 0.3)
            layer.running_var.fill_(0.8)
    torch.testing.assert_close(module(x), reference(x), rtol=0.0, atol=1e-6)


def test_momentum_none_is_cumulative_average(path):
    module = BatchNorm1d(2, momentum=None)
    batches = [
        torch.tensor([[1.0, 0.0], [3.0, 4.0]]),
        torch.tensor([[5.0, 2.0], [7.0, 2.0]]),
    ]
    for batch in batches:
        module(batch)
    # Batch means are (2, 2) and (6, 2). Unbiased variances are (2, 8) and (2, 0).
    assert module.running_mean.tolist() == pytest.approx([4.0, 2.0])
    assert module.running_var.tolist() == pytest.approx([2.0, 4.0])
    assert module.num_batches_tracked.item() == 2


def test_empty_batch_matches_torch(path):
    module, reference = make_pair(BatchNorm2d, 3)
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = module(x)
    y_torch = reference(x.detach())
    y.sum().backward()
    assert y.shape == y_torch.shape
    assert x.grad.shape == (0, 3, 2, 2)
    assert module.num_batches_tracked.item() == 1
    assert reference.num_batches_tracked.item() == 1
    assert module.running_mean.tolist() == [0.0, 0.0, 0.0]
    assert module.running_var.tolist() == [1.0, 1.0, 1.0]
    assert module.weight.grad.tolist() == [0.0, 0.0, 0.0]


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.op_names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.op_names.append(str(func))
        return func(*args, **(kwargs or {}))


GRAD_FN_NAMES = {
    "reference": "_BatchNormFunction",
    "cpp": "CppBatchNormFunction",
    "composite": "AddcmulBackward",
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_torch_batch_norm_op(training, path):
    module = BatchNorm2d(3).train(training)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with _OpRecorder() as recorder:
        y = module(x)
        y.backward(torch.randn_like(y))
    assert recorder.op_names
    assert not [name for name in recorder.op_names if "batch_norm" in name]
    assert GRAD_FN_NAMES[path] in type(y.grad_fn).__name__


def test_auto_path_uses_cpp_kernels_for_float32():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with batch_norm_backend("auto"):
        y = BatchNorm2d(3)(x)
        y_half = BatchNorm2d(3)(x.detach().half())
    assert "CppBatchNormFunction" in type(y.grad_fn).__name__
    assert y_half.dtype == torch.float16


GRADCHECK_SHAPES = [
    pytest.param((5, 3), id="NC"),
    pytest.param((4, 3, 3), id="NCL"),
    pytest.param((3, 2, 3, 2), id="NCHW"),
    pytest.param((2, 2, 2, 3, 2), id="NCDHW"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES)
def test_gradcheck(shape, training, path):
    generator = torch.Generator().manual_seed(4)
    channels = shape[1]
    x = torch.randn(shape, generator=generator, dtype=F64, requires_grad=True)
    weight = (
        torch.rand(channels, generator=generator, dtype=F64) + 0.5
    ).requires_grad_()
    bias = torch.randn(channels, generator=generator, dtype=F64, requires_grad=True)
    running_mean = torch.randn(channels, generator=generator, dtype=F64)
    running_var = torch.rand(channels, generator=generator, dtype=F64) + 0.5

    def function(x, weight, bias):
        # Clones keep gradcheck's repeated calls from drifting the running statistics.
        return batch_norm(
            x,
            running_mean.clone(),
            running_var.clone(),
            weight,
            bias,
            training,
            0.1,
            1e-5,
        )

    assert torch.autograd.gradcheck(function, (x, weight, bias))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_channels_last_without_weight(training, path):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 3, 2, generator=generator, dtype=F64)
    x = x.contiguous(memory_format=CL).requires_grad_()
    bias = torch.randn(2, generator=generator, dtype=F64, requires_grad=True)
    running_mean = torch.zeros(2, dtype=F64)
    running_var = torch.ones(2, dtype=F64)

    def function(x, bias):
        return batch_norm(x, running_mean, running_var, None, bias, training, 0.0, 1e-3)

    assert torch.autograd.gradcheck(function, (x, bias))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_double_backward_raises(backend):
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    with batch_norm_backend(backend):
        y = batch_norm(x, None, None, training=True)
    with pytest.raises(RuntimeError, match="set_batch_norm_backend\\('composite'\\)"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    # a first-order gradient of the same graph still works
    (grad_input,) = torch.autograd.grad(y.square().sum(), x)
    assert grad_input.shape == x.shape


FUNCTIONAL_CASES = [
    pytest.param({"training": True, "stats": True, "affine": True}, id="train-stats"),
    pytest.param(
        {"training": True, "stats": False, "affine": True}, id="train-no-stats"
    ),
    pytest.param({"training": False, "stats": True, "affine": True}, id="eval"),
    pytest.param(
        {"training": True, "stats": True, "affine": "weight"}, id="weight-only"
    ),
    pytest.param(
        {"training": False, "stats": True, "affine": "bias"}, id="eval-bias-only"
    ),
    pytest.param({"training": True, "stats": True, "affine": False}, id="no-affine"),
    pytest.param(
        {"training": True, "stats": True, "affine": True, "momentum": 0.3, "eps": 1e-2},
        id="momentum-eps",
    ),
    pytest.param(
        {"training": True, "stats": True, "affine": True, "shape": (3, 2, 2, 2, 2, 3)},
        id="6d-input",
    ),
]


@pytest.mark.parametrize("config", FUNCTIONAL_CASES)
def test_functional_matches_torch(config, path):
    generator = torch.Generator().manual_seed(6)
    shape = config.get("shape", (6, 4, 5))
    channels = shape[1]
    x = random_input(shape, F64, generator)
    grad_output = torch.randn(shape, generator=generator, dtype=F64)
    weight = torch.rand(channels, generator=generator, dtype=F64) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=F64)
    running_mean = torch.randn(channels, generator=generator, dtype=F64)
    running_var = torch.rand(channels, generator=generator, dtype=F64) + 0.5
    kwargs = {
        "training": config["training"],
        "momentum": config.get("momentum", 0.1),
        "eps": config.get("eps", 1e-5),
    }

    results = []
    for function in (batch_norm, F.batch_norm):
        x_leaf = x.clone().requires_grad_()
        params = {
            "weight": (
                weight.clone().requires_grad_()
                if config["affine"] in (True, "weight")
                else None
            ),
            "bias": (
                bias.clone().requires_grad_()
                if config["affine"] in (True, "bias")
                else None
            ),
        }
        stats = (
            (running_mean.clone(), running_var.clone())
            if config["stats"]
            else (None, None)
        )
        y = function(x_leaf, *stats, **params, **kwargs)
        y.backward(grad_output)
        grads = [x_leaf.grad] + [p.grad for p in params.values() if p is not None]
        results.append((y, grads, stats))

    (y_ours, grads_ours, stats_ours), (y_torch, grads_torch, stats_torch) = results
    assert_close(y_ours, y_torch, F64)
    for grad_ours, grad_torch in zip(grads_ours, grads_torch, strict=True):
        assert_close(grad_ours, grad_torch, F64)
    for stat_ours, stat_torch in zip(stats_ours, stats_torch, strict=True):
        if stat_torch is not None:
            assert_close(stat_ours, stat_torch, F64)


@pytest.mark.parametrize(
    ("cls", "shape"),
    [
        pytest.param(BatchNorm1d, (1, 3), id="1d-NC"),
        pytest.param(BatchNorm1d, (1, 3, 1), id="1d-NCL"),
        pytest.param(BatchNorm2d, (1, 3, 1, 1), id="2d"),
        pytest.param(BatchNorm3d, (1, 3, 1, 1, 1), id="3d"),
    ],
)
def test_single_value_per_channel_raises(cls, shape, path):
    module = cls(3)
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"more than 1 value per channel") as info:
        module(x)
    assert str(torch.Size(shape)) in str(info.value)
    # Eval mode uses the running statistics, so a single value is fine there.
    assert module.eval()(x).shape == shape


def test_single_value_untracked_eval_raises():
    module = BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize(
    ("cls", "rank", "message"),
    [
        pytest.param(
            BatchNorm1d, 4, r"expected 2D or 3D input \(got 4D input\)", id="1d-4D"
        ),
        pytest.param(
            BatchNorm1d, 1, r"expected 2D or 3D input \(got 1D input\)", id="1d-1D"
        ),
        pytest.param(BatchNorm2d, 3, r"expected 4D input \(got 3D input\)", id="2d-3D"),
        pytest.param(BatchNorm3d, 4, r"expected 5D input \(got 4D input\)", id="3d-4D"),
    ],
)
def test_wrong_rank_raises(cls, rank, message):
    with pytest.raises(ValueError, match=message):
        cls(3)(torch.randn((2, 3, 2, 2, 2)[:rank]))


def test_channel_mismatch_raises():
    with pytest.raises(
        ValueError, match=r"3 channels \(num_features=3\), got 4 channels"
    ):
        BatchNorm2d(3)(torch.randn(2, 4, 2, 2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_input_raises(dtype):
    x = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(TypeError, match=f"floating-point input.*got dtype {dtype}"):
        BatchNorm1d(3)(x)


@pytest.mark.parametrize(
    ("input_dtype", "param_dtype"),
    [
        pytest.param(torch.float32, torch.float64, id="float32-input-float64-params"),
        pytest.param(torch.float64, torch.float32, id="float64-input-float32-params"),
        pytest.param(torch.float32, torch.float16, id="float32-input-float16-params"),
        pytest.param(torch.float16, torch.float64, id="float16-input-float64-params"),
    ],
)
def test_dtype_mismatch_raises(input_dtype, param_dtype):
    module = BatchNorm1d(3, dtype=param_dtype)
    with pytest.raises(TypeError, match="share one dtype"):
        module(torch.randn(4, 3, dtype=input_dtype))


def test_mixed_parameter_dtypes_raise():
    # torch also raises when a half input meets float32 weight and half bias.
    x = torch.randn(4, 3).half()
    with pytest.raises(TypeError, match="share one dtype"):
        batch_norm(x, None, None, torch.ones(3), torch.zeros(3).half(), training=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(
            {"running_mean": None, "running_var": None, "training": False},
            "must be given when training=False",
            id="eval-without-stats",
        ),
        pytest.param(
            {"running_mean": torch.zeros(3), "running_var": None, "training": True},
            "both be None or neither",
            id="one-stat-missing",
        ),
        pytest.param(
            {"training": True, "eps": 0.0}, "eps must be positive", id="zero-eps"
        ),
        pytest.param(
            {"training": False, "eps": -1.0}, "eps must be non-negative", id="neg-eps"
        ),
        pytest.param(
            {"weight": torch.ones(4)},
            r"weight should contain 3 elements .*got 4",
            id="weight-size",
        ),
        pytest.param(
            {"running_var": torch.ones(2)},
            r"running_var should contain 3 elements .*got 2",
            id="running-var-size",
        ),
    ],
)
def test_functional_invalid_arguments_raise(kwargs, message):
    arguments = {
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
        "training": False,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        batch_norm(torch.randn(4, 3), **arguments)


def test_functional_one_dimensional_input_raises():
    with pytest.raises(ValueError, match=r"at least 2 dimensions .*got 1D input"):
        batch_norm(torch.randn(4), torch.zeros(4), torch.ones(4))


MODULE_CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"affine": False}, id="affine-false"),
    pytest.param({"track_running_stats": False}, id="no-running-stats"),
    pytest.param({"bias": False}, id="bias-false"),
    pytest.param({"eps": 1e-3, "momentum": None}, id="eps-momentum-none"),
]


@pytest.mark.parametrize("config", MODULE_CONFIGS)
@pytest.mark.parametrize("cls", [BatchNorm1d, BatchNorm2d, BatchNorm3d])
def test_module_interface_matches_torch(cls, config):
    module = cls(4, **config)
    reference = TORCH_CLASSES[cls](4, **config)
    assert isinstance(module, _BatchNorm)
    assert repr(module) == repr(reference)
    assert list(module.state_dict()) == list(reference.state_dict())
    assert [name for name, _ in module.named_parameters()] == [
        name for name, _ in reference.named_parameters()
    ]
    for name in (
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ):
        ours, theirs = getattr(module, name), getattr(reference, name)
        assert (ours is None) == (theirs is None), name
        if theirs is not None:
            assert torch.equal(ours, theirs), name
            assert ours.dtype == theirs.dtype, name


def test_factory_kwargs_set_dtype():
    module = BatchNorm2d(3, dtype=F64, device="cpu")
    assert module.weight.dtype == F64
    assert module.running_var.dtype == F64
    assert module.num_batches_tracked.dtype == torch.long


def test_reset_parameters_and_running_stats():
    module = BatchNorm2d(3)
    module(torch.randn(4, 3, 2, 2) + 5)
    with torch.no_grad():
        module.weight.fill_(2.0)
        module.bias.fill_(1.0)

    module.reset_running_stats()
    assert module.running_mean.tolist() == [0.0, 0.0, 0.0]
    assert module.running_var.tolist() == [1.0, 1.0, 1.0]
    assert module.num_batches_tracked.item() == 0
    assert module.weight.tolist() == [2.0, 2.0, 2.0]

    module(torch.randn(4, 3, 2, 2) + 5)
    module.reset_parameters()
    assert module.running_mean.tolist() == [0.0, 0.0, 0.0]
    assert module.weight.tolist() == [1.0, 1.0, 1.0]
    assert module.bias.tolist() == [0.0, 0.0, 0.0]


def train_steps(module, shape, steps=3, seed=7):
    generator = torch.Generator().manual_seed(seed)
    module.train()
    for _ in range(steps):
        module(random_input(shape, torch.float32, generator))
    module.eval()
    return module


@pytest.mark.parametrize("direction", ["torch-to-normlab", "normlab-to-torch"])
def test_state_dict_round_trip(direction, path):
    shape = (4, 3, 5, 5)
    if direction == "torch-to-normlab":
        source, target = torch.nn.BatchNorm2d(3), BatchNorm2d(3)
    else:
        source, target = BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        source.weight.uniform_(0.5, 1.5)
        source.bias.normal_()
    train_steps(source, shape)

    target.load_state_dict(source.state_dict())
    target.eval()

    x = torch.randn(shape)
    assert target.num_batches_tracked.item() == 3
    assert_close(target(x), source(x), torch.float32)
    source.train()
    target.train()
    assert_close(target(x), source(x), torch.float32)


@pytest.mark.parametrize(
    "cls", [BatchNorm2d, torch.nn.BatchNorm2d], ids=["normlab", "torch"]
)
def test_version1_checkpoint_keeps_count(cls):
    checkpoint = torch.nn.BatchNorm2d(3).state_dict()
    checkpoint["running_mean"].fill_(2.0)
    del checkpoint["num_batches_tracked"]
    checkpoint._metadata[""]["version"] = 1
    module = cls(3)
    module.num_batches_tracked.fill_(5)

    module.load_state_dict(checkpoint)

    assert module.running_mean.tolist() == [2.0, 2.0, 2.0]
    assert module.num_batches_tracked.item() == 5


@pytest.mark.parametrize(
    "cls", [BatchNorm2d, torch.nn.BatchNorm2d], ids=["normlab", "torch"]
)
def test_version2_checkpoint_missing_count_raises(cls):
    checkpoint = torch.nn.BatchNorm2d(3).state_dict()
    del checkpoint["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        cls(3).load_state_dict(checkpoint)


@settings(max_examples=40, deadline=None)
@given(
    rank=st.integers(min_value=2, max_value=5),
    batch=st.integers(min_value=1, max_value=4),
    channels=st.integers(min_value=1, max_value=4),
    spatial=st.lists(st.integers(min_value=1, max_value=4), min_size=3, max_size=3),
    eps=st.floats(min_value=1e-6, max_value=1e-1),
    momentum=st.none() | st.floats(min_value=0.0, max_value=1.0),
    affine=st.booleans(),
    track_running_stats=st.booleans(),
    eval_last=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
@pytest.mark.parametrize("backend", PATHS)
def test_property_matches_torch(
    backend,
    rank,
    batch,
    channels,
    spatial,
    eps,
    momentum,
    affine,
    track_running_stats,
    eval_last,
    seed,
):
    shape = (batch, channels) + tuple(spatial[: rank - 2])
    values_per_channel = batch * math.prod(shape[2:])
    cls = CLASS_FOR_RANK[rank]
    kwargs = {
        "eps": eps,
        "momentum": momentum,
        "affine": affine,
        "track_running_stats": track_running_stats,
    }
    module, reference = make_pair(cls, channels, param_dtype=F64, seed=seed, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    modes = [True, True] if values_per_channel > 1 else []
    if eval_last and (track_running_stats or values_per_channel > 1):
        modes.append(False)
    with batch_norm_backend(backend):
        for training in modes:
            module.train(training)
            reference.train(training)
            x = random_input(shape, F64, generator)
            grad_output = torch.randn(shape, generator=generator, dtype=F64)
            run_step(module, reference, x, grad_output)
