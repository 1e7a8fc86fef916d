r"""Weight normalization as a parametrization, with the data-dependent initialization.

Salimans and Kingma, "Weight Normalization: A Simple Reparameterization to Accelerate
Training of Deep Neural Networks", 2016 (https://arxiv.org/abs/1602.07868), write each
output unit's weight vector as a length ``g`` times a direction ``v / ||v||``:

.. math::

    w = g \frac{v}{\lVert v \rVert}

:func:`weight_norm` registers :class:`WeightNorm` on a layer with
:func:`torch.nn.utils.parametrize.register_parametrization`, so ``layer.weight`` is
recomputed from ``g`` and ``v`` at each access and autograd differentiates through it.
``g`` and ``v`` are parameters of the :class:`WeightNorm` module, and appear in the
state_dict as ``parametrizations.weight.0.g`` and ``parametrizations.weight.0.v``.
:func:`torch.nn.utils.parametrizations.weight_norm` computes the same weight but names
the tensors ``original0`` and ``original1``.
"""

import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

__all__ = ["WeightNorm", "init_weight_norm_", "remove_weight_norm", "weight_norm"]


class WeightNorm(nn.Module):
    r"""The parametrization :math:`w = g \, v / \lVert v \rVert` of one weight tensor.

    The norm runs over all dimensions of ``v`` except ``dim``, so each index along
    ``dim`` (each output unit) has its own length ``g``.

    Args:
        weight (Tensor): the weight to reparametrize. ``v`` starts as a copy of it and
            ``g`` as its norm, so the weight is unchanged at registration.
        dim (int): the dimension of the output units, in ``[0, weight.dim())``: 0 for
            Linear and Conv weights, 1 for ConvTranspose weights.

    Attributes:
        g (Parameter): lengths, of shape ``(weight.size(dim),)``.
        v (Parameter): directions, of the weight's shape.

    .. note::
        :meth:`right_inverse` returns an empty tuple, so
        :mod:`torch.nn.utils.parametrize` stores no ``original`` tensor and calls
        :meth:`forward` with no argument. torch 2.13 supports this, and the tests
        check the forward, state_dict, deepcopy and removal paths that rely on it.
    """

    def __init__(self, weight: Tensor, dim: int) -> None:
        super().__init__()
        if not 0 <= dim < weight.dim():
            raise ValueError(
                f"dim must be in [0, {weight.dim()}) for a weight of shape "
                f"{tuple(weight.shape)}, got {dim}"
            )
        self.dim = dim
        self.norm_dims = tuple(d for d in range(weight.dim()) if d != dim)
        # g broadcasts against v through this shape, e.g. (-1, 1, 1, 1) for dim=0.
        self._g_view = tuple(-1 if d == dim else 1 for d in range(weight.dim()))
        factory_kwargs = {"device": weight.device, "dtype": weight.dtype}
        self.g = nn.Parameter(torch.empty(weight.size(dim), **factory_kwargs))
        self.v = nn.Parameter(torch.empty_like(weight))
        self.right_inverse(weight)

    def right_inverse(self, weight: Tensor) -> tuple[()]:
        """Set ``v`` to ``weight`` and ``g`` to its norm, and return no tensor.

        The parametrization then returns ``weight``. parametrize calls this at
        registration and on ``layer.weight = value``.
        """
        with torch.no_grad():
            self.v.copy_(weight)
            self.g.copy_(torch.linalg.vector_norm(weight, dim=self.norm_dims))
        return ()

    def forward(self) -> Tensor:
        # NOTE: a v with a zero-norm slice along dim gives NaN in that slice, as
        # torch.nn.utils.parametrizations.weight_norm does.
        norm = torch.linalg.vector_norm(self.v, dim=self.norm_dims, keepdim=True)
        return self.v * (self.g.view(self._g_view) / norm)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _class_name(module: nn.Module) -> str:
    # "Linear", not the "ParametrizedLinear" class that parametrize substitutes.
    return parametrize.type_before_parametrizations(module).__name__


def _layer_label(name: str, module: nn.Module) -> str:
    # "Linear '0.fc'" for error messages, or "Linear (the model)" for the root.
    if not name:
        return f"{_class_name(module)} (the model)"
    return f"{_class_name(module)} {name!r}"


def _find_weight_norm(module: nn.Module, name: str) -> WeightNorm | None:
    # The WeightNorm registered on module.<name> by weight_norm, or None.
    if not parametrize.is_parametrized(module, name):
        return None
    first = module.parametrizations[name][0]
    return first if isinstance(first, WeightNorm) else None


def _output_unit_dim(module: nn.Module) -> int:
    # Weight dimension that indexes the output units.
    return 1 if isinstance(module, _ConvTransposeNd) else 0


def weight_norm(
    module: nn.Module, name: str = "weight", dim: int | None = None
) -> nn.Module:
    r"""Reparametrize ``module.<name>`` as :math:`g \, v / \lVert v \rVert` in place.

    See :class:`WeightNorm`. ``g`` starts at the norm of the current weight and ``v`` at
    the weight, so the module computes the same function before and after the call.
    Use :func:`init_weight_norm_` for the data-dependent initialization of the paper.

    Args:
        module (nn.Module): the layer, typically ``nn.Linear`` or an ``nn.Conv*d`` or
            ``nn.ConvTranspose*d``.
        name (str): name of the parameter to reparametrize. Default: ``"weight"``
        dim (int, optional): the dimension that keeps one ``g`` per index. The norm is
            taken over all other dimensions. Default: ``None``, which picks the output
            units: 1 for ConvTranspose layers, whose weight is ``(in, out, *kernel)``,
            and 0 for every other layer.

    Returns:
        nn.Module: ``module`` itself.

    Raises:
        ValueError: if ``module`` has no parameter ``name``, the parameter is already
            parametrized or has fewer than 2 dimensions, or ``dim`` is out of range.
            Also if ``dim`` is ``None`` for a ConvTranspose layer with ``groups > 1``,
            because its output units do not lie along one dimension of the weight.
    """
    if parametrize.is_parametrized(module, name):
        raise ValueError(
            f"{_class_name(module)}.{name} is already parametrized; call "
            "remove_weight_norm (or torch.nn.utils.parametrize.remove_parametrizations)"
            " first"
        )
    weight = module._parameters.get(name)
    if weight is None:
        own_parameters = sorted(module._parameters)
        raise ValueError(
            f"weight_norm expected {_class_name(module)} to have a parameter named "
            f"{name!r}, got parameters {own_parameters}"
        )
    if weight.dim() < 2:
        raise ValueError(
            f"weight_norm expected {name} with at least 2 dimensions (one per output "
            f"unit and at least one to normalize over), got shape {tuple(weight.shape)}"
        )
    if dim is None:
        if isinstance(module, _ConvTransposeNd) and module.groups > 1:
            raise ValueError(
                f"weight_norm cannot pick dim for {_class_name(module)} with "
                f"groups={module.groups}, because each slice along dim 1 of its weight "
                "serves one output channel per group. Pass dim explicitly."
            )
        dim = _output_unit_dim(module)
    elif not -weight.dim() <= dim < weight.dim():
        raise ValueError(
            f"dim must be in [{-weight.dim()}, {weight.dim()}) for {name} of shape "
            f"{tuple(weight.shape)}, got {dim}"
        )
    parametrization = WeightNorm(weight.detach(), dim % weight.dim())
    # A frozen weight (requires_grad=False) gives a frozen g and v.
    parametrization.g.requires_grad_(weight.requires_grad)
    parametrization.v.requires_grad_(weight.requires_grad)
    parametrize.register_parametrization(module, name, parametrization)
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    r"""Replace the weight normalization of ``module.<name>`` by a plain parameter.

    The new parameter contains the current value of :math:`g \, v / \lVert v \rVert`, so
    the module computes the same function. It is a new tensor, so an optimizer built
    before the call must be rebuilt.

    Returns:
        nn.Module: ``module`` itself.

    Raises:
        ValueError: if ``module.<name>`` has no weight normalization from
            :func:`weight_norm`.
    """
    if _find_weight_norm(module, name) is None:
        raise ValueError(
            f"{_class_name(module)}.{name} has no weight normalization to remove"
        )
    if len(module.parametrizations[name]) > 1:
        raise ValueError(
            f"{_class_name(module)}.{name} has further parametrizations stacked on "
            "its weight normalization; remove them first"
        )
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module


def _output_units(module: nn.Module, output: Tensor) -> Tensor:
    # The output as (units, values): Linear puts its units last, Conv and
    # ConvTranspose in dimension 1.
    unit_dim = 1 if isinstance(module, _ConvNd) else -1
    return output.movedim(unit_dim, 0).reshape(output.size(unit_dim), -1)


def _check_init_supported(name: str, module: nn.Module, wn: WeightNorm) -> None:
    if not isinstance(module, (nn.Linear, _ConvNd)):
        raise TypeError(
            f"init_weight_norm_ supports weight-normalized Linear, Conv and "
            f"ConvTranspose layers, got {_layer_label(name, module)}"
        )
    expected_dim = _output_unit_dim(module)
    if wn.dim != expected_dim:
        raise ValueError(
            f"init_weight_norm_ needs one g per output unit, so the weight norm of "
            f"{_layer_label(name, module)} must use dim={expected_dim}, got "
            f"dim={wn.dim}"
        )
    if isinstance(module, _ConvTransposeNd) and module.groups > 1:
        raise ValueError(
            f"init_weight_norm_ needs one g per output unit, which a weight norm of "
            f"{_layer_label(name, module)} with groups={module.groups} does not have"
        )


def _standardize_output_(
    module: nn.Module, wn: WeightNorm, output: Tensor, eps: float
) -> None:
    # The output is y = g * t + b per unit, with t = (v / ||v||) x. Dividing g by the
    # batch std s of y and setting b to (b - m) / s, with m the batch mean of y, makes
    # the new output (y - m) / s.
    per_unit = _output_units(module, output)
    if per_unit.size(1) < 2:
        raise ValueError(
            f"init_weight_norm_ needs more than 1 value per output unit, got output of "
            f"size {tuple(output.shape)} from {_class_name(module)}"
        )
    compute_dtype = torch.promote_types(per_unit.dtype, torch.float32)
    var, mean = torch.var_mean(per_unit.to(compute_dtype), dim=1, correction=0)
    std = torch.sqrt(var + eps)
    wn.g.copy_(wn.g / std.to(wn.g.dtype))
    if module.bias is not None:
        module.bias.copy_((module.bias - mean.to(module.bias.dtype)) / std)


def init_weight_norm_(
    model: nn.Module, batch: Tensor, eps: float = 1e-8
) -> nn.Module:
    r"""Set ``g`` and bias of each weight-normalized layer from one batch, in place.

    This is the data-dependent initialization of Salimans and Kingma (2016, section
    2.2). ``model(batch)`` runs once without gradients. As each layer with a
    :class:`WeightNorm` weight runs for the first time, its output ``y`` gets per-unit
    batch mean ``m`` and biased standard deviation ``s = sqrt(var + eps)``, and

    .. math::

        g \leftarrow \frac{g}{s}, \qquad b \leftarrow \frac{b - m}{s}

    so that the layer's output (its pre-activation) over the batch has zero mean and
    unit variance per output unit. The layer then recomputes its output with the new
    values, so each later layer is initialized on the outputs of the already
    initialized ones. ``v`` keeps its current value (the paper draws it from
    :math:`N(0, 0.05)`). Output units are the last dimension of a Linear output and
    dimension 1 of a Conv or ConvTranspose output, and the statistics span all other
    dimensions.

    A layer without bias only gets the unit variance, because it has no shift to remove
    the mean. The pass runs in the model's current mode, so call ``model.eval()`` first
    to initialize without dropout noise.

    Args:
        model (nn.Module): a model containing layers wrapped by :func:`weight_norm`.
        batch (Tensor): input batch, called as ``model(batch)``.
        eps (float): value added to the variance before the square root. Default: 1e-8

    Returns:
        nn.Module: ``model`` itself.

    Raises:
        ValueError: if ``model`` has no layer wrapped by :func:`weight_norm`, a layer's
            weight norm is not per output unit, or a layer's output has a single value
            per unit.
        TypeError: if a weight-normalized layer is not a Linear, Conv or ConvTranspose.

    Warns:
        UserWarning: naming the weight-normalized layers that ``model(batch)`` did not
            call, which keep their values.
    """
    layers = {}
    for name, module in model.named_modules():
        wn = _find_weight_norm(module, "weight")
        if wn is not None:
            _check_init_supported(name, module, wn)
            layers[module] = (name, wn)
    if not layers:
        raise ValueError(
            "init_weight_norm_ found no layer wrapped by weight_norm in "
            f"{_class_name(model)}; wrap the layers with weight_norm first"
        )

    initialized = set()

    def standardize_hook(module, args, kwargs, output):
        if module in initialized:
            return None
        initialized.add(module)
        _standardize_output_(module, layers[module][1], output, eps)
        # Recompute with the new g and bias. forward() skips the hooks.
        return module.forward(*args, **kwargs)

    handles = [
        module.register_forward_hook(standardize_hook, with_kwargs=True)
        for module in layers
    ]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()

    skipped = [
        name for module, (name, _) in layers.items() if module not in initialized
    ]
    if skipped:
        warnings.warn(
            f"init_weight_norm_ left {len(skipped)} weight-normalized layers unchanged "
            f"because model(batch) did not call them: {skipped}",
            stacklevel=2,
        )
    return model
