"""Tests for normlab.probes.memory: saved-for-backward bytes and peak memory.

Expected byte counts are worked out from what autograd saves on the CPU in torch 2.13
(float32, 4 bytes per value):

- ``addmm`` (``nn.Linear`` on a 2-D input) saves ``mat1`` (the input) to compute the
  weight gradient and ``mat2`` (``weight.t()``, a view of the weight) to compute the
  input gradient. Each is saved only when the other operand's gradient is needed, so an
  input that does not require grad saves the input alone: N * in * 4 bytes. With
  ``input.requires_grad`` the weight's storage is added: out * in * 4 bytes.
- ``relu`` saves its output, not its input.
- ``convolution`` saves its input and weight (not the bias).
- ``native_batch_norm`` in train mode saves its input, weight, running mean, running
  variance, and the batch mean and inverse standard deviation it computed:
  input + 5 * C * 4 bytes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.probes import (
    PeakMemory,
    SavedTensorReport,
    peak_memory,
    saved_tensor_bytes,
)

FLOAT = 4


def conv_bn_relu(in_channels: int = 3, channels: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


# --------------------------------------------------------------------------------------
# saved_tensor_bytes: single layers


def test_linear_saves_input_only():
    batch, in_features, out_features = 4, 5, 3
    layer = nn.Linear(in_features, out_features)
    report = saved_tensor_bytes(layer, torch.randn(batch, in_features))
    assert isinstance(report, SavedTensorReport)
    assert report.total_bytes == batch * in_features * FLOAT
    assert report.parameter_bytes == 0
    assert report.activation_bytes == batch * in_features * FLOAT
    assert report.by_layer_type == {"Linear": batch * in_features * FLOAT}
    assert report.by_module == {"(root)": batch * in_features * FLOAT}
    assert report.num_saved == 1
    assert report.num_storages == 1


def test_linear_with_input_grad_adds_weight():
    batch, in_features, out_features = 4, 5, 3
    layer = nn.Linear(in_features, out_features)
    x = torch.randn(batch, in_features, requires_grad=True)
    report = saved_tensor_bytes(layer, x)
    weight_bytes = out_features * in_features * FLOAT
    assert report.total_bytes == batch * in_features * FLOAT + weight_bytes
    assert report.parameter_bytes == weight_bytes
    assert report.num_saved == 2


def test_linear_3d_input_counts_reshaped_storage():
    layer = nn.Linear(5, 3, bias=False)
    report = saved_tensor_bytes(layer, torch.randn(2, 4, 5))
    # The input is flattened to (8, 5) by a view, which shares the input's storage.
    assert report.total_bytes == 2 * 4 * 5 * FLOAT


def test_relu_saves_output():
    wide = torch.randn(6, 10, requires_grad=True) * 1.0
    # A 6x3 view into a 6x10 storage: saving the input would count 6 * 10 * 4 bytes,
    # and the output has a 6x3 storage of its own.
    narrow = wide[:, :3]
    assert narrow.untyped_storage().nbytes() == 6 * 10 * FLOAT
    report = saved_tensor_bytes(nn.ReLU(), narrow)
    assert report.total_bytes == 6 * 3 * FLOAT
    assert report.by_layer_type == {"ReLU": 6 * 3 * FLOAT}


def test_relu_without_grad_saves_nothing():
    report = saved_tensor_bytes(nn.ReLU(), torch.randn(6, 3))
    assert report.total_bytes == 0
    assert report.num_saved == 0


# --------------------------------------------------------------------------------------
# saved_tensor_bytes: chains and sharing


def test_conv_bn_relu_exact_bytes():
    batch, channels, size = 2, 8, 6
    model = conv_bn_relu(3, channels)
    x = torch.randn(batch, 3, size, size)
    report = saved_tensor_bytes(model, x)

    input_bytes = batch * 3 * size * size * FLOAT  # 864
    conv_weight = channels * 3 * 3 * 3 * FLOAT  # 864
    feature_map = batch * channels * size * size * FLOAT  # 2304, conv and ReLU outputs
    per_channel = channels * FLOAT  # 32
    bn_parameters = 3 * per_channel  # weight, running mean and running variance
    bn_statistics = 2 * per_channel  # batch mean and inverse standard deviation
    expected = {
        "Conv2d": input_bytes + conv_weight,
        "BatchNorm2d": feature_map + bn_parameters + bn_statistics,
        "ReLU": feature_map,
    }
    assert report.by_layer_type == expected
    assert report.by_module == {"0": expected["Conv2d"], "1": expected["BatchNorm2d"],
                                "2": expected["ReLU"]}  # fmt: skip
    assert report.total_bytes == sum(expected.values())
    assert report.total_bytes == 6496
    assert report.parameter_bytes == conv_weight + bn_parameters
    assert report.num_saved == 9
    assert report.num_storages == 9


def test_shared_storage_counted_once():
    model = nn.Sequential(conv_bn_relu(3, 8), nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 6, 6)
    report = saved_tensor_bytes(model, x)
    first_block = saved_tensor_bytes(model[0], x).total_bytes
    # The second conv saves the ReLU output, which the ReLU already saved, plus its
    # weight.
    assert report.total_bytes == first_block + 4 * 8 * 3 * 3 * FLOAT
    assert report.num_saved == report.num_storages + 1
    assert report.by_module["1"] == 4 * 8 * 3 * 3 * FLOAT
    assert report.by_module["0.2"] == 2 * 8 * 6 * 6 * FLOAT


def test_inplace_relu_same_total():
    x = torch.randn(2, 3, 6, 6)
    plain = saved_tensor_bytes(conv_bn_relu(), x)
    inplace_model = conv_bn_relu()
    inplace_model[2] = nn.ReLU(inplace=True)
    inplace = saved_tensor_bytes(inplace_model, x)
    assert inplace.total_bytes == plain.total_bytes


def test_nested_names_and_container_ops():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1, bias=False)

        def forward(self, x):
            # sigmoid runs in Block's own forward and saves its output.
            return torch.sigmoid(self.conv(x))

    model = nn.Sequential()
    model.add_module("block", Block())
    x = torch.randn(1, 2, 4, 4)
    report = saved_tensor_bytes(model, x)
    assert report.by_module["block.conv"] == (2 * 4 * 4 + 2 * 2) * FLOAT
    assert report.by_module["block"] == 2 * 4 * 4 * FLOAT
    assert report.by_layer_type == {
        "Conv2d": (2 * 4 * 4 + 2 * 2) * FLOAT,
        "Block": 2 * 4 * 4 * FLOAT,
    }


def test_loss_counts_as_other():
    model = nn.Linear(5, 3, bias=False)
    x = torch.randn(4, 5)
    report = saved_tensor_bytes(model, x, loss_fn=lambda y: y.pow(2).sum())
    assert report.by_layer_type["other"] == 4 * 3 * FLOAT
    assert report.by_module["other"] == 4 * 3 * FLOAT
    assert report.total_bytes == (4 * 5 + 4 * 3) * FLOAT


def test_tuple_input():
    class Pair(nn.Module):
        def forward(self, a, b):
            return a * b

    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    report = saved_tensor_bytes(Pair(), (a, b))
    assert report.total_bytes == 2 * 3 * 4 * FLOAT


# --------------------------------------------------------------------------------------
# saved_tensor_bytes: nothing saved, and the model left unchanged


def test_no_grad_saves_zero():
    model = conv_bn_relu()
    with torch.no_grad():
        report = saved_tensor_bytes(model, torch.randn(2, 3, 6, 6))
    assert report.total_bytes == 0
    assert report.by_layer_type == {}
    assert report.by_module == {}


def test_frozen_model_saves_zero():
    model = conv_bn_relu().eval().requires_grad_(False)
    report = saved_tensor_bytes(model, torch.randn(2, 3, 6, 6), train=False)
    assert report.total_bytes == 0


def test_eval_mode_alone_still_saves():
    model = conv_bn_relu()
    train = saved_tensor_bytes(model, torch.randn(2, 3, 6, 6), train=True)
    evaluation = saved_tensor_bytes(model, torch.randn(2, 3, 6, 6), train=False)
    # Parameters still require grad, so conv and BN save their inputs in eval mode.
    assert evaluation.total_bytes > 0
    assert evaluation.by_layer_type["Conv2d"] == train.by_layer_type["Conv2d"]


def test_model_state_restored():
    model = conv_bn_relu()
    model.eval()
    model[1].train()
    running_mean = model[1].running_mean.clone()
    saved_tensor_bytes(model, torch.randn(2, 3, 6, 6))
    assert torch.equal(model[1].running_mean, running_mean)
    assert int(model[1].num_batches_tracked) == 0
    assert model.training is False
    assert model[0].training is False
    assert model[1].training is True


def test_hooks_removed_after_error():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def forward(self, x):
            self.layer(x)
            raise RuntimeError("forward failed")

    model = Failing()
    with pytest.raises(RuntimeError, match="forward failed"):
        saved_tensor_bytes(model, torch.randn(1, 2))
    for module in model.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks


# --------------------------------------------------------------------------------------
# peak_memory


def test_peak_memory_linear_bounds():
    batch, in_features, out_features = 64, 100, 50
    model = nn.Linear(in_features, out_features, bias=False)
    result = peak_memory(model, torch.randn(batch, in_features))
    assert isinstance(result, PeakMemory)
    assert result.device == "cpu"
    output = batch * out_features * FLOAT
    weight_grad = out_features * in_features * FLOAT
    # At least the output and the weight gradient are alive together. Backward may
    # also materialise the output gradient once, plus a few scalars.
    assert result.peak_bytes >= output + weight_grad
    assert result.peak_bytes <= 2 * output + weight_grad + 1024


def test_peak_memory_grows_with_batch():
    model = conv_bn_relu(3, 16)
    small = peak_memory(model, torch.randn(2, 3, 16, 16)).peak_bytes
    large = peak_memory(model, torch.randn(8, 3, 16, 16)).peak_bytes
    assert large > 3 * small


def test_peak_memory_covers_saved_activations():
    model = conv_bn_relu(3, 16)
    x = torch.randn(4, 3, 16, 16)
    saved = saved_tensor_bytes(model, x)
    peak = peak_memory(model, x)
    input_bytes = x.numel() * FLOAT  # allocated before the step
    assert peak.peak_bytes >= saved.activation_bytes - input_bytes


def test_peak_memory_restores_grads_and_buffers():
    model = conv_bn_relu()
    sentinel = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = sentinel
    running_var = model[1].running_var.clone()
    model.eval()
    peak_memory(model, torch.randn(2, 3, 6, 6))
    assert model[0].weight.grad is sentinel
    assert model[1].weight.grad is None
    assert torch.equal(model[1].running_var, running_var)
    assert model.training is False


def test_peak_memory_needs_loss_for_tuple_output():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x):
            y = self.layer(x)
            return y, y * 2

    model = TwoOutputs()
    with pytest.raises(ValueError, match="pass a loss_fn"):
        peak_memory(model, torch.randn(2, 3))
    result = peak_memory(model, torch.randn(2, 3), loss_fn=lambda out: out[1].sum())
    assert result.peak_bytes > 0


def test_peak_memory_rejects_meta_device():
    model = nn.Linear(3, 3, device="meta")
    with pytest.raises(ValueError, match="CPU and CUDA"):
        peak_memory(model, torch.randn(2, 3, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_cuda_bounds():
    model = nn.Linear(256, 128, bias=False).cuda()
    x = torch.randn(512, 256, device="cuda")
    result = peak_memory(model, x)
    assert result.device.startswith("cuda")
    output = 512 * 128 * FLOAT
    weight_grad = 128 * 256 * FLOAT
    assert result.peak_bytes >= output + weight_grad
    # The caching allocator rounds blocks up to 512 bytes, and cuBLAS may add a
    # workspace, so the upper bound is loose.
    assert result.peak_bytes <= 3 * output + weight_grad + (8 << 20)
