"""Tests for normlab.probes.ics: internal covariate shift as a change of gradients.

The hand computations use a two-layer linear network without biases,
``f(x) = W2 W1 x``, and the loss ``L = 1/(2N) * sum ||f(x) - y||^2``. With the
residual ``R = X W1^T W2^T - Y`` (N rows):

- ``dL/dW2 = R^T (X W1^T) / N``,
- ``dL/dW1 = W2^T R^T X / N``,

and G' of the second layer is ``dL/dW2`` recomputed after ``W1`` took its update.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.models import MLP
from normlab.probes import (
    ActivationRecorder,
    default_step_sizes,
    ics_step,
    landscape_step,
)


def half_squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((output - target) ** 2).sum() / len(output)


def linear_net(w1: torch.Tensor, w2: torch.Tensor) -> nn.Sequential:
    first = nn.Linear(w1.shape[1], w1.shape[0], bias=False).to(w1.dtype)
    second = nn.Linear(w2.shape[1], w2.shape[0], bias=False).to(w2.dtype)
    with torch.no_grad():
        first.weight.copy_(w1)
        second.weight.copy_(w2)
    return nn.Sequential(first, second)


def hand_gradients(w1, w2, x, y):
    n = len(x)
    residual = x @ w1.T @ w2.T - y
    grad_w2 = residual.T @ (x @ w1.T) / n
    grad_w1 = w2.T @ residual.T @ x / n
    return grad_w1, grad_w2


def bn_mlp(seed: int = 0, dropout: float = 0.1) -> MLP:
    torch.manual_seed(seed)
    return MLP(6, hidden=(8, 8), out_features=3, norm="batchnorm", dropout=dropout)


def batch(seed: int = 1, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 6, generator=generator)
    y = torch.randint(0, 3, (size,), generator=generator)
    return x, y


def test_ics_scalar_network_by_hand():
    # a = 1, b = 2, x = 1, y = 0, lr = 0.1:
    # r = b a x - y = 2, G_a = r b x = 4, G_b = r a x = 2,
    # a' = a - 0.1 * 4 = 0.6, r' = b a' x - y = 1.2, G_b' = r' a' x = 0.72
    model = linear_net(torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    x, y = torch.tensor([[1.0]]), torch.tensor([[0.0]])

    rows = ics_step(model, [model[0], model[1]], half_squared_error, x, y, 0.1)

    assert [row["layer"] for row in rows] == ["0", "1"]
    assert rows[0]["l2"] == 0.0
    assert rows[1]["l2"] == pytest.approx(2.0 - 0.72, rel=1e-6)
    assert rows[1]["cosine"] == pytest.approx(1.0)
    assert rows[1]["grad_norm"] == pytest.approx(2.0)


def test_ics_matrix_network_by_hand():
    generator = torch.Generator().manual_seed(0)
    w1 = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    w2 = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    lr = 0.05
    model = linear_net(w1, w2)

    grad_w1, grad_w2 = hand_gradients(w1, w2, x, y)
    _, shifted_w2 = hand_gradients(w1 - lr * grad_w1, w2, x, y)
    expected_l2 = (grad_w2 - shifted_w2).norm().item()
    expected_cosine = (
        (grad_w2 * shifted_w2).sum() / (grad_w2.norm() * shifted_w2.norm())
    ).item()

    rows = ics_step(model, None, half_squared_error, x, y, lr)

    assert rows[0]["l2"] == 0.0
    assert rows[0]["grad_norm"] == pytest.approx(grad_w1.norm().item(), rel=1e-12)
    assert rows[1]["l2"] == pytest.approx(expected_l2, rel=1e-10)
    assert rows[1]["cosine"] == pytest.approx(expected_cosine, rel=1e-12)
    assert rows[1]["grad_norm"] == pytest.approx(grad_w2.norm().item(), rel=1e-12)


def test_ics_momentum_optimizer_by_hand():
    generator = torch.Generator().manual_seed(1)
    w1 = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    w2 = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    x0 = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    y0 = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    lr, momentum = 0.05, 0.9
    model = linear_net(w1, w2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    # one real step on another batch fills the momentum buffers
    optimizer.zero_grad()
    half_squared_error(model(x0), y0).backward()
    optimizer.step()
    w1_now = model[0].weight.detach().clone()
    w2_now = model[1].weight.detach().clone()
    buffer_w1 = optimizer.state[model[0].weight]["momentum_buffer"].clone()

    # torch SGD with dampening 0: buf = momentum * buf + grad, w = w - lr * buf
    grad_w1, grad_w2 = hand_gradients(w1_now, w2_now, x, y)
    w1_next = w1_now - lr * (momentum * buffer_w1 + grad_w1)
    _, shifted_w2 = hand_gradients(w1_next, w2_now, x, y)
    expected_l2 = (grad_w2 - shifted_w2).norm().item()

    rows = ics_step(model, None, half_squared_error, x, y, optimizer)

    assert rows[1]["l2"] == pytest.approx(expected_l2, rel=1e-10)
    plain_sgd = ics_step(model, None, half_squared_error, x, y, lr)
    assert plain_sgd[1]["l2"] != pytest.approx(expected_l2, rel=1e-3)


def test_ics_plain_sgd_optimizer_matches_lr():
    model = bn_mlp(dropout=0.0)
    x, y = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    with_optimizer = ics_step(model, None, F.cross_entropy, x, y, optimizer)
    with_lr = ics_step(model, None, F.cross_entropy, x, y, 0.1)

    for row_optimizer, row_lr in zip(with_optimizer, with_lr):
        assert row_optimizer["layer"] == row_lr["layer"]
        assert row_optimizer["l2"] == pytest.approx(row_lr["l2"], rel=1e-5, abs=1e-9)


def test_ics_first_layer_exactly_zero():
    model = bn_mlp()
    x, y = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    rows = ics_step(model, None, F.cross_entropy, x, y, optimizer)

    assert [row["layer"] for row in rows] == ["layers.1", "layers.5", "layers.9"]
    assert rows[0]["l2"] == 0.0
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert rows[1]["l2"] > 0.0
    assert rows[2]["l2"] > 0.0


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [
            None if p.grad is None else p.grad.clone() for p in model.parameters()
        ],
        "flags": [module.training for module in model.modules()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for grad_before, grad_after in zip(before["grads"], after["grads"]):
        assert (grad_before is None) == (grad_after is None)
        if grad_before is not None:
            assert torch.equal(grad_before, grad_after)
    assert before["flags"] == after["flags"]
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]
    state_before = before["optimizer"]["state"]
    state_after = after["optimizer"]["state"]
    assert state_before.keys() == state_after.keys()
    for index in state_before:
        for key, value in state_before[index].items():
            assert torch.equal(value, state_after[index][key]), (index, key)
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ics_leaves_model_and_optimizer_unchanged(mode):
    model = bn_mlp()
    x, y = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # one real step, so the running statistics, momentum buffers and .grad are set
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    getattr(model, mode)()
    before = snapshot(model, optimizer)

    ics_step(model, None, F.cross_entropy, x, y, optimizer)

    assert_same_snapshot(before, snapshot(model, optimizer))


def test_ics_differs_with_batchnorm():
    torch.manual_seed(0)
    first, second = nn.Linear(4, 8, bias=False), nn.Linear(8, 3)
    plain = nn.Sequential(first, nn.ReLU(), second)
    normalized = nn.Sequential(
        copy.deepcopy(first), nn.BatchNorm1d(8), nn.ReLU(), copy.deepcopy(second)
    )
    x = torch.randn(32, 4) * 3 + 1
    y = torch.randint(0, 3, (32,))

    rows_plain = ics_step(plain, None, F.cross_entropy, x, y, 0.5)
    rows_normalized = ics_step(normalized, None, F.cross_entropy, x, y, 0.5)

    assert rows_plain[1]["l2"] > 0.0
    assert rows_normalized[1]["l2"] > 0.0
    assert rows_plain[1]["l2"] != pytest.approx(rows_normalized[1]["l2"], rel=1e-3)


def test_ics_not_recorded_by_activation_recorder():
    model = bn_mlp()
    x, y = batch()

    with ActivationRecorder(model) as recorder:
        ics_step(model, None, F.cross_entropy, x, y, 0.1)

    assert recorder.history == []
    assert recorder.step == 0


def test_ics_rejects_invalid_arguments():
    model = bn_mlp()
    x, y = batch()

    with pytest.raises(ValueError, match="no parameter named weight"):
        ics_step(model, ["layers.3"], F.cross_entropy, x, y, 0.1)
    with pytest.raises(ValueError, match="not a submodule"):
        ics_step(model, ["layers.99"], F.cross_entropy, x, y, 0.1)
    with pytest.raises(ValueError, match="lr must be a positive"):
        ics_step(model, None, F.cross_entropy, x, y, 0.0)
    with pytest.raises(ValueError, match="lr must be a positive"):
        ics_step(model, None, F.cross_entropy, x, y, math.nan)
    with pytest.raises(TypeError, match="optimizer_or_lr"):
        ics_step(model, None, F.cross_entropy, x, y, "0.1")
    with pytest.raises(ValueError, match="scalar tensor"):
        ics_step(model, None, nn.CrossEntropyLoss(reduction="none"), x, y, 0.1)


def train_steps(with_probes: bool, num_steps: int = 5):
    model = bn_mlp(seed=3, dropout=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(5)
    losses = []
    model.train()
    for _ in range(num_steps):
        x = torch.randn(16, 6, generator=generator)
        y = torch.randint(0, 3, (16,), generator=generator)
        if with_probes:
            ics_step(model, None, F.cross_entropy, x, y, optimizer)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if with_probes:
            # after backward, so that a probe touching .grad would change the step
            landscape_step(model, F.cross_entropy, x, y, default_step_sizes(0.1))
            ics_step(model, None, F.cross_entropy, x, y, 0.1)
        optimizer.step()
        losses.append(loss.detach())
    return model, losses


def test_probes_leave_training_trajectory_unchanged():
    model_plain, losses_plain = train_steps(with_probes=False)
    model_probed, losses_probed = train_steps(with_probes=True)

    state_plain = model_plain.state_dict()
    state_probed = model_probed.state_dict()
    assert any("running_mean" in key for key in state_plain)
    for key in state_plain:
        assert torch.equal(state_plain[key], state_probed[key]), key
    for loss_plain, loss_probed in zip(losses_plain, losses_probed):
        assert torch.equal(loss_plain, loss_probed)
