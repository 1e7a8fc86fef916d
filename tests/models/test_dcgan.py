import pytest
import torch
from torch import nn

from normlab import nn as nlnn
from normlab.models import DCGANDiscriminator, DCGANGenerator
from normlab.models.dcgan import num_stages


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.layers]


@pytest.mark.parametrize("size, stages", [(8, 1), (16, 2), (32, 3), (64, 4), (128, 5)])
def test_num_stages_from_image_size(size, stages):
    assert num_stages(size) == stages


@pytest.mark.parametrize("size", [0, 4, 12, 48, -8, 32.0])
def test_num_stages_rejects_bad_size(size):
    with pytest.raises(ValueError, match=f"power of 2 of at least 8.*got {size!r}"):
        num_stages(size)


@pytest.mark.parametrize("cls", [DCGANGenerator, DCGANDiscriminator])
def test_dcgan_rejects_bad_image_size(cls):
    with pytest.raises(ValueError, match="image_size must be a power of 2"):
        cls(image_size=28)


@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_output_shape(size, channels):
    model = DCGANGenerator(latent_dim=8, channels=channels, image_size=size, features=4)
    out = model(torch.randn(2, 8))
    assert out.shape == (2, channels, size, size)
    # tanh output
    assert out.abs().max() <= 1


@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_discriminator_output_shape(size, channels):
    model = DCGANDiscriminator(channels=channels, image_size=size, features=4)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2,)


def test_generator_accepts_flat_and_4d_latent():
    model = DCGANGenerator(latent_dim=8, image_size=8, features=4).eval()
    z = torch.randn(3, 8)
    assert torch.equal(model(z), model(z[:, :, None, None]))


def test_generator_rejects_wrong_latent():
    model = DCGANGenerator(latent_dim=8, image_size=8, features=4)
    with pytest.raises(ValueError, match=r"\(N, 8\) or \(N, 8, 1, 1\), got \(2, 100\)"):
        model(torch.randn(2, 100))


def test_discriminator_rejects_wrong_input():
    model = DCGANDiscriminator(channels=3, image_size=32, features=4)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\), got \(2, 1, 28, 28\)"):
        model(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (DCGANGenerator, {"latent_dim": 0}, "latent_dim must be a positive integer"),
        (DCGANGenerator, {"channels": 0}, "channels must be a positive integer"),
        (DCGANGenerator, {"features": 0}, "features must be a positive integer"),
        (DCGANDiscriminator, {"channels": 0}, "channels must be a positive integer"),
        (DCGANDiscriminator, {"features": 0}, "features must be a positive integer"),
    ],
)
def test_dcgan_rejects_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_generator_64_matches_dcgan_paper():
    # 100 -> 512 (4x4) -> 256 (8x8) -> 128 (16x16) -> 64 (32x32) -> 3 (64x64)
    with torch.device("meta"):
        model = DCGANGenerator(image_size=64)
    convs = [m for m in model.layers if isinstance(m, nn.ConvTranspose2d)]
    assert [c.in_channels for c in convs] == [100, 512, 256, 128, 64]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3]
    assert [c.stride for c in convs] == [(1, 1)] + [(2, 2)] * 4


def test_discriminator_64_matches_dcgan_paper():
    # 3 (64x64) -> 64 (32x32) -> 128 (16x16) -> 256 (8x8) -> 512 (4x4) -> 1 (1x1)
    with torch.device("meta"):
        model = DCGANDiscriminator(image_size=64)
    convs = [m for m in model.layers if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride for c in convs] == [(2, 2)] * 4 + [(1, 1)]


def test_generator_norm_after_every_layer_but_last():
    model = DCGANGenerator(latent_dim=8, image_size=32, features=4, norm="batchnorm")
    block = ["ConvTranspose2d", "BatchNorm2d", "ReLU"]
    assert layer_kinds(model) == block * 3 + ["ConvTranspose2d", "Tanh"]
    convs = [m for m in model.layers if isinstance(m, nn.ConvTranspose2d)]
    assert [c.bias is not None for c in convs] == [False, False, False, True]


def test_discriminator_norm_skips_first_and_last():
    model = DCGANDiscriminator(image_size=32, features=4, norm="batchnorm")
    assert layer_kinds(model) == [
        "Conv2d", "LeakyReLU",
        "Conv2d", "BatchNorm2d", "LeakyReLU",
        "Conv2d", "BatchNorm2d", "LeakyReLU",
        "Conv2d",
    ]  # fmt: skip
    convs = [m for m in model.layers if isinstance(m, nn.Conv2d)]
    assert [c.bias is not None for c in convs] == [True, False, False, True]
    slopes = [m.negative_slope for m in model.layers if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2, 0.2, 0.2]
    # logits: the loss is BCEWithLogitsLoss, so there is no sigmoid
    assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())


def test_discriminator_8x8_has_no_norm():
    model = DCGANDiscriminator(image_size=8, features=4, norm="batchnorm")
    assert layer_kinds(model) == ["Conv2d", "LeakyReLU", "Conv2d"]


def test_dcgan_initialization():
    torch.manual_seed(0)
    generator = DCGANGenerator(image_size=32)
    discriminator = DCGANDiscriminator(image_size=32)
    for model in (generator, discriminator):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                assert m.weight.mean().item() == pytest.approx(0.0, abs=0.005)
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
                if m.bias is not None:
                    assert torch.equal(m.bias, torch.zeros_like(m.bias))
        norms = [m for m in model.modules() if isinstance(m, nlnn.BatchNorm2d)]
        weights = torch.cat([m.weight.detach() for m in norms])
        assert weights.mean().item() == pytest.approx(1.0, abs=0.005)
        assert weights.std().item() == pytest.approx(0.02, rel=0.2)
        assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)


@pytest.mark.parametrize("norm", sorted(nlnn.NORMS))
@pytest.mark.parametrize("cls", [DCGANGenerator, DCGANDiscriminator])
def test_dcgan_learnable_norm_weights_start_near_one(cls, norm):
    torch.manual_seed(0)
    model = cls(image_size=16, features=16, norm=norm)
    weights = [
        p
        for name, p in model.named_parameters()
        if name.endswith(".weight") and p.dim() == 1
    ]
    for weight in weights:
        assert (weight - 1).abs().max() < 0.15
        assert weight.std() > 0


def test_dcgan_32_parameter_counts():
    # Generator (latent 100, features 64, RGB 32x32):
    #   convT 100->256 4x4, no bias: 409,600 + BN 512
    #   convT 256->128:              524,288 + BN 256
    #   convT 128->64:               131,072 + BN 128
    #   convT 64->3 with bias:         3,075             total 1,068,931
    # Discriminator:
    #   conv 3->64 with bias:          3,136
    #   conv 64->128, no bias:       131,072 + BN 256
    #   conv 128->256, no bias:      524,288 + BN 512
    #   conv 256->1 with bias:         4,097             total   663,361
    with torch.device("meta"):
        generator = DCGANGenerator(image_size=32)
        discriminator = DCGANDiscriminator(image_size=32)
    assert count_parameters(generator) == 1_068_931
    assert count_parameters(discriminator) == 663_361


def test_discriminator_logits_train_with_bce_with_logits():
    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, image_size=16, features=4)
    discriminator = DCGANDiscriminator(image_size=16, features=4)
    fake = generator(torch.randn(4, 8))
    logits = discriminator(fake)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros(4))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in generator.parameters())


@pytest.mark.skipif("weightnorm" not in nlnn.NORMS, reason="weightnorm not registered")
def test_dcgan_weightnorm_wraps_normalized_layers_only():
    generator = DCGANGenerator(8, image_size=16, features=4, norm="weightnorm")
    discriminator = DCGANDiscriminator(image_size=16, features=4, norm="weightnorm")
    # generator layers 0 and 3 are hidden, 6 is the output layer
    assert [_is_weight_normalized(generator.layers[i]) for i in (0, 3, 6)] == [
        True, True, False
    ]  # fmt: skip
    # discriminator layer 0 is the first, 2 is hidden, 5 is the output layer
    assert [_is_weight_normalized(discriminator.layers[i]) for i in (0, 2, 5)] == [
        False, True, False
    ]  # fmt: skip


def _is_weight_normalized(module: nn.Module) -> bool:
    # Weight normalization replaces the layer's weight parameter by a length and a
    # direction, so "weight" is no longer among its parameters.
    return "weight" not in dict(module.named_parameters())
