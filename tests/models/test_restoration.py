import math

import pytest
import torch
from torch import nn

from normlab import nn as nlnn
from normlab.models import EDSR, DnCNN
from normlab.models.edsr import DIV2K_RGB_MEAN, ResidualBlock


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(cls, *args, **kwargs) -> nn.Module:
    # Meta tensors have shapes but no storage, so the 43M-parameter EDSR builds at once.
    with torch.device("meta"):
        return cls(*args, **kwargs)


# --- DnCNN -------------------------------------------------------------------------


def test_dncnn_s_parameter_count():
    # DnCNN-S: depth 17, 64 features, BN, gray images.
    #   first conv 1->64 with bias: 9 * 64 + 64                  =     640
    #   15 x (conv 64->64 without bias + BN weight and bias):
    #        15 * (9 * 64 * 64 + 2 * 64) = 15 * 36,992           = 554,880
    #   last conv 64->1 with bias: 9 * 64 + 1                    =     577
    #   total                                                    = 556,097 (~0.556M)
    model = build_on_meta(DnCNN)
    assert count_parameters(model) == 556_097


def test_dncnn_b_parameter_count():
    # DnCNN-B has depth 20, so 18 middle layers: 640 + 18 * 36,992 + 577.
    model = build_on_meta(DnCNN, depth=20)
    assert count_parameters(model) == 667_073


def test_dncnn_layer_order_and_bias():
    model = DnCNN(channels=1, depth=4, features=8, norm="batchnorm")
    kinds = [type(m).__name__ for m in model.body]
    assert kinds == [
        "Conv2d", "ReLU",
        "Conv2d", "BatchNorm2d", "ReLU",
        "Conv2d", "BatchNorm2d", "ReLU",
        "Conv2d",
    ]  # fmt: skip
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    # only the convolutions that a normalization follows drop their bias
    assert [conv.bias is not None for conv in convs] == [True, False, False, True]
    assert all(conv.padding == (1, 1) for conv in convs)


def test_dncnn_without_norm_keeps_every_bias():
    model = DnCNN(depth=4, features=8, norm="none")
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_dncnn_kaiming_initialization():
    torch.manual_seed(0)
    model = DnCNN(depth=3, features=64)
    middle = model.body[2]
    std = middle.weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    norm = model.body[3]
    assert torch.equal(norm.weight, torch.ones(64))
    assert torch.equal(norm.bias, torch.zeros(64))


@pytest.mark.parametrize("channels", [1, 3])
def test_dncnn_keeps_non_square_size(channels):
    model = DnCNN(channels=channels, depth=4, features=8)
    out = model(torch.randn(2, channels, 9, 6))
    assert out.shape == (2, channels, 9, 6)


def test_dncnn_residual_returns_input_minus_noise():
    torch.manual_seed(0)
    residual = DnCNN(depth=4, features=8, residual=True).eval()
    direct = DnCNN(depth=4, features=8, residual=False).eval()
    direct.load_state_dict(residual.state_dict())
    x = torch.randn(2, 1, 7, 7)
    noise = direct(x)
    torch.testing.assert_close(residual(x), x - noise)
    assert not torch.allclose(residual(x), noise)


def test_dncnn_zero_noise_estimate_returns_input():
    model = DnCNN(depth=4, features=8, residual=True)
    last = model.body[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    x = torch.randn(2, 1, 5, 5)
    assert torch.equal(model(x), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 2}, "depth must be an integer of at least 3, got 2"),
        ({"channels": 0}, "channels must be a positive integer, got 0"),
        ({"features": 0}, "features must be a positive integer, got 0"),
        ({"norm": "batchnrom"}, "unknown normalization 'batchnrom'"),
    ],
)
def test_dncnn_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DnCNN(**{"depth": 4, "features": 8, **kwargs})


def test_dncnn_rejects_wrong_channels():
    model = DnCNN(channels=1, depth=3, features=4)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\), got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))


# --- EDSR --------------------------------------------------------------------------

# Parameter counts of a 3x3 conv with bias, as used by the EDSR counts below.
#   head conv 3->F:             27F + F
#   residual block (2 convs):   2 * (9F^2 + F)
#   body conv F->F:             9F^2 + F
#   x2 upsampler conv F->4F:    36F^2 + 4F, and x3 F->9F: 81F^2 + 9F
#   tail conv F->3:             27F + 3


def test_edsr_baseline_x2_parameter_count():
    # F = 64, 16 blocks: 1,792 + 16 * 73,856 + 36,928 + 147,712 + 1,731 = 1,369,859.
    model = build_on_meta(EDSR, 2)
    count = count_parameters(model)
    assert count == 1_369_859
    # The EDSR-PyTorch README lists EDSR_baseline_x2 with 1.37M parameters.
    assert count == pytest.approx(1.37e6, rel=0.01)


@pytest.mark.parametrize("scale, expected", [(3, 1_554_499), (4, 1_517_571)])
def test_edsr_baseline_x3_x4_parameter_count(scale, expected):
    # x3 swaps the x2 upsampler conv (147,712) for F->9F (332,352), and x4 has two x2
    # convs.
    # The EDSR-PyTorch README lists 1.55M and 1.52M.
    model = build_on_meta(EDSR, scale)
    assert count_parameters(model) == expected


@pytest.mark.parametrize(
    "scale, expected, readme",
    [(2, 40_729_603, 40.7e6), (3, 43_680_003, 43.7e6), (4, 43_089_923, 43.1e6)],
)
def test_full_edsr_parameter_count(scale, expected, readme):
    # F = 256, 32 blocks: head 7,168 + 64 convs * 590,080 + body conv 590,080
    # + tail 6,915 = 38,369,283. x2 adds 2,360,320 (F->4F), x3 adds 5,310,720 (F->9F)
    # and x4 adds 2 * 2,360,320. `readme` is the count in the EDSR-PyTorch README.
    model = build_on_meta(EDSR, scale, blocks=32, features=256, res_scale=0.1)
    count = count_parameters(model)
    assert count == expected
    assert count == pytest.approx(readme, rel=0.01)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("channels", [1, 3])
def test_edsr_output_size_non_square(scale, channels):
    model = EDSR(scale, channels=channels, features=8, blocks=2)
    out = model(torch.randn(2, channels, 5, 7))
    assert out.shape == (2, channels, 5 * scale, 7 * scale)


@pytest.mark.parametrize("scale, factors", [(2, [2]), (3, [3]), (4, [2, 2])])
def test_edsr_upsampler_stages(scale, factors):
    model = EDSR(scale, features=8, blocks=1)
    shuffles = [m for m in model.upsampler if isinstance(m, nn.PixelShuffle)]
    assert [m.upscale_factor for m in shuffles] == factors
    convs = [m for m in model.upsampler if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8 * f * f for f in factors]


@pytest.mark.parametrize("scale", [1, 8, 2.0, True])
def test_edsr_rejects_unsupported_scale(scale):
    with pytest.raises(ValueError, match="scale must be one of 2, 3, 4"):
        EDSR(scale, features=8, blocks=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": 0}, "channels must be a positive integer, got 0"),
        ({"features": 0}, "features must be a positive integer, got 0"),
        ({"blocks": 0}, "blocks must be a positive integer, got 0"),
        ({"res_scale": 0.0}, "res_scale must be positive, got 0.0"),
        ({"rgb_range": -1.0}, "rgb_range must be positive, got -1.0"),
    ],
)
def test_edsr_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EDSR(2, **{"features": 8, "blocks": 1, **kwargs})


def test_edsr_rejects_wrong_channels():
    model = EDSR(2, channels=3, features=8, blocks=1)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(2, 1, 4, 4\)"):
        model(torch.randn(2, 1, 4, 4))


def test_edsr_without_norm_has_plain_blocks():
    model = EDSR(2, features=8, blocks=2, norm="none")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.bias is not None for conv in convs)
    assert not any("Norm" in type(m).__name__ for m in model.modules())


def test_edsr_batchnorm_block_is_srresnet_style():
    model = EDSR(2, features=8, blocks=2, norm="batchnorm")
    block = model.body[0]
    kinds = [type(m).__name__ for m in block.body]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
    assert block.body[0].bias is None
    assert block.body[3].bias is None
    norms = [m for m in model.modules() if isinstance(m, nlnn.BatchNorm2d)]
    # two per residual block and none outside the blocks
    assert len(norms) == 4


@pytest.mark.parametrize("res_scale", [1.0, 0.1])
def test_residual_block_scales_branch(res_scale):
    torch.manual_seed(0)
    block = ResidualBlock(8, "none", res_scale)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(block(x) - x, res_scale * block.body(x))


@pytest.mark.parametrize("rgb_range", [1.0, 255.0])
def test_edsr_mean_buffer(rgb_range):
    model = EDSR(2, features=8, blocks=1, rgb_range=rgb_range)
    expected = rgb_range * torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(model.mean, expected)
    assert "mean" in dict(model.named_buffers())
    # non-persistent: checkpoints do not carry it
    assert "mean" not in model.state_dict()
    assert model.to(torch.float64).mean.dtype == torch.float64


def test_edsr_mean_for_gray_images_is_half_range():
    model = EDSR(2, channels=1, features=8, blocks=1, rgb_range=255.0)
    torch.testing.assert_close(model.mean, torch.full((1, 1, 1, 1), 127.5))


@pytest.mark.parametrize("rgb_range", [1.0, 255.0])
def test_edsr_mean_shift_round_trip(rgb_range):
    model = EDSR(2, features=8, blocks=2, rgb_range=rgb_range)
    head_inputs = []
    model.head.register_forward_pre_hook(lambda _, args: head_inputs.append(args[0]))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    image = model.mean.expand(2, 3, 4, 6).clone()
    out = model(image)
    # the head receives the image minus the mean, which is zero for an image at the mean
    assert torch.equal(head_inputs[0], torch.zeros(2, 3, 4, 6))
    # with every weight at zero the network adds only the mean back: a constant image at
    # the mean comes out as the same constant at twice the size
    torch.testing.assert_close(out, model.mean.expand(2, 3, 8, 12))


def test_edsr_mean_shift_is_subtracted_from_any_input():
    model = EDSR(2, features=8, blocks=1)
    head_inputs = []
    model.head.register_forward_pre_hook(lambda _, args: head_inputs.append(args[0]))
    x = torch.rand(2, 3, 4, 4)
    model(x)
    torch.testing.assert_close(head_inputs[0], x - model.mean)
