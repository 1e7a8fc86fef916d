"""Tests for normlab.metrics: PSNR, SSIM and the BT.601 luma conversion.

Reference values come from scikit-image 0.26 (``peak_signal_noise_ratio`` and
``structural_similarity``) on the same arrays, and from values worked out by hand.

scikit-image filters with ``scipy.ndimage.gaussian_filter`` ('same' size, reflected
borders) and then averages the SSIM map without its outer (win_size - 1) / 2 = 5 pixels.
With an 11x11 window those are exactly the positions where the window fits inside the
image, so its mean SSIM equals the 'valid' filtering of the reference MATLAB code up to
float rounding. The mean over its full 'same' map, borders included, differs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from normlab.metrics import gaussian_window_1d, psnr, rgb_to_y, ssim


def skimage_ssim(first: np.ndarray, second: np.ndarray, **kwargs) -> float:
    return structural_similarity(
        first,
        second,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        **kwargs,
    )


def noisy_pair(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return a smooth uint8 image and a noisy copy of it."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, shape[0])[:, None]
    cols = np.linspace(0, 1, shape[1])[None, :]
    base = 60 + 120 * np.sin(3 * rows + 2 * cols) ** 2
    if len(shape) == 3:
        base = base[..., None] + np.array([0.0, 30.0, -20.0])[: shape[2]]
    clean = np.clip(base + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
    noisy = np.clip(clean + rng.normal(0, 15, shape), 0, 255).astype(np.uint8)
    return noisy, clean


def to_tensor(image: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    tensor = torch.from_numpy(image).to(dtype) / 255
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor


# --------------------------------------------------------------------------------------
# PSNR


@pytest.mark.parametrize("shape", [(37, 45), (40, 33, 3), (20, 20, 1)])
def test_psnr_matches_skimage(shape):
    img, ref = noisy_pair(shape)
    expected = peak_signal_noise_ratio(ref, img, data_range=255)
    assert psnr(img, ref) == pytest.approx(expected, abs=1e-10)


def test_psnr_constant_offset_by_hand():
    ref = np.full((16, 16), 100, dtype=np.uint8)
    img = ref + np.uint8(5)
    # MSE = 25, so PSNR = 10 log10(255^2 / 25) = 20 log10(255 / 5) = 34.1514 dB.
    assert psnr(img, ref) == pytest.approx(20 * math.log10(255 / 5), abs=1e-12)
    assert psnr(img, ref) == pytest.approx(34.1514, abs=1e-4)


def test_psnr_identical_is_inf():
    img, _ = noisy_pair((20, 24, 3))
    assert psnr(img, img.copy()) == math.inf
    assert psnr(to_tensor(img), to_tensor(img)) == math.inf


def test_psnr_is_symmetric():
    img, ref = noisy_pair((30, 30, 3))
    assert psnr(img, ref) == psnr(ref, img)


def test_psnr_crop_border_matches_skimage():
    img, ref = noisy_pair((40, 50, 3))
    expected = peak_signal_noise_ratio(ref[4:-4, 4:-4], img[4:-4, 4:-4], data_range=255)
    assert psnr(img, ref, crop_border=4) == pytest.approx(expected, abs=1e-10)


def test_psnr_crop_border_ignores_borders():
    img, ref = noisy_pair((30, 30))
    damaged = img.copy()
    damaged[:3] = 0
    damaged[:, -3:] = 255
    assert psnr(damaged, ref, crop_border=3) == psnr(img, ref, crop_border=3)
    assert psnr(damaged, ref) < psnr(img, ref)


def test_psnr_y_channel_matches_skimage_on_y():
    img, ref = noisy_pair((40, 44, 3))
    expected = peak_signal_noise_ratio(rgb_to_y(ref), rgb_to_y(img), data_range=255)
    assert psnr(img, ref, y_channel=True) == pytest.approx(expected, abs=1e-10)
    expected_cropped = peak_signal_noise_ratio(
        rgb_to_y(ref)[2:-2, 2:-2], rgb_to_y(img)[2:-2, 2:-2], data_range=255
    )
    assert psnr(img, ref, crop_border=2, y_channel=True) == pytest.approx(
        expected_cropped, abs=1e-10
    )


def test_psnr_y_channel_offset_by_hand():
    ref = np.full((8, 8, 3), 100, dtype=np.uint8)
    img = ref + np.uint8(10)
    # A gray offset of 10 changes Y by 10 * 219 / 255, because the coefficients sum
    # to 219 (the studio range 16..235).
    expected = 20 * math.log10(255 / (10 * 219 / 255))
    assert psnr(img, ref, y_channel=True) == pytest.approx(expected, abs=1e-10)


# --------------------------------------------------------------------------------------
# SSIM


@pytest.mark.parametrize("shape", [(37, 45), (64, 48)])
def test_ssim_gray_matches_skimage(shape):
    img, ref = noisy_pair(shape, seed=1)
    assert ssim(img, ref) == pytest.approx(skimage_ssim(img, ref), abs=1e-12)


def test_ssim_rgb_is_channel_mean_like_skimage():
    img, ref = noisy_pair((40, 36, 3), seed=2)
    expected = skimage_ssim(img, ref, channel_axis=-1)
    assert ssim(img, ref) == pytest.approx(expected, abs=1e-12)
    per_channel = [ssim(img[..., c], ref[..., c]) for c in range(3)]
    assert ssim(img, ref) == pytest.approx(np.mean(per_channel), abs=1e-15)


def test_ssim_valid_equals_skimage_center_not_full_map():
    img, ref = noisy_pair((30, 34), seed=3)
    _, full_map = skimage_ssim(img, ref, full=True)
    assert ssim(img, ref) == pytest.approx(full_map[5:-5, 5:-5].mean(), abs=1e-12)
    # The 'same' map's border entries come from reflected padding and shift its mean.
    assert abs(ssim(img, ref) - full_map.mean()) > 1e-4


def test_ssim_y_channel_and_crop_match_skimage():
    img, ref = noisy_pair((44, 40, 3), seed=4)
    expected = skimage_ssim(rgb_to_y(img)[3:-3, 3:-3], rgb_to_y(ref)[3:-3, 3:-3])
    assert ssim(img, ref, crop_border=3, y_channel=True) == pytest.approx(
        expected, abs=1e-12
    )


def test_ssim_identical_is_one():
    img, _ = noisy_pair((24, 24, 3))
    assert ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-15)
    assert ssim(to_tensor(img), to_tensor(img)) == pytest.approx(1.0, abs=1e-15)


def test_ssim_constant_images_by_hand():
    # Constant images have zero variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 100.0, 110.0
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    img = np.full((16, 16), a, dtype=np.uint8)
    ref = np.full((16, 16), b, dtype=np.uint8)
    assert ssim(img, ref) == pytest.approx(expected, abs=1e-12)


def test_ssim_window_is_matlab_fspecial():
    window = gaussian_window_1d(11, 1.5)
    offsets = np.arange(-5, 6)
    xx, yy = np.meshgrid(offsets, offsets)
    fspecial = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    fspecial /= fspecial.sum()
    assert window.shape == (11,)
    assert np.allclose(np.outer(window, window), fspecial, atol=1e-15)


def test_ssim_rejects_image_below_window():
    img, ref = noisy_pair((14, 30))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(img, ref, crop_border=2)
    assert 0 < ssim(img, ref, crop_border=1) < 1


# --------------------------------------------------------------------------------------
# Y of YCbCr


def test_rgb_to_y_known_colours():
    colours = np.array(
        [[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]],
        dtype=np.uint8,
    )
    y = rgb_to_y(colours)
    assert y[0] == pytest.approx(235.0, abs=1e-12)
    assert y[1] == pytest.approx(16.0, abs=1e-12)
    assert y[2] == pytest.approx(16 + 65.481, abs=1e-12)
    assert y[3] == pytest.approx(16 + 128.553, abs=1e-12)
    assert y[4] == pytest.approx(16 + 24.966, abs=1e-12)


def test_rgb_to_y_gray_is_studio_range():
    gray = np.stack([np.arange(256)] * 3, axis=-1)
    assert np.allclose(rgb_to_y(gray), 16 + 219 * np.arange(256) / 255, atol=1e-12)


def test_rgb_to_y_rejects_non_rgb():
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_y(np.zeros((4, 4, 2)))


# --------------------------------------------------------------------------------------
# tensors


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_tensor_matches_uint8(metric):
    img, ref = noisy_pair((32, 30, 3), seed=5)
    expected = metric(img, ref, crop_border=1, y_channel=True)
    exact = metric(to_tensor(img), to_tensor(ref), crop_border=1, y_channel=True)
    assert exact == pytest.approx(expected, abs=1e-10)
    single = metric(
        to_tensor(img, torch.float32),
        to_tensor(ref, torch.float32),
        crop_border=1,
        y_channel=True,
    )
    assert single == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_tensor_shapes_agree(metric):
    img, ref = noisy_pair((24, 28), seed=6)
    expected = metric(img, ref)
    first, second = to_tensor(img), to_tensor(ref)
    assert metric(first, second) == pytest.approx(expected, abs=1e-10)
    assert metric(first[None], second[None]) == pytest.approx(expected, abs=1e-10)
    assert metric(first[None, None], second[None, None]) == pytest.approx(
        expected, abs=1e-10
    )


def test_tensor_is_not_rounded():
    ref = torch.full((1, 12, 12), 0.5, dtype=torch.float64)
    img = ref + 0.4 / 255
    # 0.4 gray levels off: rounding to integers would give 0 error and inf.
    assert psnr(img, ref) == pytest.approx(20 * math.log10(255 / 0.4), abs=1e-6)


def test_tensor_with_grad_is_accepted():
    ref = torch.rand(3, 16, 16, dtype=torch.float64)
    img = (ref * 0.9).requires_grad_()
    assert math.isfinite(psnr(img, ref))


# --------------------------------------------------------------------------------------
# input errors


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_rejects_mixed_kinds(metric):
    img, ref = noisy_pair((16, 16))
    with pytest.raises(ValueError, match="same kind"):
        metric(img, to_tensor(ref))


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_rejects_shape_mismatch(metric):
    img, _ = noisy_pair((16, 16, 3))
    _, ref = noisy_pair((16, 17, 3))
    with pytest.raises(ValueError, match="same shape"):
        metric(img, ref)
    with pytest.raises(ValueError, match="same shape"):
        metric(to_tensor(img), to_tensor(img)[None])


def test_rejects_float_array():
    img, ref = noisy_pair((16, 16))
    with pytest.raises(ValueError, match="expected uint8"):
        psnr(img.astype(np.float64), ref.astype(np.float64))


def test_rejects_integer_tensor():
    image = torch.zeros(1, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="float dtype"):
        psnr(image, image)


def test_rejects_tensor_out_of_range():
    ref = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        psnr(ref * 255, ref * 255)
    with pytest.raises(ValueError, match="clamp"):
        psnr(ref - 0.5, ref)


def test_rejects_nan_tensor():
    ref = torch.rand(1, 16, 16)
    img = ref.clone()
    img[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        psnr(img, ref)


@pytest.mark.parametrize(
    "shape", [(16,), (2, 16, 16, 3), (16, 16, 2), (16, 16, 4)], ids=str
)
def test_rejects_bad_array_shape(shape):
    image = np.zeros(shape, dtype=np.uint8)
    with pytest.raises(ValueError, match="must have shape"):
        psnr(image, image)


@pytest.mark.parametrize("shape", [(16,), (2, 3, 8, 8), (2, 8, 8), (3, 1, 8, 8)])
def test_rejects_bad_tensor_shape(shape):
    image = torch.zeros(shape)
    with pytest.raises(ValueError, match="must have shape"):
        psnr(image, image)


def test_rejects_bad_crop_border():
    img, ref = noisy_pair((10, 20))
    with pytest.raises(ValueError, match="removes every pixel"):
        psnr(img, ref, crop_border=5)
    with pytest.raises(ValueError, match="non-negative integer"):
        psnr(img, ref, crop_border=-1)
    with pytest.raises(ValueError, match="non-negative integer"):
        psnr(img, ref, crop_border=1.5)


def test_rejects_y_channel_on_gray():
    img, ref = noisy_pair((16, 16))
    with pytest.raises(ValueError, match="y_channel=True needs RGB"):
        psnr(img, ref, y_channel=True)
    with pytest.raises(ValueError, match="y_channel=True needs RGB"):
        ssim(to_tensor(img)[None], to_tensor(ref)[None], y_channel=True)


def test_rejects_other_types():
    with pytest.raises(ValueError, match="uint8 numpy array or a float torch tensor"):
        psnr([[1, 2], [3, 4]], [[1, 2], [3, 4]])
