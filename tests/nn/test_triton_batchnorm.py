"""Tests of normlab.nn.triton_batchnorm against torch.nn.functional.batch_norm.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. The interpreter is
chosen by TRITON_INTERPRET when triton.jit decorates a kernel, so those cases run in one
child process with that variable set, which keeps it out of this process and out of the
other test files. The child writes its outputs to a file and the tests here compare them
with float64 references. The CUDA tests run the same comparisons on larger inputs in this
process.
"""

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import normlab.nn.triton_batchnorm as triton_bn

EPS = 1e-5

# Tolerance relative to the largest reference value, per output dtype: a few units in the
# last place for float32 and about one for float16 and bfloat16.
# NOTE: triton 3.9's interpreter converts float32 to bfloat16 by truncation, where the GPU
# rounds to nearest, so interpreted bfloat16 outputs are up to one unit off, not half.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

requires_triton = pytest.mark.skipif(
    triton_bn.triton is None, reason="triton is not installed (test extra, Linux only)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    # "contiguous", "channels_last" (the permuted order for any rank) or "strided"
    layout: str = "contiguous"
    grad_layout: str | None = None
    # dtype of weight, bias and the running statistics
    param_dtype: torch.dtype = torch.float32
    has_weight: bool = True
    has_bias: bool = True
    offset: float = 0.0
    # tolerance of y, dx, dweight and dbias where the offset makes the float32 rounding
    # of the mean dominate their error
    tolerance: float | None = None


INTERPRETER_CASES = [
    Case("nchw-fp32-multiblock", (4, 3, 40, 40)),
    Case("channels-last-fp32", (4, 3, 5, 7), layout="channels_last"),
    Case("2d-fp32-no-affine", (16, 5), has_weight=False, has_bias=False),
    Case("3d-fp32-weight-only", (3, 6, 7), has_bias=False),
    Case("channels-last-3d-fp32", (2, 3, 2, 3, 4), layout="channels_last"),
    Case("transposed-3d-fp32", (3, 5, 6), layout="channels_last"),
    Case("nchw-fp16", (4, 6, 5, 5), dtype=torch.float16),
    Case(
        "channels-last-bf16", (4, 6, 5, 5), dtype=torch.bfloat16, layout="channels_last"
    ),
    Case(
        "fp16-fp16-params", (8, 4, 3, 3), dtype=torch.float16, param_dtype=torch.float16
    ),
    Case("bf16-bias-only", (6, 4, 3, 3), dtype=torch.bfloat16, has_weight=False),
    Case("offset-1e4-fp32", (6, 4, 9, 9), offset=1e4, tolerance=1e-3),
    Case("strided-fp32", (4, 3, 6, 6), layout="strided"),
    Case(
        "grad-layout-differs",
        (4, 5, 3, 4),
        layout="channels_last",
        grad_layout="contiguous",
    ),
    Case("two-values-per-channel", (2, 3, 1, 1)),
]

CUDA_CASES = INTERPRETER_CASES + [
    Case("cuda-nchw-fp32", (32, 64, 20, 20)),
    Case("cuda-channels-last-fp16", (16, 64, 24, 24), torch.float16, "channels_last"),
    Case("cuda-nchw-bf16", (8, 32, 48, 48), torch.bfloat16),
    Case("cuda-2d-fp32", (256, 512)),
    Case("cuda-3d-fp16", (8, 16, 1000), torch.float16),
]


def to_layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return tensor.contiguous()
    if layout == "channels_last":
        order = (0, *range(2, tensor.dim()), 1)
        inverse = sorted(range(tensor.dim()), key=order.__getitem__)
        return tensor.permute(order).contiguous().permute(inverse)
    if layout == "strided":
        # every other element along dimension 2 of a larger tensor: not dense
        return torch.stack([tensor, torch.zeros_like(tensor)], dim=2)[:, :, 0]
    raise ValueError(f"unknown layout {layout!r}")


def make_inputs(case: Case, device: str = "cpu") -> dict:
    """Build the case's tensors from a fixed seed, on the CPU, then move them."""
    generator = torch.Generator().manual_seed(0)
    channels = case.shape[1]

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = randn(*case.shape) * 2 + 0.5 + case.offset
    inputs = {
        "x": to_layout(x.to(case.dtype), case.layout),
        "grad": to_layout(
            randn(*case.shape).to(case.dtype), case.grad_layout or case.layout
        ),
        "weight": (randn(channels) + 1).to(case.param_dtype)
        if case.has_weight
        else None,
        "bias": randn(channels).to(case.param_dtype) if case.has_bias else None,
        "running_mean": (randn(channels) + case.offset).to(case.param_dtype),
        "running_var": (torch.rand(channels, generator=generator) + 0.5).to(
            case.param_dtype
        ),
    }
    return {k: v if v is None else v.to(device) for k, v in inputs.items()}


def run_triton(case: Case, device: str) -> dict:
    """Run the case's training and eval forward and backward with the Triton kernels."""
    inputs = make_inputs(case, device)
    x, grad, weight, bias = (
        inputs["x"],
        inputs["grad"],
        inputs["weight"],
        inputs["bias"],
    )
    y, mean, invstd, var = triton_bn.forward_train(x, weight, bias, EPS)
    dx, dweight, dbias = triton_bn.backward(
        grad, x, mean, invstd, weight, training=True
    )

    running_mean, running_var = inputs["running_mean"], inputs["running_var"]
    y_eval = triton_bn.forward_eval(x, running_mean, running_var, weight, bias, EPS)
    eval_invstd = torch.rsqrt(running_var.float() + EPS)
    dx_eval, dweight_eval, dbias_eval = triton_bn.backward(
        grad, x, running_mean, eval_invstd, weight, training=False
    )
    outputs = {
        "y": y, "mean": mean, "invstd": invstd, "var": var,
        "dx": dx, "dweight": dweight, "dbias": dbias,
        "y_eval": y_eval, "dx_eval": dx_eval,
        "dweight_eval": dweight_eval, "dbias_eval": dbias_eval,
    }  # fmt: skip
    return {k: v if v is None else v.cpu() for k, v in outputs.items()}


def reference(case: Case, training: bool) -> dict:
    """Return float64 outputs and gradients of F.batch_norm for the case."""
    inputs = make_inputs(case)

    def leaf(tensor):
        return None if tensor is None else tensor.double().requires_grad_()

    x, weight, bias = leaf(inputs["x"]), leaf(inputs["weight"]), leaf(inputs["bias"])
    running_mean = inputs["running_mean"].double()
    running_var = inputs["running_var"].double()
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, EPS)
    grad = inputs["grad"].double()
    y.backward(grad)

    dims = (0, *range(2, x.dim()))
    var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
    if not training:
        mean, var = running_mean, running_var
    view = (1, -1, *[1] * (x.dim() - 2))
    invstd = torch.rsqrt(var + EPS)
    xhat = (x.detach() - mean.view(view)) * invstd.view(view)
    scale = invstd if weight is None else invstd * weight.detach()
    return {
        "y": y.detach(), "mean": mean, "var": var, "invstd": invstd,
        "dx": x.grad, "dweight": None if weight is None else weight.grad,
        "dbias": grad.sum(dims) if bias is None else bias.grad,
        # dx cancels to near zero for few values per channel, so its rounding error
        # scales with dy * invstd * weight. Sums of the absolute terms bound the rounding
        # error of dweight and dbias.
        "dx_scale": (grad.abs() * scale.abs().view(view)).max(),
        "dweight_scale": (grad * xhat).abs().sum(dims),
        "dbias_scale": grad.abs().sum(dims),
    }  # fmt: skip


def assert_scaled_close(name, actual, expected, tolerance, scale=None):
    # max |actual - expected| <= tolerance * max(scale), by default scale = |expected|
    scale = expected.abs().max() if scale is None else scale.max()
    error = (actual.double() - expected).abs().max().item()
    bound = tolerance * max(scale.item(), 1e-30)
    assert error <= bound, f"{name}: max abs error {error:.3g} exceeds {bound:.3g}"


def check_case(case: Case, outputs: dict) -> None:
    inputs = make_inputs(case)
    param_dtype = case.param_dtype if case.has_weight else torch.float32
    param_tolerance = case.tolerance or TOLERANCES[param_dtype]
    output_tolerance = case.tolerance or TOLERANCES[case.dtype]
    expected_layout = "contiguous" if case.layout == "strided" else case.layout
    expected_strides = to_layout(inputs["x"], expected_layout).stride()

    for training, suffix in ((True, ""), (False, "_eval")):
        expected = reference(case, training)
        for key in ("y", "dx"):
            actual = outputs[key + suffix]
            assert actual.dtype == case.dtype, f"{key}{suffix} dtype"
            assert actual.stride() == expected_strides, f"{key}{suffix} memory format"
            assert_scaled_close(
                key + suffix, actual, expected[key], output_tolerance,
                expected["dx_scale"] if key == "dx" else None,
            )  # fmt: skip
        if case.has_weight:
            assert outputs["dweight" + suffix].dtype == case.param_dtype
            assert_scaled_close(
                "dweight" + suffix, outputs["dweight" + suffix], expected["dweight"],
                param_tolerance, expected["dweight_scale"],
            )  # fmt: skip
        else:
            assert outputs["dweight" + suffix] is None
        assert_scaled_close(
            "dbias" + suffix, outputs["dbias" + suffix], expected["dbias"],
            param_tolerance, expected["dbias_scale"],
        )  # fmt: skip

    expected = reference(case, training=True)
    for key in ("mean", "var", "invstd"):
        assert outputs[key].dtype == torch.float32, f"{key} dtype"
        torch.testing.assert_close(
            outputs[key].double(), expected[key], rtol=1e-5, atol=1e-6, msg=key
        )


# --- interpreter cases, run in a child process ---------------------------------------

# The child also runs the checks of benchmarks/triton_bn_check.py on one small input.
CHILD_SCRIPT = """
import importlib.util, sys, torch

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

cases = load("triton_bn_cases", sys.argv[1])
assert cases.triton_bn._INTERPRET, "TRITON_INTERPRET did not reach triton.jit"
outputs = {case.name: cases.run_triton(case, "cpu") for case in cases.INTERPRETER_CASES}
script = load("triton_bn_check", sys.argv[2])
outputs["check-script"] = script.check_case(
    (2, 3, 4, 5), torch.channels_last, torch.bfloat16, "cpu"
)
torch.save(outputs, sys.argv[3])
"""

CHECK_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_bn_check.py"


@pytest.fixture(scope="module")
def interpreter_outputs(tmp_path_factory) -> dict:
    import fcntl

    # pytest-xdist workers share the parent of their base temporary directories, so the
    # first worker runs the child and the others wait on the lock and read its file.
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    output_path = root / "triton_interpret_outputs.pt"
    with open(root / "triton_interpret.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output_path.exists():
            env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
            completed = subprocess.run(
                [sys.executable, "-c", CHILD_SCRIPT, __file__, CHECK_SCRIPT, output_path],
                check=False, env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(output_path, weights_only=True)


@requires_triton
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda case: case.name)
def test_interpreter_matches_torch(case, interpreter_outputs):
    check_case(case, interpreter_outputs[case.name])


# --- CUDA -----------------------------------------------------------------------------


@requires_triton
@requires_cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda case: case.name)
def test_cuda_matches_torch(case):
    check_case(case, run_triton(case, "cuda"))


@requires_triton
@requires_cuda
def test_cuda_same_numbers_on_rerun():
    case = CUDA_CASES[-4]
    first, second = run_triton(case, "cuda"), run_triton(case, "cuda")
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


# --- benchmarks/triton_bn_check.py -----------------------------------------------------


@requires_triton
def test_check_script_passes_in_interpreter(interpreter_outputs):
    rows = interpreter_outputs["check-script"]
    # 6 compared outputs in training (mean, var, y, dx, dweight, dbias) and 4 in eval
    assert len(rows) == 10
    failed = [row for row in rows if not row[3]]
    assert not failed, f"(output, triton error, torch error, passed): {failed}"


def test_check_script_exits_without_cuda(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("triton_bn_check", CHECK_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", [str(CHECK_SCRIPT)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main() == 2
    expected = "no CUDA device found" if triton_bn.triton else "triton is not installed"
    assert expected in capsys.readouterr().err


# --- host-side checks, no kernel launch -----------------------------------------------


def test_is_available_rejects_cpu_and_float64(monkeypatch):
    monkeypatch.setattr(triton_bn, "_INTERPRET", False)
    assert not triton_bn.is_available(torch.zeros(2, 3))
    monkeypatch.setattr(triton_bn, "_INTERPRET", True)
    assert not triton_bn.is_available(torch.zeros(2, 3, dtype=torch.float64))


@requires_triton
def test_cpu_tensor_rejected_without_interpreter(monkeypatch):
    monkeypatch.setattr(triton_bn, "_INTERPRET", False)
    with pytest.raises(
        ValueError, match="expected a CUDA tensor, got one on device cpu"
    ):
        triton_bn.forward_train(torch.zeros(2, 3), None, None, EPS)


@requires_triton
@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: triton_bn.forward_train(torch.zeros(3), None, None, EPS),
            "at least 2",
        ),
        (
            lambda: triton_bn.forward_train(
                torch.zeros(2, 3).double(), None, None, EPS
            ),
            "float32, float16 or bfloat16, got torch.float64",
        ),
        (
            lambda: triton_bn.forward_train(
                torch.zeros(2, 3), torch.ones(4), None, EPS
            ),
            r"weight must have shape \(3,\)",
        ),
        (
            lambda: triton_bn.forward_eval(
                torch.zeros(2, 3), None, torch.ones(3), None, None, EPS
            ),
            "running_mean is required",
        ),
        (
            lambda: triton_bn.backward(
                torch.zeros(2, 4),
                torch.zeros(2, 3),
                torch.zeros(3),
                torch.ones(3),
                None,
                True,
            ),
            "grad_y must have the input's shape",
        ),
    ],
    ids=["rank-1", "float64", "weight-shape", "no-running-mean", "grad-shape"],
)
def test_invalid_arguments_raise(monkeypatch, call, message):
    monkeypatch.setattr(triton_bn, "_INTERPRET", True)
    with pytest.raises(ValueError, match=message):
        call()


def test_imports_without_triton(monkeypatch):
    # A None entry in sys.modules makes `import triton` raise ImportError.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    path = Path(triton_bn.__file__)
    spec = importlib.util.spec_from_file_location("triton_bn_without_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    assert not module.is_available(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        module.forward_train(torch.zeros(2, 3), None, None, EPS)


@requires_triton
@pytest.mark.parametrize(
    "shape, channels_last, programs",
    [((4, 3, 40, 40), False, 4), ((7, 5, 3), False, 1000), ((9, 70, 3, 3), True, 6)],
)
def test_geometry_covers_every_tile(shape, channels_last, programs):
    geometry = triton_bn._Geometry(
        torch.empty(shape, device="meta"), channels_last, programs
    )
    covered = geometry.num_groups * geometry.tiles_per_program
    assert covered >= geometry.num_tiles
    assert covered - geometry.tiles_per_program < geometry.num_tiles
    assert geometry.num_tiles * geometry.BLOCK_S >= math.prod(shape) // shape[1]
    assert geometry.num_c_blocks * geometry.BLOCK_C >= shape[1]


@requires_triton
def test_geometry_int64_offsets_from_2_pow_31():
    below = triton_bn._Geometry(
        torch.empty(2**16, 2, 2**14 - 1, device="meta"), False, 4
    )
    above = triton_bn._Geometry(torch.empty(2**16, 2, 2**14, device="meta"), False, 4)
    assert not below.use_int64
    assert above.use_int64
