"""The small convolutional network of the BatchNorm tutorials."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.factory import NormSpec, create_norm, uses_bias, wrap_layer
from .mlp import reject_instancenorm


class CNN(nn.Module):
    """Two conv blocks and a hidden fully connected layer, each followed by a normalization.

    ``conv3x3(64) -> norm -> ReLU -> maxpool2``, ``conv3x3(128) -> norm -> ReLU -> maxpool2``,
    ``fc(256) -> norm -> ReLU``, ``fc(num_classes)``. Convolutions and linear layers that a
    normalization follows keep their bias only where ``uses_bias(norm)`` is True
    ("none", "weightnorm" and callables), and ``wrap_layer`` applies weight
    normalization to them when ``norm="weightnorm"``.

    Args:
        in_channels (int): channels of the input images. Default: 1.
        num_classes (int): number of classes. Default: 10.
        image_size (int): height and width of the square input images; 8 (digits), 28
            (MNIST) and 32 (CIFAR-10) all work. Must be divisible by 4. Default: 28.
        norm (str or callable): normalization after each conv and the hidden linear layer.
            Default: ``"batchnorm"``.
        channels (tuple of int): output channels of the two conv layers. Default: (64, 128).
        hidden (int): width of the hidden fully connected layer. Default: 256.

    Shape:
        - Input: ``(N, in_channels, image_size, image_size)``.
        - Output: ``(N, num_classes)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        norm: NormSpec = "batchnorm",
        channels: tuple[int, int] = (64, 128),
        hidden: int = 256,
    ) -> None:
        super().__init__()
        reject_instancenorm(norm, "CNN")
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.in_channels = in_channels
        self.image_size = image_size
        bias = uses_bias(norm)
        c1, c2 = channels
        self.features = nn.Sequential(
            wrap_layer(nn.Conv2d(in_channels, c1, 3, padding=1, bias=bias), norm),
            create_norm(norm, c1, dims=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            wrap_layer(nn.Conv2d(c1, c2, 3, padding=1, bias=bias), norm),
            create_norm(norm, c2, dims=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        flat = c2 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            wrap_layer(nn.Linear(flat, hidden, bias=bias), norm),
            create_norm(norm, hidden, dims=1),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"CNN expects input of shape (N, {expected[0]}, {expected[1]}, {expected[2]}),"
                f" got {tuple(x.shape)}; set in_channels and image_size to match the data"
            )
        return self.classifier(self.features(x))

