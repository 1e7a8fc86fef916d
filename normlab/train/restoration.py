"""Training of the restoration models: DnCNN denoisers and EDSR super-resolution.

Each run trains with Adam for a fixed number of steps on random patches
(``DenoisePatches`` or ``SRPatches``, seeded by the run's seed). It evaluates the mean
PSNR on the first test set every ``eval_every`` steps and scores every test set at the
end. Importing
this module registers ``DenoiseConfig`` and ``SRConfig`` with the run store and the two
trainers with ``normlab.sweep.run_sweep``.

Evaluation follows the papers' test code:

- denoising: gray images with N(0, (sigma / 255)^2) noise drawn with a fixed seed per
  test image (``TEST_NOISE_SEED`` plus the image index), so every run sees the same
  noisy inputs. The output is clamped to [0, 1] and rounded to 8 bits before PSNR and
  SSIM are computed against the clean image.
- super-resolution: the LR input is MATLAB's bicubic downscaling of the mod-cropped HR
  image. The output is clamped and rounded to 8 bits, and PSNR and SSIM compare the Y
  channel with ``scale`` pixels cropped from each border.

``val_crop`` and ``test_crop`` evaluate on the central square of each test image
instead of the whole image, which keeps CPU runs short. The noise, or the bicubic LR
image, is then computed on the crop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.classification import DataError
from ..data.imresize import imresize
from ..data.restoration import (
    DenoisePatches,
    ImageSet,
    SRPatches,
    add_noise,
    image_to_tensor,
    load_embedded,
    SetNotFoundError,
    load_restoration,
    sr_pair,
    tensor_to_image,
)
from ..metrics import psnr, ssim
from ..models import EDSR, DnCNN
from ..nn.factory import resolve_norm_name
from ..probes.memory import SavedTensorReport, saved_tensor_bytes
from ..sweep import register_trainer
from .config import register_config
from .loop import DIVERGED, FINISHED, RunResult
from .weights import KeptWeights, trained_state

logger = logging.getLogger(__name__)

DENOISE, SR = "denoise", "sr"
TEST_NOISE_SEED = 10_000
# Sides of an evaluation crop below this leave too little for SSIM's 11x11 window
# after the SR border crop.
MIN_CROP = 32
# Trained weights kept in memory per run key, so that plots can show a run's output.
MAX_KEPT_MODELS = 64


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class RestorationConfig:
    """Fields shared by the denoising and super-resolution runs.

    Attributes:
        dataset: name of the loaded :class:`RestorationData`, checked by the trainer.
        norm: normalization inside the network, see ``normlab.nn.NORMS``.
        features: channels of the hidden feature maps.
        lr: Adam learning rate (betas 0.9 and 0.999, eps 1e-8).
        lr_milestones: steps after which the learning rate is multiplied by
            ``lr_gamma``, as ``torch.optim.lr_scheduler.MultiStepLR`` does.
        lr_gamma: factor applied at each milestone.
        batch_size: patches per step.
        steps: optimizer steps of the run.
        patches_per_epoch: patches drawn per epoch. Each epoch draws new crops,
            flips and noise, and the ``epoch`` column of the history counts epochs.
        eval_every: steps between two validation PSNRs on the first test set.
        val_crop: side of the central crop used for the validation PSNR, None for
            whole images.
        test_crop: side of the central crop used for the final test metrics, None
            for whole images.
        seed: seeds the weight initialization and the patches.
        diverge_loss: a training loss above this (or NaN/Inf) stops the run as
            diverged. The losses are per-pixel means on [0, 1] images, so 100 is far
            beyond any loss of a run that still learns.
        device: ``"cpu"`` or ``"cuda"``.
    """

    task: ClassVar[str] = ""

    dataset: str = ""
    norm: str = "batchnorm"
    features: int = 64
    lr: float = 1e-3
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.5
    batch_size: int = 16
    steps: int = 1000
    patches_per_epoch: int = 16_000
    eval_every: int = 100
    val_crop: Optional[int] = None
    test_crop: Optional[int] = None
    seed: int = 0
    diverge_loss: float = 100.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        milestones = tuple(int(m) for m in self.lr_milestones)
        object.__setattr__(self, "lr_milestones", milestones)
        object.__setattr__(self, "norm", resolve_norm_name(self.norm))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(
                f"dataset must name the loaded restoration data, got {self.dataset!r}"
            )
        _positive_finite("lr", self.lr)
        _positive_finite("diverge_loss", self.diverge_loss)
        if not (0.0 < self.lr_gamma <= 1.0):
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        counts = ("features", "batch_size", "steps", "patches_per_epoch", "eval_every")
        for name in counts:
            _positive_int(name, getattr(self, name))
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)) or any(
            m < 1 for m in self.lr_milestones
        ):
            raise ValueError(
                f"lr_milestones must be increasing positive steps, got "
                f"{self.lr_milestones}"
            )
        for name in ("val_crop", "test_crop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < MIN_CROP):
                raise ValueError(
                    f"{name} must be None (whole images) or an integer of at least "
                    f"{MIN_CROP} pixels, got {value!r}"
                )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["lr_milestones"] = list(self.lr_milestones)
        return data

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**data)

    def key(self) -> str:
        """Return a stable hex digest of the task and every field."""
        payload = {"task": self.task, **self.to_dict()}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@register_config
@dataclass(frozen=True)
class DenoiseConfig(RestorationConfig):
    """One DnCNN run for Gaussian denoising at a fixed noise level (DnCNN-S).

    The defaults are DnCNN-S of Zhang et al. (2017): 17 layers of 64 channels with BN
    and residual learning, 40x40 patches, batches of 128, sigma 25, Adam at lr 1e-3.

    The loss is the mean squared error between the output and the clean patch. With
    ``residual=True`` the output is ``y - R(y)``, so this equals the paper's residual
    loss ``1/(2N) sum ||R(y) - (y - x)||^2`` divided by half the pixels per patch, a
    constant that Adam's update ignores (up to its eps).

    Attributes:
        depth: convolution layers of DnCNN.
        residual: predict the noise and subtract it (True), or the clean image.
        sigma: noise level on the 0-255 scale, for training and testing.
        patch_size: side of the training patches.
    """

    task: ClassVar[str] = DENOISE

    dataset: str = "embedded-denoise"
    depth: int = 17
    residual: bool = True
    sigma: float = 25.0
    patch_size: int = 40
    batch_size: int = 128
    patches_per_epoch: int = 128 * 1600

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.depth, int) or self.depth < 3:
            raise ValueError(
                f"depth must be an integer of at least 3, got {self.depth!r}"
            )
        if not isinstance(self.residual, bool):
            raise ValueError(f"residual must be True or False, got {self.residual!r}")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be a non-negative number, got {self.sigma!r}")
        _positive_int("patch_size", self.patch_size)


@register_config
@dataclass(frozen=True)
class SRConfig(RestorationConfig):
    """One EDSR run for bicubic super-resolution.

    The defaults are the EDSR baseline of Lim et al. (2017) at x2: 16 residual blocks
    of 64 channels without normalization, LR patches of 48x48, batches of 16, L1 loss,
    Adam at lr 1e-4 halved every 200,000 steps.

    Attributes:
        scale: upscaling factor, 2, 3 or 4.
        blocks: residual blocks.
        res_scale: factor on each residual branch.
        lr_patch: side of the LR training patches.
    """

    task: ClassVar[str] = SR

    dataset: str = "embedded-sr"
    norm: str = "none"
    scale: int = 2
    blocks: int = 16
    res_scale: float = 1.0
    lr_patch: int = 48
    lr: float = 1e-4
    lr_milestones: tuple[int, ...] = (200_000,)
    batch_size: int = 16
    patches_per_epoch: int = 16_000

    def validate(self) -> None:
        super().validate()
        if self.scale not in (2, 3, 4) or isinstance(self.scale, bool):
            raise ValueError(f"scale must be 2, 3 or 4, got {self.scale!r}")
        _positive_int("blocks", self.blocks)
        _positive_int("lr_patch", self.lr_patch)
        _positive_finite("res_scale", self.res_scale)


def _positive_finite(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# -- data ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RestorationData:
    """Training images and named test sets of one restoration task.

    Attributes:
        task: ``"denoise"`` or ``"sr"``.
        name: what the configs' ``dataset`` field must equal, the training set's name.
        train_images: the training images.
        tests: test sets by name, in order. The first one gives the validation curve
            and the ``test_psnr`` and ``test_ssim`` of a run.
        source: where the images came from, for the report.
    """

    task: str
    name: str
    train_images: ImageSet
    tests: dict[str, ImageSet]
    source: str
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> int:
        return 1 if self.train_images.mode == "L" else 3

    def fingerprint(self) -> str:
        """Return a digest of every image, so a run store never mixes two copies.

        A lazy set (DIV2K) contributes its file names, image sizes and file sizes
        instead of its pixels, because decoding 800 large images takes minutes.
        """
        digest = hashlib.sha256(self.task.encode())
        for label, images in (("train", self.train_images), *self.tests.items()):
            header = f"{label}:{images.name}:{images.names}:{images.sizes}"
            digest.update(header.encode())
            if images.lazy:
                file_sizes = [path.stat().st_size for path in images.paths]
                digest.update(str(file_sizes).encode())
            else:
                for image in images.images:
                    digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()[:20]

    @property
    def primary_test(self) -> str:
        return next(iter(self.tests))


# training set, then test sets; a missing optional test set is skipped
_FOLDER_SETS = {
    DENOISE: (("bsd400",), ("bsd68",), ("set12",)),
    SR: (("div2k", "t91"), ("set5",), ("set14",)),
}


def load_restoration_data(
    task: str, data_dir=None, download: bool = False
) -> RestorationData:
    """Load the training and test images of ``task`` from ``data_dir``.

    With ``download``, sets missing from ``data_dir`` are downloaded into it first
    (DIV2K excepted), with their SHA-256 sums checked.

    Denoising trains on BSD400 and tests on BSD68, then Set12 when present.
    Super-resolution trains on DIV2K, or on T91 when DIV2K is missing, and tests on
    Set5, then Set14 when present. Without ``data_dir`` the scikit-image photographs
    of ``load_embedded`` are used, with names ``embedded-denoise`` and
    ``embedded-sr``.

    Raises:
        DataError: for an unknown task, or a ``data_dir`` that lacks the training
            set or the first test set.
    """
    if task not in _FOLDER_SETS:
        raise DataError(f"unknown restoration task {task!r}; choose denoise or sr")
    if data_dir is None:
        train = load_embedded(task, "train")
        test = load_embedded(task, "test")
        return RestorationData(
            task, f"embedded-{task}", train, {"skimage": test}, test.source
        )

    train_choices, first_test, *optional = _FOLDER_SETS[task]
    train = _first_found(train_choices, data_dir, download)
    tests = {first_test[0]: load_restoration(first_test[0], data_dir, download)}
    for (name,) in optional:
        try:
            tests[name] = load_restoration(name, data_dir, download)
        except SetNotFoundError as error:
            logger.info("test set %s skipped: %s", name, error)
    sources = [f"train {train.name}: {train.source}"]
    sources += [f"test {name}: {images.source}" for name, images in tests.items()]
    return RestorationData(task, train.name, train, tests, "; ".join(sources))


def load_claim_data(task: str, data_dir=None, download: bool = False) -> RestorationData:
    """Load the sets of ``task`` from ``data_dir``, or the photographs without it.

    A ``data_dir`` that lacks the sets falls back to the scikit-image photographs with
    a logged warning, because one ``normlab verify --data-dir`` serves the claims of
    every task. A missing ``data_dir``, or a set that is there but cannot be read (a
    corrupt image, a checksum mismatch, a set folder without images), raises.
    """
    if data_dir is not None:
        try:
            return load_restoration_data(task, data_dir, download)
        except SetNotFoundError as error:
            logger.warning(
                "%s; the %s claims use the scikit-image photographs instead",
                error,
                task,
            )
    return load_restoration_data(task, None)


def _first_found(names: tuple[str, ...], data_dir, download: bool = False) -> ImageSet:
    # only the last choice is downloaded: the earlier ones (DIV2K) are used when present
    for name in names[:-1]:
        try:
            return load_restoration(name, data_dir)
        except SetNotFoundError as error:
            logger.info("%s not used: %s", name, error)
    return load_restoration(names[-1], data_dir, download)


def center_crop(
    image: np.ndarray, size: Optional[int], multiple: int = 1
) -> np.ndarray:
    """Return the central ``size`` x ``size`` square of ``image`` (whole if None).

    A side shorter than ``size`` is kept whole. With ``multiple`` the top-left corner
    and the sides are multiples of it, so that an SR crop stays on the LR grid.
    """
    if size is None:
        return image
    height, width = image.shape[:2]
    crop_h = min(size, height) // multiple * multiple
    crop_w = min(size, width) // multiple * multiple
    top = (height - crop_h) // 2 // multiple * multiple
    left = (width - crop_w) // 2 // multiple * multiple
    return image[top : top + crop_h, left : left + crop_w]


@dataclass(frozen=True)
class EvalPair:
    """One test image: the network input and the uint8 reference.

    ``baseline`` is what the input alone gives: the noisy image (clamped, 8 bits)
    for denoising, the bicubic upscaling of the LR image for SR.
    """

    name: str
    input: torch.Tensor
    reference: np.ndarray
    baseline: np.ndarray


def denoise_pairs(
    data: RestorationData, test_set: str, sigma: float, crop: Optional[int]
) -> list[EvalPair]:
    """Return the noisy test inputs of ``test_set``, cached on ``data``."""
    key = (DENOISE, test_set, float(sigma), crop)
    if key not in data._cache:
        pairs = []
        images = data.tests[test_set]
        for index, name in enumerate(images.names):
            # a writable copy, because torch warns about read-only decoded images
            clean = center_crop(images[index], crop).copy()
            noisy = add_noise(clean, sigma, seed=TEST_NOISE_SEED + index)
            pairs.append(EvalPair(name, noisy, clean, tensor_to_image(noisy)))
        data._cache[key] = pairs
    return data._cache[key]


def sr_pairs(
    data: RestorationData, test_set: str, scale: int, crop: Optional[int]
) -> list[EvalPair]:
    """Return the bicubic LR inputs of ``test_set``, cached on ``data``."""
    key = (SR, test_set, scale, crop)
    if key not in data._cache:
        pairs = []
        images = data.tests[test_set]
        for index, name in enumerate(images.names):
            hr, lr = sr_pair(np.ascontiguousarray(images[index]), scale)
            if crop is not None:
                # crop the HR image on the LR grid, then downscale the crop itself
                hr_crop = np.ascontiguousarray(center_crop(hr, crop, scale))
                hr, lr = sr_pair(hr_crop, scale)
            bicubic = imresize(lr, float(scale))
            pairs.append(EvalPair(name, image_to_tensor(lr), hr, bicubic))
        data._cache[key] = pairs
    return data._cache[key]


def eval_pairs(config: RestorationConfig, data, test_set: str, crop) -> list[EvalPair]:
    if config.task == DENOISE:
        return denoise_pairs(data, test_set, config.sigma, crop)
    return sr_pairs(data, test_set, config.scale, crop)


# -- models and scores -----------------------------------------------------------------


def build_restoration_model(config: RestorationConfig, channels: int) -> nn.Module:
    """Build the DnCNN or EDSR network that ``config`` describes."""
    if config.task == DENOISE:
        return DnCNN(
            channels, config.depth, config.features, config.norm, config.residual
        )
    return EDSR(
        config.scale,
        channels,
        config.features,
        config.blocks,
        config.res_scale,
        config.norm,
    )


def loss_function(config: RestorationConfig) -> Callable:
    """Return the training loss: MSE for denoising, L1 for SR (per-pixel means)."""
    return F.mse_loss if config.task == DENOISE else F.l1_loss


@torch.no_grad()
def restore(model: nn.Module, pair: EvalPair, device) -> Optional[np.ndarray]:
    """Run ``model`` in eval mode on one test input, or return None for NaN/Inf."""
    was_training = model.training
    model.eval()
    output = model(pair.input.unsqueeze(0).to(device))
    model.train(was_training)
    if not torch.isfinite(output).all():
        return None
    return tensor_to_image(output[0])


def score(config: RestorationConfig, image: np.ndarray, reference: np.ndarray,
          with_ssim: bool = True) -> tuple[float, float]:
    """Return (PSNR, SSIM) of a uint8 output, on Y with the scale border for SR."""
    # NOTE: a grayscale file in an RGB test set (Set14's bridge.bmp) is replicated into
    # three channels and scored on Y. The published tables score it on its gray values,
    # so the Set14 mean here is about 0.09 dB higher for every method.
    border = config.scale if config.task == SR else 0
    y_channel = config.task == SR
    value = psnr(image, reference, crop_border=border, y_channel=y_channel)
    if not with_ssim:
        return value, math.nan
    return value, ssim(image, reference, crop_border=border, y_channel=y_channel)


def evaluate_set(config, model, pairs, device, with_ssim: bool) -> tuple[float, float]:
    """Return the mean (PSNR, SSIM) of ``model`` over ``pairs``; NaN if any fails."""
    values = []
    for pair in pairs:
        output = restore(model, pair, device)
        if output is None:
            return math.nan, math.nan
        values.append(score(config, output, pair.reference, with_ssim))
    psnrs, ssims = zip(*values)
    return float(np.mean(psnrs)), float(np.mean(ssims))


def baseline_scores(config, pairs) -> tuple[float, float]:
    """Return the mean (PSNR, SSIM) of the noisy or bicubic inputs over ``pairs``."""
    values = [score(config, pair.baseline, pair.reference) for pair in pairs]
    psnrs, ssims = zip(*values)
    return float(np.mean(psnrs)), float(np.mean(ssims))


@functools.lru_cache(maxsize=16)
def measure_saved_memory(config: RestorationConfig, channels: int) -> SavedTensorReport:
    """Measure the bytes autograd saves in one training step of ``config``'s network.

    One train-mode forward pass and the loss run on a batch of ``batch_size`` random
    patches of the training size, on the CPU. The count depends on the shapes only, so
    the result is the same on every device and for every seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_restoration_model(config, channels)
        if config.task == DENOISE:
            size = config.patch_size
            inputs = torch.rand(config.batch_size, channels, size, size)
            target = torch.rand_like(inputs)
        else:
            size = config.lr_patch
            inputs = torch.rand(config.batch_size, channels, size, size)
            target = torch.rand(
                config.batch_size, channels, size * config.scale, size * config.scale
            )
        loss = loss_function(config)
        return saved_tensor_bytes(model, inputs, loss_fn=lambda out: loss(out, target))


# -- training --------------------------------------------------------------------------


def train_denoiser(
    config: DenoiseConfig,
    data: RestorationData,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> RunResult:
    """Train the DnCNN that ``config`` describes on ``data`` and return its metrics.

    Final metrics: ``test_psnr`` and ``test_ssim`` on the first test set,
    ``test_psnr_<set>`` and ``test_ssim_<set>`` for every test set, ``input_psnr`` and
    ``input_ssim`` of the noisy inputs of the first set, ``best_psnr`` (highest
    validation PSNR) and ``train_loss``. Test metrics are NaN for a diverged run.
    The history rows have ``step``, ``epoch``, ``train_loss`` and ``val_psnr`` (dB).
    """
    if not isinstance(config, DenoiseConfig):
        raise ValueError(
            f"train_denoiser needs a DenoiseConfig, got {type(config).__name__}"
        )
    return _train_seeded(config, data, on_step)


def train_sr(
    config: SRConfig,
    data: RestorationData,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> RunResult:
    """Train the EDSR that ``config`` describes on ``data`` and return its metrics.

    The final metrics and history are those of :func:`train_denoiser`, with
    ``bicubic_psnr`` and ``bicubic_ssim`` (bicubic upscaling of the LR inputs of the
    first set) in place of ``input_psnr`` and ``input_ssim``.
    """
    if not isinstance(config, SRConfig):
        raise ValueError(f"train_sr needs an SRConfig, got {type(config).__name__}")
    return _train_seeded(config, data, on_step)


def _train_seeded(config, data, on_step) -> RunResult:
    """Check the inputs and train inside a forked, seeded random state."""
    if not isinstance(data, RestorationData) or data.task != config.task:
        raise ValueError(
            f"{config.task} runs need RestorationData of task {config.task!r}, got "
            f"{type(data).__name__}; load it with "
            f"load_restoration_data({config.task!r})"
        )
    if config.dataset != data.name:
        raise ValueError(
            f"config dataset {config.dataset!r} does not match the loaded data "
            f"{data.name!r}; build the config with dataset={data.name!r}"
        )
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {config.device!r} requested but CUDA is not available; use "
            "--device cpu"
        )
    device = torch.device(config.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return _train(config, data, device, on_step)


def _patches(config: RestorationConfig, data: RestorationData):
    if config.task == DENOISE:
        return DenoisePatches(
            data.train_images,
            config.patch_size,
            config.sigma,
            num_patches=config.patches_per_epoch,
            seed=config.seed,
        )
    return SRPatches(
        data.train_images,
        config.scale,
        config.lr_patch,
        num_patches=config.patches_per_epoch,
        seed=config.seed,
    )


def _batch(patches, config: RestorationConfig, step: int, device):
    """Return the inputs, targets and 1-based epoch of ``step`` (counted from 1)."""
    inputs, targets = [], []
    first = (step - 1) * config.batch_size
    for position in range(first, first + config.batch_size):
        patches.set_epoch(position // config.patches_per_epoch)
        source, target = patches[position % config.patches_per_epoch]
        inputs.append(source)
        targets.append(target)
    epoch = (first + config.batch_size - 1) // config.patches_per_epoch + 1
    return torch.stack(inputs).to(device), torch.stack(targets).to(device), epoch


def _train(config, data, device, on_step) -> RunResult:
    started = time.perf_counter()
    model = build_restoration_model(config, data.channels).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma
    )
    loss_fn = loss_function(config)
    patches = _patches(config, data)
    val_pairs = eval_pairs(config, data, data.primary_test, config.val_crop)

    history: list[dict] = []
    step_loss: list[float] = []
    diverged_step = None
    model.train()
    for step in range(1, config.steps + 1):
        # data: fresh random patches in every epoch
        inputs, targets, epoch = _batch(patches, config, step, device)

        # forward, backward and update
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        # divergence check: NaN, Inf or an exploding loss ends the run
        loss_value = loss.item()
        step_loss.append(loss_value)
        if not math.isfinite(loss_value) or loss_value > config.diverge_loss:
            diverged_step = step
            break
        if on_step is not None:
            on_step(step, config.steps)

        # periodic validation PSNR on the first test set
        if step % config.eval_every == 0 or step == config.steps:
            row = _validation_row(config, model, val_pairs, device, step_loss, history)
            row["epoch"] = epoch
            history.append(row)
            if not math.isfinite(row["val_psnr"]):
                diverged_step = step
                break

    diverged = diverged_step is not None
    if diverged:
        logger.debug(
            "run %s diverged at step %d (lr=%g)", config.key(), step, config.lr
        )
    else:
        _KEPT_WEIGHTS.keep(config.key(), model)
    final = _final_metrics(config, data, model, device, diverged)
    finite = [row["val_psnr"] for row in history if math.isfinite(row["val_psnr"])]
    final["best_psnr"] = max(finite, default=math.nan)
    final["train_loss"] = history[-1]["train_loss"] if history else math.nan
    return RunResult(
        status=DIVERGED if diverged else FINISHED,
        steps=len(step_loss),
        diverged_step=diverged_step,
        final=final,
        history=history,
        step_loss=step_loss,
        wall_time=time.perf_counter() - started,
    )


def _validation_row(config, model, val_pairs, device, step_loss, history) -> dict:
    """Return the history row of the current step, without its epoch."""
    step = len(step_loss)
    since = history[-1]["step"] if history else 0
    recent = step_loss[since:step]
    val_psnr, _ = evaluate_set(config, model, val_pairs, device, with_ssim=False)
    return {
        "step": step,
        "epoch": None,
        "train_loss": sum(recent) / len(recent),
        "val_psnr": val_psnr,
    }


def _final_metrics(config, data, model, device, diverged: bool) -> dict:
    final = {}
    for index, test_set in enumerate(data.tests):
        pairs = eval_pairs(config, data, test_set, config.test_crop)
        if diverged:
            value, similarity = math.nan, math.nan
        else:
            value, similarity = evaluate_set(
                config, model, pairs, device, with_ssim=True
            )
        final[f"test_psnr_{test_set}"] = value
        final[f"test_ssim_{test_set}"] = similarity
        if index == 0:
            final["test_psnr"], final["test_ssim"] = value, similarity
            base_psnr, base_ssim = baseline_scores(config, pairs)
            prefix = "input" if config.task == DENOISE else "bicubic"
            final[f"{prefix}_psnr"], final[f"{prefix}_ssim"] = base_psnr, base_ssim
    return final


# -- trained weights for plots ---------------------------------------------------------

_KEPT_WEIGHTS = KeptWeights(MAX_KEPT_MODELS)


def trained_model(
    config: RestorationConfig,
    data: RestorationData,
    checkpoint_dir: Optional[Path] = None,
) -> Optional[nn.Module]:
    """Return the network of a finished run, in eval mode on the CPU.

    The weights come from this process's memory when the run trained here, else from
    ``checkpoint_dir/<key>.pt``, else from training the run again. A run is
    deterministic for its seed on one machine, so retraining gives the same network
    there. The weights are saved into ``checkpoint_dir`` when it is given. Returns
    None when the run diverges.
    """
    trainer = train_denoiser if config.task == DENOISE else train_sr
    state = trained_state(
        config.key(), _KEPT_WEIGHTS, checkpoint_dir,
        retrain=lambda: trainer(config, data).status == FINISHED,
    )
    if state is None:
        return None
    model = build_restoration_model(config, data.channels)
    model.load_state_dict(state)
    return model.eval()


# -- registration with the sweep -------------------------------------------------------


def _denoise_task(config, data) -> RunResult:
    # looked up at call time, so tests can replace train_denoiser in this module
    return train_denoiser(config, data)


def _sr_task(config, data) -> RunResult:
    return train_sr(config, data)


register_trainer(DENOISE, _denoise_task)
register_trainer(SR, _sr_task)
