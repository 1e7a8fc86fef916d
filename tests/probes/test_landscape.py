"""Tests for normlab.probes.landscape: loss and gradient along the gradient direction.

The closed forms use a quadratic "model" whose output is its parameter ``w`` and whose
loss is ``L(w) = 1/2 w^T A w`` with a diagonal ``A``. Then ``g = A w``, and at
``w - eta g``:

- ``L(w - eta g) = 1/2 w^T A w - eta w^T A^2 w + 1/2 eta^2 w^T A^3 w``,
- ``grad L(w - eta g) - g = -eta A^2 w``, so the gradient distance is
  ``eta ||A^2 w||`` and the effective beta-smoothness is ``||A^2 w|| / ||A w||``,
  which is the eigenvalue ``lambda`` when ``w`` is an eigenvector of ``A``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.models import MLP
from normlab.probes import default_step_sizes, landscape_step


class Quadratic(nn.Module):
    """A model whose output is its parameter, ignoring the input."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def quadratic_loss(a: torch.Tensor):
    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * output @ a @ output

    return loss_fn


def closed_form_loss(a: torch.Tensor, w: torch.Tensor, eta: float) -> float:
    a2, a3 = a @ a, a @ a @ a
    return (0.5 * w @ a @ w - eta * w @ a2 @ w + 0.5 * eta**2 * w @ a3 @ w).item()


DUMMY_X = torch.zeros(1)
DUMMY_Y = torch.zeros(1)
A = torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))


def test_landscape_eigenvector_gives_eigenvalue():
    w = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    steps = [0.01, 0.02, 0.04]

    result = landscape_step(Quadratic(w), quadratic_loss(A), DUMMY_X, DUMMY_Y, steps)

    # g = A w = (0, 0, 10), so ||g|| = 10 and every ratio is lambda = 5
    assert result["grad_norm"] == pytest.approx(10.0, rel=1e-12)
    assert result["beta_smoothness"] == pytest.approx(5.0, rel=1e-12)
    # the largest distance is eta_max * lambda^2 * ||w|| = 0.04 * 25 * 2
    assert result["gradient_predictiveness"] == pytest.approx(2.0, rel=1e-12)


def test_landscape_quadratic_closed_form():
    w = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    steps = [0.05, 0.1, 0.2, 0.4]
    a2w = A @ A @ w

    result = landscape_step(Quadratic(w), quadratic_loss(A), DUMMY_X, DUMMY_Y, steps)

    expected_losses = [closed_form_loss(A, w, eta) for eta in steps]
    assert result["step_sizes"] == steps
    assert result["loss"] == pytest.approx(closed_form_loss(A, w, 0.0), rel=1e-12)
    assert result["losses"] == pytest.approx(expected_losses, rel=1e-12)
    assert result["loss_variation"] == pytest.approx(
        max(expected_losses) - min(expected_losses), rel=1e-10
    )
    expected_distances = [eta * a2w.norm().item() for eta in steps]
    assert result["grad_distances"] == pytest.approx(expected_distances, rel=1e-12)
    assert result["gradient_predictiveness"] == pytest.approx(
        max(expected_distances), rel=1e-12
    )
    expected_beta = (a2w.norm() / (A @ w).norm()).item()
    assert result["beta_smoothness"] == pytest.approx(expected_beta, rel=1e-12)


def test_landscape_zero_gradient_has_nan_smoothness():
    w = torch.zeros(3, dtype=torch.float64)

    result = landscape_step(Quadratic(w), quadratic_loss(A), DUMMY_X, DUMMY_Y, [0.1])

    assert result["grad_norm"] == 0.0
    assert result["loss_variation"] == 0.0
    assert result["gradient_predictiveness"] == 0.0
    assert math.isnan(result["beta_smoothness"])


def test_landscape_leaves_model_unchanged():
    torch.manual_seed(0)
    model = MLP(6, hidden=(8, 8), out_features=3, norm="batchnorm", dropout=0.1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    F.cross_entropy(model(x), y).backward()
    model.eval()
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    result = landscape_step(model, F.cross_entropy, x, y, default_step_sizes(0.1))

    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for parameter, grad in zip(model.parameters(), grads):
        assert torch.equal(parameter.grad, grad)
    assert all(not module.training for module in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(result["losses"]) == 8
    assert result["beta_smoothness"] > 0.0


def test_landscape_gradient_matches_train_mode_backward():
    torch.manual_seed(0)
    model = MLP(6, hidden=(8,), out_features=3, norm="batchnorm")
    x = torch.randn(16, 6)
    y = torch.randint(0, 3, (16,))

    result = landscape_step(model, F.cross_entropy, x, y, [0.01])

    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grad_norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert result["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-5)


def test_default_step_sizes_log_grid():
    assert default_step_sizes(1.0, num=4) == pytest.approx([0.05, 0.1, 0.2, 0.4])
    sizes = default_step_sizes(0.1)
    assert len(sizes) == 8
    assert sizes[0] == pytest.approx(0.005)
    assert sizes[-1] == pytest.approx(0.04)
    ratios = [later / earlier for earlier, later in zip(sizes, sizes[1:])]
    assert ratios == pytest.approx([ratios[0]] * 7)


def test_landscape_rejects_invalid_arguments():
    model = Quadratic(torch.ones(3, dtype=torch.float64))
    loss_fn = quadratic_loss(A)

    with pytest.raises(ValueError, match="step_sizes is empty"):
        landscape_step(model, loss_fn, DUMMY_X, DUMMY_Y, [])
    with pytest.raises(ValueError, match="positive and finite"):
        landscape_step(model, loss_fn, DUMMY_X, DUMMY_Y, [0.1, -0.1])
    with pytest.raises(ValueError, match="positive and finite"):
        landscape_step(model, loss_fn, DUMMY_X, DUMMY_Y, [math.inf])
    with pytest.raises(ValueError, match="lr must be a positive"):
        default_step_sizes(0.0)
    with pytest.raises(ValueError, match="num must be at least 2"):
        default_step_sizes(0.1, num=1)
