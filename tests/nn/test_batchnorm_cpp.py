"""Tests of the C++ kernels on inputs that span several blocks and threads."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from normlab.nn import _cpu_kernels
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, batch_norm_backend

# Each shape has more values per channel than one 2048-value block, so block and
# chunk merges run. 8x3x30x30 NCHW splits each sample's 900 values over rows.
SHAPES = [
    pytest.param((8, 3, 30, 30), torch.contiguous_format, id="NCHW"),
    pytest.param((8, 3, 30, 30), torch.channels_last, id="channels-last"),
    pytest.param((3000, 20), torch.contiguous_format, id="NC"),
    pytest.param((2, 2, 5000), torch.contiguous_format, id="NCL-long"),
]


def module_for(shape):
    return (BatchNorm1d if len(shape) <= 3 else BatchNorm2d)(
        shape[1], dtype=torch.float64
    )


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize(("shape", "memory_format"), SHAPES)
def test_cpp_matches_float64_definition(shape, memory_format, threads):
    generator = torch.Generator().manual_seed(11)
    x64 = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1e4
    grad_output = torch.randn(shape, generator=generator)
    x = x64.float().contiguous(memory_format=memory_format).requires_grad_()
    module = module_for(shape).float()
    module.momentum = 1.0
    with batch_norm_backend("cpp"):
        y = module(x)
        y.backward(grad_output.contiguous(memory_format=memory_format))
    assert "CppBatchNormFunction" in type(y.grad_fn).__name__
    assert y.is_contiguous(memory_format=memory_format)

    dims = (0,) + tuple(range(2, len(shape)))
    x_reference = x.detach().double().requires_grad_()
    var, mean = torch.var_mean(x_reference, dim=dims, correction=0, keepdim=True)
    reference = (x_reference - mean) / torch.sqrt(var + module.eps)
    reference.backward(grad_output.double())
    unbiased = x.detach().double().var(dim=dims, correction=1)

    torch.testing.assert_close(y.double(), reference, rtol=0.0, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), x_reference.grad, rtol=0.0, atol=2e-5)
    torch.testing.assert_close(
        module.running_var.double(), unbiased, rtol=1e-5, atol=0.0
    )
    torch.testing.assert_close(
        module.running_mean.double(), mean.flatten(), rtol=0.0, atol=1e-3
    )


@pytest.mark.parametrize(("shape", "memory_format"), SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpp_matches_torch_float64(shape, memory_format, training, threads):
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 - 2
    x = x.contiguous(memory_format=memory_format)
    grad_output = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = torch.rand(shape[1], generator=generator, dtype=torch.float64) + 0.5
    results = []
    for cls in (module_for(shape).__class__, torch.nn.BatchNorm2d):
        if cls is torch.nn.BatchNorm2d and len(shape) <= 3:
            cls = torch.nn.BatchNorm1d
        module = cls(shape[1], dtype=torch.float64)
        with torch.no_grad():
            module.weight.copy_(weight)
            module.running_var.fill_(1.7)
        module.train(training)
        x_leaf = x.clone().requires_grad_()
        with batch_norm_backend("cpp"):
            y = module(x_leaf)
            y.backward(grad_output)
        results.append((y, x_leaf.grad, module.weight.grad, module.bias.grad, module))
    ours, theirs = results
    for index, name in enumerate(["output", "input grad", "weight grad", "bias grad"]):
        torch.testing.assert_close(ours[index], theirs[index], msg=name)
    torch.testing.assert_close(ours[4].running_mean, theirs[4].running_mean)
    torch.testing.assert_close(ours[4].running_var, theirs[4].running_var)


def test_cpp_same_numbers_on_repeat():
    x = torch.randn(4000, 10, generator=torch.Generator().manual_seed(13))
    with batch_norm_backend("cpp"):
        first = BatchNorm1d(10)(x)
        second = BatchNorm1d(10)(x)
    assert torch.equal(first, second)


def test_cpp_supports_only_cpu_float32_float64():
    assert _cpu_kernels.supports(torch.ones(2, 3))
    assert _cpu_kernels.supports(torch.ones(2, 3, dtype=torch.float64))
    assert not _cpu_kernels.supports(torch.ones(2, 3, dtype=torch.float16))
    assert not _cpu_kernels.supports(torch.ones(0, 3))


def test_build_finds_ninja_of_the_venv(monkeypatch):
    # the venv's ninja is used when PATH has none, as when the venv is not activated
    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(_cpu_kernels.shutil, "which", lambda name: None)
    _cpu_kernels._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR


def test_stale_lock_of_killed_process_blocks_nothing(tmp_path):
    # a process killed while loading leaves torch's lock file; the next process must load
    built = _cpu_kernels._build_directory(_cpu_kernels._extension_name())
    assert _cpu_kernels.load_extension() is not None
    name = _cpu_kernels._extension_name()
    copy = tmp_path / name
    copy.mkdir()
    shutil.copy(built / f"{name}.so", copy / f"{name}.so")
    (copy / "lock").touch()
    script = "from normlab.nn import _cpu_kernels; print(_cpu_kernels.load_extension())"
    done = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "normlab_bn" in done.stdout
