"""DCGAN generator and discriminator, with the normalization placement studied for GANs.

Radford, Metz and Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", ICLR 2016,
https://arxiv.org/abs/1511.06434. The normalization placement follows Xiang and Li, "On
the Effects of Batch and Weight Normalization in Generative Adversarial Networks", 2017,
https://arxiv.org/abs/1704.03971: every layer except the last of each network, and not
the first layer of the discriminator.

Both networks derive their depth from ``image_size``: the generator grows a 4x4 map by
stride-2 transposed convolutions, the discriminator shrinks the image to 4x4 by stride-2
convolutions, and every such stage doubles or halves the channels. With
``image_size=64`` and ``features=64`` this is the 64x64 network of the DCGAN paper and
of pytorch/examples.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.factory import NormSpec, create_norm, uses_bias, wrap_layer

# Standard deviation of the DCGAN initialization. The DCGAN paper draws every weight
# from N(0, 0.02), and pytorch/examples (dcgan/main.py) draws BatchNorm weights from
# N(1, 0.02) instead, as these models do for every learnable normalization weight.
INIT_STD = 0.02


def num_stages(image_size: int) -> int:
    """Return the number of stride-2 stages between a 4x4 map and ``image_size``.

    Raises ``ValueError`` unless ``image_size`` is a power of 2 of at least 8.
    """
    valid = isinstance(image_size, int) and image_size >= 8
    if not valid or image_size & (image_size - 1):
        raise ValueError(
            f"image_size must be a power of 2 of at least 8 (8, 16, 32, 64, ...), "
            f"got {image_size!r}"
        )
    return image_size.bit_length() - 3


class DCGANGenerator(nn.Module):
    """DCGAN generator: transposed convolutions from a 1x1 latent code to an image.

    ``ConvTranspose(4, stride 1)`` maps the latent code to a 4x4 map with
    ``features * 2^(k-1)`` channels, then ``k - 1`` stride-2 transposed convolutions
    halve the channels down to ``features``, and a last stride-2 transposed convolution
    gives ``channels`` at ``image_size``, where ``k = log2(image_size) - 2``. Every
    layer but the last is followed by ``norm -> ReLU``, and the last by tanh, so images
    are in [-1, 1]. Layers followed by a normalization drop their bias unless
    ``uses_bias(norm)`` is True. The last layer keeps its bias, although
    pytorch/examples drops every bias.

    Initialization as in pytorch/examples: convolution weights from N(0, 0.02), biases
    0, learnable normalization weights from N(1, 0.02) and their biases 0.

    Args:
        latent_dim (int): size of the latent code ``z``. Default: 100.
        channels (int): channels of the generated images. Default: 3.
        image_size (int): height and width of the generated images, a power of 2 of at
            least 8: 8 or 16 for digits, 32 for CIFAR-10, 64 for the DCGAN paper.
            Default: 32.
        features (int): channels of the last hidden layer. Default: 64.
        norm (str or callable): normalization after each hidden layer, a name from
            ``normlab.nn.NORMS`` or a callable ``norm(num_features)``.
            Default: ``"batchnorm"``.

    Shape:
        - Input: ``(N, latent_dim)`` or ``(N, latent_dim, 1, 1)``.
        - Output: ``(N, channels, image_size, image_size)``.

    Note:
        With ``norm="weightnorm"`` only the hidden layers are weight-normalized. Xiang
        and Li also weight-normalize the last layer (with a learned scale and bias) and
        use translated ReLUs, which this model does not reproduce.
    """

    def __init__(
        self,
        latent_dim: int = 100,
        channels: int = 3,
        image_size: int = 32,
        features: int = 64,
        norm: NormSpec = "batchnorm",
    ) -> None:
        super().__init__()
        _check_positive("latent_dim", latent_dim)
        _check_positive("channels", channels)
        _check_positive("features", features)
        stages = num_stages(image_size)
        self.latent_dim = latent_dim
        self.image_size = image_size

        width = features * 2 ** (stages - 1)
        layers = _normalized_layer(
            nn.ConvTranspose2d(latent_dim, width, 4, 1, 0, bias=uses_bias(norm)),
            norm,
            width,
            nn.ReLU(),
        )
        for _ in range(stages - 1):
            conv = nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=uses_bias(norm))
            layers += _normalized_layer(conv, norm, width // 2, nn.ReLU())
            width //= 2
        layers.append(_init_conv(nn.ConvTranspose2d(width, channels, 4, 2, 1)))
        layers.append(nn.Tanh())
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = tuple(z.shape)
        if shape[1:] not in ((self.latent_dim,), (self.latent_dim, 1, 1)):
            raise ValueError(
                f"DCGANGenerator expects a latent code of shape (N, {self.latent_dim})"
                f" or (N, {self.latent_dim}, 1, 1), got {shape}; set latent_dim to "
                f"match"
            )
        return self.layers(z.reshape(shape[0], self.latent_dim, 1, 1))


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: stride-2 convolutions from an image to one logit per sample.

    ``Conv(4, stride 2) -> LeakyReLU(0.2)`` with ``features`` channels, then ``k - 1``
    stride-2 ``Conv -> norm -> LeakyReLU(0.2)`` layers that double the channels down to
    a 4x4 map, then ``Conv(4, stride 1)`` to one logit, where
    ``k = log2(image_size) - 2``.
    The first and last layers have no normalization and keep their bias, and the others
    drop it unless ``uses_bias(norm)`` is True. At ``image_size=8`` ``k`` is 1, so the
    discriminator has no normalized layer at all.

    The output is a logit without a sigmoid: train with
    ``torch.nn.BCEWithLogitsLoss``, which is more stable than a sigmoid followed by
    ``BCELoss``.

    Initialization as in pytorch/examples: convolution weights from N(0, 0.02), biases
    0, learnable normalization weights from N(1, 0.02) and their biases 0.

    Args:
        channels (int): channels of the input images. Default: 3.
        image_size (int): height and width of the input images, a power of 2 of at
            least 8. Default: 32.
        features (int): channels of the first layer. Default: 64.
        norm (str or callable): normalization after each hidden layer but the first, a
            name from ``normlab.nn.NORMS`` or a callable ``norm(num_features)``.
            Default: ``"batchnorm"``.

    Shape:
        - Input: ``(N, channels, image_size, image_size)``.
        - Output: ``(N,)`` logits, the shape ``BCEWithLogitsLoss`` expects for targets
          of shape ``(N,)``.

    Note:
        With ``norm="weightnorm"`` only the layers between the first and the last are
        weight-normalized, unlike Xiang and Li, who weight-normalize every layer.
    """

    def __init__(
        self,
        channels: int = 3,
        image_size: int = 32,
        features: int = 64,
        norm: NormSpec = "batchnorm",
    ) -> None:
        super().__init__()
        _check_positive("channels", channels)
        _check_positive("features", features)
        stages = num_stages(image_size)
        self.channels = channels
        self.image_size = image_size

        width = features
        layers: list[nn.Module] = [
            _init_conv(nn.Conv2d(channels, width, 4, 2, 1)),
            nn.LeakyReLU(0.2),
        ]
        for _ in range(stages - 1):
            conv = nn.Conv2d(width, width * 2, 4, 2, 1, bias=uses_bias(norm))
            layers += _normalized_layer(conv, norm, width * 2, nn.LeakyReLU(0.2))
            width *= 2
        layers.append(_init_conv(nn.Conv2d(width, 1, 4, 1, 0)))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DCGANDiscriminator expects input of shape (N, {expected[0]}, "
                f"{expected[1]}, {expected[2]}), got {tuple(x.shape)}; set channels "
                f"and image_size to match the data"
            )
        return self.layers(x).flatten()


def _normalized_layer(
    conv: nn.Module, norm: NormSpec, num_features: int, activation: nn.Module
) -> list[nn.Module]:
    # The weight is initialized before wrap_layer can reparametrize it.
    layer = wrap_layer(_init_conv(conv), norm)
    norm_layer = create_norm(norm, num_features, dims=2)
    if isinstance(getattr(norm_layer, "weight", None), nn.Parameter):
        nn.init.normal_(norm_layer.weight, 1.0, INIT_STD)
    if isinstance(getattr(norm_layer, "bias", None), nn.Parameter):
        nn.init.zeros_(norm_layer.bias)
    return [layer, norm_layer, activation]


def _init_conv(conv: nn.Module) -> nn.Module:
    nn.init.normal_(conv.weight, 0.0, INIT_STD)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
