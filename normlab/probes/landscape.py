r"""The loss and its gradient along the gradient direction, without changing the model.

Santurkar, Tsipras, Ilyas and Madry (2018, "How Does Batch Normalization Help
Optimization?", https://arxiv.org/abs/1805.11604, section 3.1 and figure 4) compare
networks with and without BatchNorm by moving from the current parameters :math:`w`
along the gradient :math:`g = \nabla \mathcal{L}(w)` and measuring, over a range of
step sizes :math:`\eta`:

- the variation of the loss, :math:`\max_\eta \mathcal{L}(w - \eta g) -
  \min_\eta \mathcal{L}(w - \eta g)`;
- the gradient predictiveness, :math:`\max_\eta \lVert \nabla \mathcal{L}(w - \eta g)
  - \nabla \mathcal{L}(w) \rVert_2` (smaller means more predictive);
- the effective :math:`\beta`-smoothness, :math:`\max_\eta \lVert \nabla
  \mathcal{L}(w - \eta g) - \nabla \mathcal{L}(w) \rVert_2 / \lVert \eta g \rVert_2`.

:func:`landscape_step` computes them on one batch. Norms run over all trainable
parameters of the model, flattened into one vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normlab.probes.ics import LossFn, _loss_and_grads, _probe_context

# Step sizes of the default grid as fractions of the learning rate.
DEFAULT_STEP_RANGE = (0.05, 0.4)


def default_step_sizes(lr: float, num: int = 8) -> list[float]:
    """Return ``num`` step sizes from ``0.05 * lr`` to ``0.4 * lr``, evenly spaced on a
    log scale.

    ``num=4`` gives ``[0.05, 0.1, 0.2, 0.4] * lr``, and the default ``num=8`` puts
    three more points between each of those.

    Raises:
        ValueError: if ``lr`` is not positive or ``num`` is less than 2.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if num < 2:
        raise ValueError(f"num must be at least 2 to span the range, got {num}")
    low, high = DEFAULT_STEP_RANGE
    ratio = high / low
    return [lr * low * ratio ** (k / (num - 1)) for k in range(num)]


def landscape_step(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    step_sizes: Sequence[float],
) -> dict:
    r"""Measure the loss and the gradient at :math:`w - \eta g` for each step size.

    :math:`w` are the model's trainable parameters and :math:`g` the gradient of
    ``loss_fn(model(x), y)`` at :math:`w`. Each forward pass runs in train mode, as
    training does, on copies of the parameters and buffers, and starts from the random
    state of the call. The model, its ``.grad`` tensors, its BN running statistics and
    the random number generators are left as they were.

    Args:
        model (nn.Module): the network.
        loss_fn (callable): ``loss_fn(model(x), y)`` returns the scalar loss.
        x (Tensor): the input batch.
        y (Tensor): the targets.
        step_sizes (sequence of float): the positive step sizes :math:`\eta`, in units
            of parameter change per unit gradient, like a learning rate. For the grid
            of 0.05 to 0.4 times the learning rate, pass
            ``default_step_sizes(lr)``.

    Returns:
        A dict with

        - ``loss``: :math:`\mathcal{L}(w)`;
        - ``grad_norm``: :math:`\lVert g \rVert_2`;
        - ``step_sizes``: the step sizes, as given;
        - ``losses``: :math:`\mathcal{L}(w - \eta g)` per step size;
        - ``grad_distances``: :math:`\lVert \nabla \mathcal{L}(w - \eta g) - g
          \rVert_2` per step size;
        - ``loss_variation``: ``max(losses) - min(losses)``;
        - ``gradient_predictiveness``: ``max(grad_distances)``;
        - ``beta_smoothness``: the maximum of ``grad_distances`` divided by
          :math:`\eta \lVert g \rVert_2`, NaN when :math:`g = 0`.

    Raises:
        ValueError: if ``step_sizes`` is empty or contains a step size that is not
            positive and finite, or the loss is not a scalar.
    """
    steps = _check_step_sizes(step_sizes)
    parameters = dict(model.named_parameters())
    trainable = [name for name, p in parameters.items() if p.requires_grad]
    frozen = {name: p.detach() for name, p in parameters.items()}

    with _probe_context(model) as random_state:
        loss, grads = _loss_and_grads(
            model, parameters, trainable, loss_fn, x, y, random_state
        )
        grad = _flatten(grads, frozen)
        grad_norm = float(grad.norm())

        losses, distances, smoothness = [], [], []
        for eta in steps:
            # w - eta * g, with fresh leaves so that autograd returns their gradient
            moved = dict(frozen)
            for name in trainable:
                step = grads[name]
                start = frozen[name] if step is None else frozen[name] - eta * step
                moved[name] = start.clone().requires_grad_()
            moved_loss, moved_grads = _loss_and_grads(
                model, moved, trainable, loss_fn, x, y, random_state
            )
            distance = float((_flatten(moved_grads, frozen) - grad).norm())
            losses.append(moved_loss)
            distances.append(distance)
            if grad_norm > 0:
                smoothness.append(distance / (eta * grad_norm))

    return {
        "loss": loss,
        "grad_norm": grad_norm,
        "step_sizes": list(step_sizes),
        "losses": losses,
        "grad_distances": distances,
        "loss_variation": max(losses) - min(losses),
        "gradient_predictiveness": max(distances),
        "beta_smoothness": max(smoothness) if smoothness else math.nan,
    }


def _check_step_sizes(step_sizes: Sequence[float]) -> list[float]:
    steps = [float(eta) for eta in step_sizes]
    if not steps:
        raise ValueError("step_sizes is empty; pass e.g. default_step_sizes(lr)")
    for eta in steps:
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"step sizes must be positive and finite, got {eta}")
    return steps


def _flatten(grads: dict[str, Tensor | None], frozen: dict[str, Tensor]) -> Tensor:
    """Concatenate the gradients in float64, with zeros for parameters without one."""
    pieces = []
    for name, grad in grads.items():
        if grad is None:
            grad = torch.zeros_like(frozen[name])
        pieces.append(grad.detach().reshape(-1).to(torch.float64))
    if not pieces:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(pieces)
