r"""Internal covariate shift: the change of a layer's gradient when earlier layers move.

Santurkar, Tsipras, Ilyas and Madry (2018, "How Does Batch Normalization Help
Optimization?", https://arxiv.org/abs/1805.11604, definition 2.1) define the internal
covariate shift (ICS) of layer :math:`i` at step :math:`t`. It is the change of that
layer's gradient that the update of the layers before it causes, on the same batch
:math:`(x^{(t)}, y^{(t)})`:

.. math::

    G_{t,i} = \nabla_{W_i^{(t)}} \mathcal{L}(W_1^{(t)}, \dots, W_k^{(t)};
        x^{(t)}, y^{(t)})

    G'_{t,i} = \nabla_{W_i^{(t)}} \mathcal{L}(W_1^{(t+1)}, \dots, W_{i-1}^{(t+1)},
        W_i^{(t)}, \dots, W_k^{(t)}; x^{(t)}, y^{(t)})

They report :math:`\lVert G_{t,i} - G'_{t,i} \rVert_2` and the cosine of the angle
between the two gradients. :func:`ics_step` computes both for chosen layers. It runs
every forward pass through :func:`torch.func.functional_call`, with moved parameters
as new tensors and copies of the buffers. So the model, its ``.grad`` tensors, its BN
running statistics, the optimizer and the random number generators are left as they
were.

The helpers ``_probe_context`` and ``_loss_and_grads`` are shared with the landscape
probe.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from numbers import Real
from typing import Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd

from normlab.probes.activations import LayerSpec, resolve_layers, suspend_recording

LossFn = Callable[[Tensor, Tensor], Tensor]


def ics_step(
    model: nn.Module,
    layers: Sequence[LayerSpec] | None,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    optimizer_or_lr: Union[torch.optim.Optimizer, float],
) -> list[dict]:
    r"""Measure the internal covariate shift of each layer on one batch.

    For each layer :math:`i`, :math:`G` is the gradient of ``loss_fn(model(x), y)``
    with respect to the layer's ``weight`` at the current parameters. :math:`G'` is
    the same gradient after the parameters before the layer took one update, which is
    computed from the full gradient at the current parameters.

    "Before the layer" means every trainable parameter of ``model`` that
    ``model.named_parameters()`` lists before the layer's weight: the weights, biases
    and BN affine parameters of earlier layers, but not the layer's own bias.

    The update of those parameters is:

    - with an optimizer, the step that ``optimizer.step()`` would take now, including
      its momentum buffers, weight decay and other state. It is computed on a deep
      copy of the optimizer, whose parameters are copies of the model's, so the
      optimizer and the model are not changed. This gives the :math:`W^{(t+1)}` of
      the definition: the parameters that training moves to.
    - with a float ``lr``, plain SGD: :math:`W_j' = W_j - \mathrm{lr} \, \nabla_{W_j}
      \mathcal{L}`.

    Every forward pass runs in train mode (BN normalizes with batch statistics) and
    starts from the random state of the call. So dropout draws the same masks for
    :math:`G` and :math:`G'`, and the same as a training forward pass that starts
    from that state. BN running statistics are updated only on copies.

    Args:
        model (nn.Module): the network, with parameters in forward order.
        layers (sequence of modules or names, or None): the layers to measure, each
            with a parameter named ``weight``. ``None`` selects every ``nn.Linear``
            and convolution of ``model``.
        loss_fn (callable): ``loss_fn(model(x), y)`` returns the scalar loss.
        x (Tensor): the input batch.
        y (Tensor): the targets.
        optimizer_or_lr (Optimizer or float): the optimizer whose next step moves the
            earlier parameters, or a learning rate for plain SGD.

    Returns:
        One dict per layer, in the order of ``layers``: ``layer`` (qualified name),
        ``l2`` (:math:`\lVert G - G' \rVert_2`), ``cosine`` (:math:`\cos(G, G')`,
        NaN when :math:`G` or :math:`G'` is zero) and ``grad_norm``
        (:math:`\lVert G \rVert_2`). For a layer with no earlier trainable
        parameter, such as the first layer, :math:`G'` is :math:`G` and ``l2`` is
        exactly 0.

    Raises:
        ValueError: if a layer has no ``weight`` parameter, its weight gets no
            gradient, the loss is not a scalar, or ``lr`` is not positive.
        TypeError: if ``optimizer_or_lr`` is neither an optimizer nor a number.

    .. note::
        The order of ``named_parameters()`` is the order in which modules were
        registered. It matches the forward order in ``nn.Sequential`` models such as
        ``normlab.models.MLP`` and ``CNN``, but a model that registers a later layer
        first gets a wrong set of earlier parameters.
    """
    weights = _layer_weights(model, layers)
    if isinstance(optimizer_or_lr, torch.optim.Optimizer):
        optimizer, lr = optimizer_or_lr, None
    else:
        optimizer, lr = None, _check_lr(optimizer_or_lr)

    parameters = dict(model.named_parameters())
    order = {name: index for index, name in enumerate(parameters)}
    trainable = [name for name, p in parameters.items() if p.requires_grad]
    frozen = {name: p.detach() for name, p in parameters.items()}

    with _probe_context(model) as random_state:
        # G for every layer, and the full gradient that drives the earlier update
        _, grads = _loss_and_grads(
            model, parameters, trainable, loss_fn, x, y, random_state
        )
        if optimizer is not None:
            updated = _optimizer_update(model, optimizer, grads)
        else:
            updated = {
                name: frozen[name] - lr * grad
                for name, grad in grads.items()
                if grad is not None
            }

        rows = []
        for layer_name, weight_name in weights:
            grad = grads.get(weight_name)
            if grad is None:
                raise ValueError(
                    f"the weight of layer {layer_name!r} gets no gradient from the "
                    "loss; pass layers that the forward pass uses and that require grad"
                )
            earlier = {
                name: tensor
                for name, tensor in updated.items()
                if order[name] < order[weight_name]
            }
            if not earlier:
                shifted_grad = grad
            else:
                # G': earlier parameters moved, this layer and later ones unchanged
                moved = {**frozen, **earlier}
                moved[weight_name] = frozen[weight_name].clone().requires_grad_()
                _, shifted = _loss_and_grads(
                    model, moved, [weight_name], loss_fn, x, y, random_state
                )
                shifted_grad = shifted[weight_name]
            rows.append(_compare_gradients(layer_name, grad, shifted_grad))
    return rows


def _layer_weights(
    model: nn.Module, layers: Sequence[LayerSpec] | None
) -> list[tuple[str, str]]:
    """Return ``(layer name, qualified parameter name of its weight)`` per layer."""
    if layers is None:
        resolved = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, _ConvNd))
        ]
        if not resolved:
            raise ValueError(
                "the model has no nn.Linear or convolution layer; pass layers "
                "explicitly"
            )
    else:
        resolved = resolve_layers(model, layers)
        if not resolved:
            raise ValueError("layers is empty; pass at least one layer or None")

    names_by_id = {id(p): name for name, p in model.named_parameters()}
    weights = []
    for layer_name, module in resolved:
        weight = module._parameters.get("weight")
        if weight is None:
            raise ValueError(
                f"layer {layer_name!r} ({type(module).__name__}) has no parameter "
                "named weight; parametrized weights such as weight normalization are "
                "not supported, so pass layers whose weight is an nn.Parameter"
            )
        weights.append((layer_name, names_by_id[id(weight)]))
    return weights


def _check_lr(lr: object) -> float:
    if isinstance(lr, bool) or not isinstance(lr, Real):
        raise TypeError(
            f"optimizer_or_lr must be a torch.optim.Optimizer or a float, got "
            f"{type(lr).__name__}"
        )
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    return float(lr)


def _optimizer_update(
    model: nn.Module, optimizer: torch.optim.Optimizer, grads: dict[str, Tensor | None]
) -> dict[str, Tensor]:
    """Return the parameters after ``optimizer.step()`` with ``grads``, by name.

    The step runs on a deep copy of the optimizer. ``Optimizer.__getstate__`` copies
    only its defaults, state and parameter groups, so the copy's parameters and
    momentum buffers are new tensors and the copy has none of the original's hooks.
    Parameters without a gradient are skipped by the step and left out of the result.

    NOTE: optimizers whose ``step`` requires a closure, such as LBFGS, raise here.
    """
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    shadow = copy.deepcopy(optimizer)
    stepped = {}
    pairs = zip(optimizer.param_groups, shadow.param_groups)
    for group, shadow_group in pairs:
        for parameter, shadow_parameter in zip(group["params"], shadow_group["params"]):
            name = names_by_id.get(id(parameter))
            grad = grads.get(name) if name is not None else None
            # a clone, because some optimizers modify the gradient in place
            shadow_parameter.grad = None if grad is None else grad.detach().clone()
            if grad is not None:
                stepped[name] = shadow_parameter
    shadow.step()
    return {name: parameter.detach() for name, parameter in stepped.items()}


def _compare_gradients(layer: str, grad: Tensor, shifted_grad: Tensor) -> dict:
    g = grad.detach().reshape(-1).to(torch.float64)
    g_shifted = shifted_grad.detach().reshape(-1).to(torch.float64)
    norm = float(g.norm())
    shifted_norm = float(g_shifted.norm())
    if norm > 0 and shifted_norm > 0:
        cosine = float(torch.dot(g, g_shifted)) / (norm * shifted_norm)
    else:
        cosine = math.nan
    return {
        "layer": layer,
        "l2": float((g - g_shifted).norm()),
        "cosine": cosine,
        "grad_norm": norm,
    }


class _RandomState:
    """The CPU and CUDA generator states at creation, to restore before each forward."""

    def __init__(self, cuda_devices: list[int]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [
            (device, torch.cuda.get_rng_state(device)) for device in cuda_devices
        ]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def _probe_context(model: nn.Module) -> Iterator[_RandomState]:
    """Run a probe's forward passes in train mode without changing any outer state.

    Inside the block the model is in train mode, gradients are enabled, activation
    recorders ignore forward passes and the yielded :class:`_RandomState` resets the
    generators. On exit each module's train flag and the random state are restored.
    """
    cuda_devices = sorted(
        {t.device.index for t in model.parameters() if t.device.type == "cuda"}
    )
    flags = [(module, module.training) for module in model.modules()]
    with torch.random.fork_rng(devices=cuda_devices), suspend_recording():
        random_state = _RandomState(cuda_devices)
        model.train()
        try:
            with torch.enable_grad():
                yield random_state
        finally:
            for module, training in flags:
                module.training = training


def _loss_and_grads(
    model: nn.Module,
    parameters: dict[str, Tensor],
    names: Sequence[str],
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    random_state: _RandomState,
) -> tuple[float, dict[str, Tensor | None]]:
    """Return the loss at ``parameters`` and its gradient for each of ``names``.

    The forward pass uses copies of the model's buffers, so BN running statistics are
    updated on the copies only. The gradient is ``None`` for a parameter the loss does
    not depend on. ``parameters[name]`` must require grad for every name in ``names``.
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    random_state.restore()
    output = functional_call(model, {**parameters, **buffers}, (x,))
    loss = loss_fn(output, y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, got {shape}; reduce the loss with "
            "a mean or a sum"
        )
    inputs = [parameters[name] for name in names]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else ()
    return float(loss.detach()), dict(zip(names, grads))
