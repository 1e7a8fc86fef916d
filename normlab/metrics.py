"""Image quality metrics of the restoration literature: PSNR and SSIM.

Both follow the conventions of the denoising and super-resolution papers that the lab
compares against (DnCNN, EDSR and the MATLAB evaluation scripts behind their tables):

- values are on the 0-255 scale, so ``L = 255``;
- ``y_channel=True`` compares the luma Y of YCbCr as MATLAB's ``rgb2ycbcr`` computes it
  (ITU-R BT.601, studio range): ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G
  and B in [0, 1], so Y lies in [16, 235]. MATLAB rounds Y to uint8 when its input is
  uint8, but this module keeps Y in float64. On bicubic-upscaled Set5 that gives a
  mean PSNR 0.03 dB (x2) and 0.01 dB (x4) higher than rounding Y first;
- ``crop_border`` pixels are removed from each side before comparing, as SR papers do
  with ``crop_border = scale``;
- SSIM is the one of Wang et al., "Image quality assessment: from error visibility to
  structural similarity", IEEE TIP 13(4), 2004, as their reference MATLAB code
  ``ssim_index.m`` computes it: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
  K2 = 0.03, 'valid' filtering (no padding, so the SSIM map is 10 pixels smaller along
  each axis), the mean of the map, and no downsampling of large images. On RGB images
  without ``y_channel`` it is the mean of the three per-channel values.

Inputs are uint8 NumPy arrays or float tensors in [0, 1]. A float tensor is compared as
if multiplied by 255 without rounding to integers, so a network output gives the PSNR of
its exact values. Quantise it first (``(x * 255).round() / 255``) to get the PSNR of
the saved 8-bit image.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Coefficients of MATLAB's rgb2ycbcr for Y, applied to R, G, B in [0, 1].
Y_COEFFICIENTS = np.array([65.481, 128.553, 24.966])
Y_OFFSET = 16.0

DATA_RANGE = 255.0
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr(
    img: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    crop_border: int = 0,
    y_channel: bool = False,
) -> float:
    """Compute the peak signal-to-noise ratio of ``img`` against ``ref`` in dB.

    PSNR = 10 log10(255^2 / MSE), with the MSE over every pixel and channel left after
    cropping, in float64.

    Args:
        img: the image to score, a uint8 array or a float tensor in [0, 1].
        ref: the reference image, of the same kind and shape as ``img``.
        crop_border: pixels to remove from each of the four sides first.
        y_channel: compare only Y of YCbCr (BT.601 as MATLAB's ``rgb2ycbcr``); needs
            RGB images.

    Shape:
        - uint8 arrays: (H, W) or (H, W, C) with C = 1 or 3, RGB order.
        - float tensors: (H, W), (C, H, W) or (1, C, H, W) with C = 1 or 3.

    Returns:
        PSNR in dB, ``math.inf`` for identical images.

    Raises:
        ValueError: for inputs of different kinds or shapes, an unsupported dtype or
            shape, float values outside [0, 1], a crop that leaves no pixels, or
            ``y_channel`` with images that are not RGB.
    """
    first, second = _prepare_pair(img, ref, crop_border, y_channel)
    mse = float(np.mean((first - second) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(DATA_RANGE**2 / mse)


def ssim(
    img: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    crop_border: int = 0,
    y_channel: bool = False,
) -> float:
    """Compute the structural similarity (SSIM) of ``img`` against ``ref``.

    SSIM(x, y) = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) /
    ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)), with C1 = (0.01 * 255)^2 and
    C2 = (0.03 * 255)^2, the local statistics weighted by an 11x11 Gaussian window with
    sigma 1.5 (population variances), averaged over all window positions that fit
    inside the image ('valid').

    Args:
        img: the image to score, a uint8 array or a float tensor in [0, 1].
        ref: the reference image, of the same kind and shape as ``img``.
        crop_border: pixels to remove from each of the four sides first.
        y_channel: compare only Y of YCbCr; needs RGB images. Without it, an RGB image
            scores the mean of its three channel SSIMs.

    Shape:
        The same as :func:`psnr`. After cropping, each side must have at least 11
        pixels.

    Returns:
        SSIM, 1.0 for identical images.

    Raises:
        ValueError: as :func:`psnr`, and for images smaller than the 11x11 window.
    """
    first, second = _prepare_pair(img, ref, crop_border, y_channel)
    height, width = first.shape[:2]
    if min(height, width) < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE} "
            f"pixels after cropping, got {height}x{width}; use larger images or a "
            f"smaller crop_border"
        )
    window = gaussian_window_1d(SSIM_WINDOW_SIZE, SSIM_SIGMA)
    values = [
        _ssim_channel(first[..., channel], second[..., channel], window)
        for channel in range(first.shape[2])
    ]
    return float(np.mean(values))


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """Return Y of YCbCr on the 0-255 scale for RGB values on the 0-255 scale.

    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 in float64, not rounded: white
    gives 235 and black 16.

    Shape:
        - rgb: (..., 3).
        - output: (...).
    """
    values = np.asarray(rgb, dtype=np.float64)
    if values.shape[-1] != 3:
        raise ValueError(
            f"rgb must have 3 channels in its last axis, got shape {values.shape}"
        )
    return Y_OFFSET + values @ (Y_COEFFICIENTS / 255.0)


def gaussian_window_1d(size: int, sigma: float) -> np.ndarray:
    """Return the normalised 1-D Gaussian whose outer product is MATLAB's window.

    ``fspecial('gaussian', size, sigma)`` is exp(-(x^2 + y^2) / (2 sigma^2)) divided by
    its sum, which equals the outer product of this vector with itself.
    """
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    weights = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def _ssim_channel(first: np.ndarray, second: np.ndarray, window: np.ndarray) -> float:
    """Return the mean SSIM of two float64 (H, W) images on the 0-255 scale."""
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    mu1 = _filter_valid(first, window)
    mu2 = _filter_valid(second, window)
    mu1_sq = mu1 * mu1
    mu2_sq = mu2 * mu2
    mu1_mu2 = mu1 * mu2
    sigma1_sq = _filter_valid(first * first, window) - mu1_sq
    sigma2_sq = _filter_valid(second * second, window) - mu2_sq
    sigma12 = _filter_valid(first * second, window) - mu1_mu2
    numerator = (2.0 * mu1_mu2 + c1) * (2.0 * sigma12 + c2)
    denominator = (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    return float(np.mean(numerator / denominator))


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Correlate (H, W) with the separable window, keeping only full overlaps."""
    size = window.shape[0]
    rows = np.lib.stride_tricks.sliding_window_view(image, size, axis=0) @ window
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=1) @ window


def _prepare_pair(
    img: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    crop_border: int,
    y_channel: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Return both images as float64 (H, W, C) on the 0-255 scale, cropped."""
    first = _to_hwc_255(img, "img")
    second = _to_hwc_255(ref, "ref")
    if isinstance(img, torch.Tensor) != isinstance(ref, torch.Tensor):
        raise ValueError(
            f"img and ref must be of the same kind, got {type(img).__name__} and "
            f"{type(ref).__name__}; pass two uint8 arrays or two float tensors"
        )
    if tuple(img.shape) != tuple(ref.shape):
        raise ValueError(
            f"img and ref must have the same shape, got {tuple(img.shape)} and "
            f"{tuple(ref.shape)}"
        )

    if not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise ValueError(
            f"crop_border must be a non-negative integer, got {crop_border!r}"
        )
    height, width = first.shape[:2]
    if 2 * crop_border >= min(height, width):
        raise ValueError(
            f"crop_border={crop_border} removes every pixel of a {height}x{width} "
            f"image; use a crop_border below {min(height, width) / 2}"
        )
    if crop_border:
        first = first[crop_border:-crop_border, crop_border:-crop_border]
        second = second[crop_border:-crop_border, crop_border:-crop_border]

    if y_channel:
        if first.shape[2] != 3:
            raise ValueError(
                f"y_channel=True needs RGB images with 3 channels, got "
                f"{first.shape[2]}; use y_channel=False for grayscale images"
            )
        first = rgb_to_y(first)[..., None]
        second = rgb_to_y(second)[..., None]
    return first, second


def _to_hwc_255(image: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Return a uint8 array or a [0, 1] float tensor as float64 (H, W, C) * 255."""
    if isinstance(image, torch.Tensor):
        return _tensor_to_hwc_255(image, name)
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"{name} must be a uint8 numpy array or a float torch tensor, got "
            f"{type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise ValueError(
            f"{name} is a numpy array of dtype {image.dtype}, expected uint8; pass "
            f"8-bit images, or float images in [0, 1] as torch tensors"
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(
            f"{name} must have shape (H, W) or (H, W, C) with C = 1 or 3, got "
            f"{image.shape}"
        )
    return image.astype(np.float64)


def _tensor_to_hwc_255(tensor: torch.Tensor, name: str) -> np.ndarray:
    """Return a float tensor in [0, 1] as a float64 (H, W, C) array times 255."""
    if not tensor.is_floating_point():
        raise ValueError(
            f"{name} is a torch tensor of dtype {tensor.dtype}, expected a float "
            f"dtype with values in [0, 1]; pass integer images as uint8 numpy arrays"
        )
    shape = tuple(tensor.shape)
    if tensor.ndim == 4 and shape[0] == 1:
        tensor = tensor[0]
    elif tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(
            f"{name} must have shape (H, W), (C, H, W) or (1, C, H, W) with C = 1 or "
            f"3, got {shape}"
        )
    values = tensor.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{name} has values in [{low:.4g}, {high:.4g}], expected [0, 1]; clamp "
            f"with .clamp(0, 1), or divide 0-255 images by 255"
        )
    return np.moveaxis(values, 0, -1) * DATA_RANGE
