"""The multilayer perceptron of the BatchNorm tutorials: Linear -> norm -> ReLU, repeated."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from ..nn.factory import NormSpec, create_norm, resolve_norm_name, uses_bias, wrap_layer

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Fully connected classifier with a normalization after every hidden linear layer.

    Each hidden block is ``Linear -> norm -> activation`` (then dropout when ``dropout > 0``);
    the output layer has no normalization. A linear layer followed by a normalization has
    no bias, because the normalization's shift makes it redundant. The exceptions are
    the normalizations for which ``uses_bias(norm)`` is True ("none", "weightnorm" and
    callables). ``wrap_layer`` applies weight normalization to the hidden linear layers
    when ``norm="weightnorm"``.

    Args:
        in_features (int): size of each flattened input sample.
        hidden (int or sequence of int): widths of the hidden layers. An int gives two hidden
            layers of that width. Default: ``(100, 100)``.
        out_features (int): number of classes. Default: 10.
        norm (str or callable): normalization after each hidden linear layer, a name from
            ``normlab.nn.NORMS`` or a callable ``norm(num_features)``. Default: ``"batchnorm"``.
        activation (str): ``"relu"``, ``"sigmoid"`` or ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability after each hidden activation. Default: 0.

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
        self.in_features = in_features
        bias = uses_bias(norm)
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = in_features
        for width in widths:
            layers.append(wrap_layer(nn.Linear(width_in, width, bias=bias), norm))
            layers.append(create_norm(norm, width, dims=1))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
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
