"""EDSR, the super-resolution network whose paper removes BatchNorm from its blocks.

Lim, Son, Kim, Nah and Lee, "Enhanced Deep Residual Networks for Single Image
Super-Resolution", CVPR Workshops 2017, https://arxiv.org/abs/1707.02921. The layout
follows the authors' code, https://github.com/sanghyun-son/EDSR-PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.factory import NormSpec, create_norm, uses_bias, wrap_layer

# Mean RGB value of the DIV2K training images, as fractions of the pixel range.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)

SCALES = (2, 3, 4)


class ResidualBlock(nn.Module):
    """EDSR residual block: ``x + res_scale * conv(ReLU(conv(x)))``.

    With a normalization the body becomes ``conv -> norm -> ReLU -> conv -> norm``, the
    SRResNet block that the EDSR paper compares against. Its convolutions then drop
    their bias unless ``uses_bias(norm)`` is True (the authors' code keeps the bias).

    Args:
        features (int): channels of the input and output.
        norm (str or callable): normalization after each convolution. ``"none"`` gives
            the EDSR block.
        res_scale (float): factor applied to the residual branch before the addition.
    """

    def __init__(self, features: int, norm: NormSpec, res_scale: float) -> None:
        super().__init__()
        bias = uses_bias(norm)
        self.res_scale = res_scale
        self.body = nn.Sequential(
            wrap_layer(_conv(features, features, bias=bias), norm),
            create_norm(norm, features, dims=2),
            nn.ReLU(),
            wrap_layer(_conv(features, features, bias=bias), norm),
            create_norm(norm, features, dims=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale

    def extra_repr(self) -> str:
        return f"res_scale={self.res_scale}"


class EDSR(nn.Module):
    """Single-scale EDSR: head conv, residual body with a global skip, upsampler, tail.

    ``x - mean -> head conv -> (blocks x ResidualBlock -> conv) + skip -> upsampler ->
    tail conv -> + mean``. The upsampler is ``conv(features -> features * s^2) ->
    PixelShuffle(s)`` once for scale 2 or 3, and twice with ``s = 2`` for scale 4. There
    is no activation outside the residual blocks, and every convolution is 3x3 with
    padding 1.

    The EDSR baseline is the default (16 blocks, 64 features, ``res_scale=1``) and the
    full EDSR is ``blocks=32, features=256, res_scale=0.1``. With RGB images they have
    1,369,859 and 40,729,603 parameters at scale 2, which the EDSR-PyTorch README rounds
    to 1.37M and 40.7M. ``norm="none"`` gives EDSR, and any other normalization puts a
    norm after each convolution of the residual blocks.

    Mean shift: the input is centred by subtracting ``rgb_range`` times the DIV2K mean
    RGB value, and the mean is added back to the output, as the authors' ``MeanShift``
    layers do. For ``channels != 3`` every
    channel uses ``0.5 * rgb_range``, the middle of the pixel range, because DIV2K gives
    no mean for other channel counts. The mean is a non-persistent buffer, so it follows
    ``.to()`` but is not saved in the state dict.

    Initialization is PyTorch's default for convolutions, as in the authors' code.

    Args:
        scale (int): upscaling factor, 2, 3 or 4.
        channels (int): channels of the images. Default: 3.
        features (int): channels of the feature maps. Default: 64.
        blocks (int): number of residual blocks. Default: 16.
        res_scale (float): factor on each residual branch. Default: 1.0.
        norm (str or callable): normalization inside the residual blocks, a name from
            ``normlab.nn.NORMS`` or a callable ``norm(num_features)``.
            Default: ``"none"``.
        rgb_range (float): maximum pixel value, 1.0 for images in [0, 1] or 255 for
            8-bit values. Default: 1.0.

    Shape:
        - Input: ``(N, channels, H, W)``, the low-resolution image.
        - Output: ``(N, channels, scale * H, scale * W)``.
    """

    mean: torch.Tensor

    def __init__(
        self,
        scale: int,
        channels: int = 3,
        features: int = 64,
        blocks: int = 16,
        res_scale: float = 1.0,
        norm: NormSpec = "none",
        rgb_range: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(scale, int) or isinstance(scale, bool) or scale not in SCALES:
            raise ValueError(f"scale must be one of 2, 3, 4, got {scale!r}")
        sizes = {"channels": channels, "features": features, "blocks": blocks}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not res_scale > 0:
            raise ValueError(f"res_scale must be positive, got {res_scale!r}")
        if not rgb_range > 0:
            raise ValueError(f"rgb_range must be positive, got {rgb_range!r}")
        self.scale = scale
        self.channels = channels

        channel_mean = DIV2K_RGB_MEAN if channels == 3 else (0.5,) * channels
        mean = rgb_range * torch.tensor(channel_mean).view(1, channels, 1, 1)
        self.register_buffer("mean", mean, persistent=False)

        self.head = _conv(channels, features)
        body = [ResidualBlock(features, norm, res_scale) for _ in range(blocks)]
        body.append(_conv(features, features))
        self.body = nn.Sequential(*body)
        self.upsampler = _upsampler(scale, features)
        self.tail = _conv(features, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"EDSR expects input of shape (N, {self.channels}, H, W), got "
                f"{tuple(x.shape)}; set channels to match the data"
            )
        features = self.head(x - self.mean)
        features = features + self.body(features)
        return self.tail(self.upsampler(features)) + self.mean


def _upsampler(scale: int, features: int) -> nn.Sequential:
    factors = [2, 2] if scale == 4 else [scale]
    layers: list[nn.Module] = []
    for factor in factors:
        layers.append(_conv(features, features * factor**2))
        layers.append(nn.PixelShuffle(factor))
    return nn.Sequential(*layers)


def _conv(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
