"""Tests for normlab.probes.activations: percentiles of layer inputs, gradient norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normlab.models import MLP
from normlab.probes import (
    ActivationRecorder,
    grad_norms,
    percentiles,
    suspend_recording,
)


def sigmoid_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(5, hidden=(7, 6), out_features=3, norm="none", activation="sigmoid")


@pytest.mark.parametrize("size", [1, 2, 4, 101, 1000])
def test_percentiles_match_torch_and_numpy(size):
    generator = torch.Generator().manual_seed(size)
    values = torch.randn(size, generator=generator)
    q = [0.0, 15.0, 50.0, 85.0, 100.0]

    result = percentiles(values.reshape(-1, 1), q)

    expected_torch = torch.quantile(values.double(), torch.tensor(q).double() / 100)
    expected_numpy = np.percentile(values.double().numpy(), q)
    assert result == pytest.approx(expected_torch.tolist(), rel=1e-12, abs=1e-12)
    assert result == pytest.approx(expected_numpy.tolist(), rel=1e-12, abs=1e-12)


def test_percentiles_known_values():
    # In 0..100 the p-th percentile is p. In 1..4 the 15th lies at h = 0.45, so 1.45.
    assert percentiles(torch.arange(101.0)) == [15.0, 50.0, 85.0]
    assert percentiles(torch.tensor([4.0, 1.0, 3.0, 2.0])) == pytest.approx(
        [1.45, 2.5, 3.55]
    )


def test_percentiles_rejects_invalid_input():
    with pytest.raises(ValueError, match="empty tensor"):
        percentiles(torch.zeros(0))
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentiles(torch.ones(3), [101.0])


def test_recorder_records_sigmoid_inputs():
    model = sigmoid_mlp()
    x = torch.randn(32, 5)
    model.train()

    with ActivationRecorder(model) as recorder:
        model(x)
        model(x * 2)

    # the pre-activation of the first sigmoid is the output of the first linear layer
    first_input = model.layers[:3](x)
    values = first_input.detach().double().reshape(-1)
    expected = torch.quantile(values, torch.tensor([0.15, 0.5, 0.85]).double())
    assert [row["layer"] for row in recorder.history] == [
        "layers.3",
        "layers.6",
        "layers.3",
        "layers.6",
    ]
    assert [row["step"] for row in recorder.history] == [1, 1, 2, 2]
    first = recorder.history[0]
    assert [first["p15"], first["p50"], first["p85"]] == pytest.approx(
        expected.tolist(), rel=1e-6
    )
    assert set(first) == {"step", "layer", "p15", "p50", "p85"}


def test_recorder_removes_hooks_on_exit():
    model = sigmoid_mlp()
    x = torch.randn(8, 5)

    with ActivationRecorder(model) as recorder:
        assert len(model._forward_pre_hooks) == 1
        assert len(model.layers[3]._forward_pre_hooks) == 1
    model(x)

    assert recorder.history == []
    assert all(not module._forward_pre_hooks for module in model.modules())
    assert all(not module._forward_hooks for module in model.modules())


def test_recorder_removes_hooks_when_block_raises():
    model = sigmoid_mlp()

    with pytest.raises(RuntimeError, match="inside"):
        with ActivationRecorder(model, record="output"):
            raise RuntimeError("inside")

    assert all(not module._forward_pre_hooks for module in model.modules())
    assert all(not module._forward_hooks for module in model.modules())


def test_recorder_skips_eval_and_suspended_passes():
    model = sigmoid_mlp()
    x = torch.randn(8, 5)

    with ActivationRecorder(model) as recorder:
        model.eval()
        model(x)
        model.train()
        with suspend_recording():
            model(x)
        model(x)

    assert recorder.step == 1
    assert [row["step"] for row in recorder.history] == [1, 1]


def test_recorder_records_eval_when_not_train_only():
    model = sigmoid_mlp().eval()

    with ActivationRecorder(model, train_only=False) as recorder:
        model(torch.randn(8, 5))

    assert recorder.step == 1
    assert len(recorder.history) == 2


def test_recorder_chosen_layer_output():
    model = sigmoid_mlp()
    x = torch.randn(16, 5)

    layers = [model.layers[4]]
    with ActivationRecorder(model, layers=layers, record="output") as recorder:
        model(x)

    output = model.layers[:5](x).detach()
    assert [row["layer"] for row in recorder.history] == ["layers.4"]
    # 96 values: the median interpolates between the middle two, as torch.quantile does
    expected = torch.quantile(output.double().reshape(-1), 0.5).item()
    assert recorder.history[0]["p50"] == pytest.approx(expected, rel=1e-6)


def test_recorder_grad_norms_per_step():
    model = sigmoid_mlp()
    x = torch.randn(16, 5)

    with ActivationRecorder(model) as recorder:
        model(x).square().mean().backward()
        norms = recorder.record_grad_norms()

    assert set(norms) == {"layers.1", "layers.4", "layers.7"}
    expected = model.layers[4].weight.grad.norm().item()
    assert norms["layers.4"] == pytest.approx(expected, rel=1e-6)
    assert {row["step"] for row in recorder.grad_norm_history} == {1}
    assert len(recorder.grad_norm_history) == 3


def test_grad_norms_skip_missing_grads():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    assert grad_norms(model) == {}
    model[2].weight.grad = torch.full((1, 2), 3.0)
    assert grad_norms(model) == {"2": pytest.approx(18.0**0.5)}


def test_recorder_rejects_invalid_arguments():
    model = nn.Sequential(nn.Linear(3, 2))

    with pytest.raises(ValueError, match="no layers to record"):
        ActivationRecorder(model)
    with pytest.raises(ValueError, match="record must be"):
        ActivationRecorder(model, layers=["0"], record="gradient")
    with pytest.raises(ValueError, match="not a submodule"):
        ActivationRecorder(model, layers=[nn.ReLU()])
    with pytest.raises(TypeError, match="modules or qualified names"):
        ActivationRecorder(model, layers=[3])
