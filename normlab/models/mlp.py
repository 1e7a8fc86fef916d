"""The multilayer perceptron of the BatchNorm tutorials: Linear -> norm -> ReLU, repeated."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..nn.factory import NormSpec, create_norm, resolve_norm_name, uses_bias, wrap_layer

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
ORDERS = ("norm-act", "act-norm")
DROPOUT_POSITIONS = ("before", "after")


class MLP(nn.Module):
    """Fully connected classifier with a normalization after every hidden linear layer.

    Each hidden block is ``Linear -> norm -> activation`` (``order="norm-act"``) or
    ``Linear -> activation -> norm`` (``order="act-norm"``), with dropout when
    ``dropout > 0``; the output layer has no normalization. A linear layer directly
    followed by a normalization has no bias, because the normalization's shift makes it
    redundant. The exceptions are the normalizations for which ``uses_bias(norm)`` is
    True ("none", "weightnorm" and callables). In ``"act-norm"`` order the activation
    sits between them, so the linear layer keeps its bias. ``wrap_layer`` applies weight
    normalization to the hidden linear layers when ``norm="weightnorm"``.

    Args:
        in_features (int): size of each flattened input sample.
        hidden (int or sequence of int): widths of the hidden layers. An int gives two hidden
            layers of that width. Default: ``(100, 100)``.
        out_features (int): number of classes. Default: 10.
        norm (str or callable): normalization after each hidden linear layer, a name from
            ``normlab.nn.NORMS`` or a callable ``norm(num_features)``. Default: ``"batchnorm"``.
        activation (str): ``"relu"``, ``"sigmoid"`` or ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability in each hidden block. Default: 0.
        order (str): ``"norm-act"`` or ``"act-norm"``, see above.
            Default: ``"norm-act"``.
        dropout_position (str): ``"before"`` puts dropout directly before the
            normalization. ``"after"`` puts it at the end of the block, which is after
            the activation in ``"norm-act"`` order. Default: ``"after"``.
        norm_kwargs (dict, optional): keyword arguments of every normalization layer,
            such as ``eps`` or ``momentum``. Default: None.

    Shape:
        - Input: ``(N, *)`` with ``in_features`` elements per sample.
        - Output: ``(N, out_features)`` logits.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Union[int, Sequence[int]] = (100, 100),
        out_features: int = 10,
        norm: NormSpec = "batchnorm",
        activation: str = "relu",
        dropout: float = 0.0,
        order: str = "norm-act",
        dropout_position: str = "after",
        norm_kwargs: Optional[dict] = None,
    ) -> None:
        super().__init__()
        reject_instancenorm(norm, "MLP")
        widths = [hidden, hidden] if isinstance(hidden, int) else list(hidden)
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"hidden widths must be positive integers, got {hidden!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid: {', '.join(_ACTIVATIONS)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(
                f"unknown dropout_position {dropout_position!r}; "
                f"valid: {', '.join(DROPOUT_POSITIONS)}"
            )

        self.in_features = in_features
        bias = uses_bias(norm) or order == "act-norm"
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = in_features
        for width in widths:
            layers.append(wrap_layer(nn.Linear(width_in, width, bias=bias), norm))
            norm_layer = create_norm(norm, width, dims=1, **(norm_kwargs or {}))
            block = [norm_layer, _ACTIVATIONS[activation]()]
            if order == "act-norm":
                block.reverse()
            if dropout > 0:
                index = block.index(norm_layer) if dropout_position == "before" else 2
                block.insert(index, nn.Dropout(dropout))
            layers.extend(block)
            width_in = width
        layers.append(nn.Linear(width_in, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.in_features:
            raise ValueError(
                f"MLP expects {self.in_features} values per sample, got input of shape "
                f"{tuple(x.shape)} with {x[0].numel()}; set in_features to match the data"
            )
        return self.layers(x)


def reject_instancenorm(norm, model_name: str) -> None:
    """Raise ``ValueError`` when ``norm`` is instancenorm, which needs positions."""
    if isinstance(norm, str) and resolve_norm_name(norm) == "instancenorm":
        raise ValueError(
            f"{model_name} normalizes (N, C) features that have no positions, so "
            "instancenorm cannot normalize them; use layernorm or groupnorm"
        )
