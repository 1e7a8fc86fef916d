"""DnCNN, the residual denoiser whose paper credits BatchNorm for part of its gain.

Zhang, Zuo, Chen, Meng and Zhang, "Beyond a Gaussian Denoiser: Residual Learning of Deep
CNN for Image Denoising", IEEE TIP 26(7), 2017, https://arxiv.org/abs/1608.03981.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.factory import NormSpec, create_norm, uses_bias, wrap_layer


class DnCNN(nn.Module):
    """Plain stack of 3x3 convolutions that predicts the noise of an image.

    ``conv -> ReLU``, then ``depth - 2`` times ``conv -> norm -> ReLU``, then ``conv``.
    The hidden layers have ``features`` channels, and every kernel is 3x3 with
    padding 1, so the output has the input's height and width. DnCNN-S (one noise
    level) is the default ``depth=17``, and DnCNN-B (blind noise level) is
    ``depth=20``. Convolutions followed by a normalization drop their bias unless
    ``uses_bias(norm)`` is True. The first and last convolutions keep their bias, as in
    the authors' MatConvNet code.

    With ``residual=True`` the stack estimates the noise ``v`` of ``y = x + v`` and the
    model returns ``y - v``. Zhang et al. find that this trains faster and, together
    with BN, denoises better than estimating ``x`` directly (``residual=False``).

    Initialization: convolution weights are drawn by Kaiming normal (fan-in, ReLU gain),
    biases are 0, and normalization weights and biases are 1 and 0. The authors'
    MatConvNet code (``DnCNN_init_model_64_25_Res_Bnorm_Adam.m`` in cszn/DnCNN) draws
    every weight from N(0, 2 / (9 * 64)), the Kaiming variance of the 64-channel layers.
    Their PyTorch port uses orthogonal matrices with gain 1 instead. Kaiming is kept
    here because it preserves the second moment of the activations through each ReLU
    layer, so ``norm="none"`` also starts well scaled. Orthogonal weights with gain 1
    would halve it at every layer.

    Args:
        channels (int): channels of the images, 1 for gray and 3 for color. Default: 1.
        depth (int): number of convolution layers, at least 3. Default: 17.
        features (int): channels of the hidden layers. Default: 64.
        norm (str or callable): normalization after each hidden convolution, a name from
            ``normlab.nn.NORMS`` or a callable ``norm(num_features)``.
            Default: ``"batchnorm"``.
        residual (bool): return ``input - predicted noise`` when True, or the output of
            the last convolution as the clean image when False. Default: True.

    Shape:
        - Input: ``(N, channels, H, W)``, the noisy image.
        - Output: ``(N, channels, H, W)``, the denoised image.

    Note:
        The normalization uses its own defaults (``eps=1e-5`` and ``momentum=0.1`` for
        BatchNorm). The authors' PyTorch port sets ``eps=1e-4`` and ``momentum=0.95``,
        which in PyTorch's convention gives 95% weight to the latest batch.
    """

    def __init__(
        self,
        channels: int = 1,
        depth: int = 17,
        features: int = 64,
        norm: NormSpec = "batchnorm",
        residual: bool = True,
    ) -> None:
        super().__init__()
        _check_positive("channels", channels)
        _check_positive("features", features)
        if not isinstance(depth, int) or depth < 3:
            raise ValueError(f"depth must be an integer of at least 3, got {depth!r}")
        self.channels = channels
        self.depth = depth
        self.residual = residual

        layers: list[nn.Module] = [_conv(channels, features, bias=True), nn.ReLU()]
        for _ in range(depth - 2):
            conv = _conv(features, features, bias=uses_bias(norm))
            layers.append(wrap_layer(conv, norm))
            layers.append(_init_affine(create_norm(norm, features, dims=2)))
            layers.append(nn.ReLU())
        layers.append(_conv(features, channels, bias=True))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"DnCNN expects input of shape (N, {self.channels}, H, W), got "
                f"{tuple(x.shape)}; set channels to match the data"
            )
        out = self.body(x)
        if self.residual:
            return x - out
        return out


def _conv(in_channels: int, out_channels: int, bias: bool) -> nn.Conv2d:
    # Initialized here, before wrap_layer can reparametrize the weight.
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _init_affine(norm: nn.Module) -> nn.Module:
    # Learnable affine parameters only: a frozen normalization keeps its buffers.
    if isinstance(getattr(norm, "weight", None), nn.Parameter):
        nn.init.ones_(norm.weight)
    if isinstance(getattr(norm, "bias", None), nn.Parameter):
        nn.init.zeros_(norm.bias)
    return norm


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
