"""DCGAN training on an image classification set, and the measurements of a generator.

Each run trains a :class:`~normlab.models.DCGANGenerator` and a
:class:`~normlab.models.DCGANDiscriminator` with the non-saturating GAN loss (binary
cross-entropy on the discriminator's logits, the generator's target "real"), one
discriminator step and one generator step per batch, Adam for both, as in
pytorch/examples (dcgan/main.py). At the end it measures the generator, in eval mode:

- reconstruction error: for held-out real images, ``z`` is optimized with the generator
  frozen (:func:`reconstruction_mse`), the metric of Xiang and Li, "On the Effects of
  Batch and Weight Normalization in Generative Adversarial Networks", 2017,
  https://arxiv.org/abs/1704.03971.
- diversity: the mean pairwise distance of generated samples over that of real images
  (:func:`diversity_ratio`), which is near 0 when the generator has collapsed.
- batch dependence: how much one sample changes when the rest of its batch changes, in
  train and in eval mode (:func:`batch_dependence`).

Importing this module registers :class:`GANConfig` with the run store and
:func:`train_gan` with ``normlab.sweep.run_sweep``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.dcgan import DCGANDiscriminator, DCGANGenerator, num_stages
from ..nn.factory import resolve_norm_name
from ..nn.weightnorm import init_weight_norm_
from ..sweep import register_trainer
from .config import register_config
from .loop import DIVERGED, FINISHED, RunResult
from .weights import KeptWeights, trained_state

logger = logging.getLogger(__name__)

GAN = "gan"
# Seeds of the fixed latent codes and companions, the same for every run and seed, so
# that runs are measured on the same inputs.
SAMPLE_SEED = 20_000
RECON_SEED = 30_000
PITFALL_SEED = 40_000
# Samples and real images compared by the diversity ratio.
DIVERSITY_SAMPLES = 128
# Samples per batch whose outputs the batch-dependence measurement compares.
PITFALL_TARGETS = 8

# Collapse rule, applied to a finished run by :func:`collapse_reason`.
# NOTE: both thresholds are set by judgment, not calibrated on a labelled set of runs.
MIN_DIVERSITY = 0.2
# "The discriminator wins": its loss near 0 while the generator loss explodes. A
# generator loss of 5 means D(G(z)) is about exp(-5) = 0.007 on average.
WIN_D_LOSS = 0.05
WIN_G_LOSS = 5.0

# Trained generator weights kept in memory per run key, so that plots can sample them.
MAX_KEPT_MODELS = 64


# -- configuration ---------------------------------------------------------------------


@register_config
@dataclass(frozen=True)
class GANConfig:
    """Everything that decides the numbers of one DCGAN run.

    Attributes:
        dataset: name of the loaded classification data (``digits``, ``mnist``,
            ``cifar10``), checked by the trainer.
        norm: normalization of both networks, see ``normlab.nn.NORMS``. The claims
            use ``"batchnorm"``, ``"weightnorm"`` and ``"none"``.
        image_size: side of the generated images, a power of 2 of at least 8. Real
            images are resized to it with bilinear interpolation.
        latent_dim: size of the latent code ``z ~ N(0, I)``.
        features: channels of the generator's last and the discriminator's first
            hidden layer.
        lr: Adam learning rate of both networks.
        beta1, beta2: Adam betas of both networks.
        batch_size: real images, and generated images, per step.
        steps: steps of the run, each one discriminator and one generator update.
        eval_every: steps between two history rows.
        wn_init: with ``norm="weightnorm"``, apply the data-dependent initialization
            of Salimans and Kingma (2016) to each network before training, on one
            batch of latent codes (generator) and of real images (discriminator).
        recon_images: held-out images (the first of the test split) that the
            reconstruction error averages over.
        recon_steps: Adam steps on ``z`` per reconstruction.
        recon_lr: Adam learning rate on ``z``.
        recon_restarts: reconstructions from independent ``z`` draws; each image
            keeps its lowest error.
        seed: seeds the weight initialization, the data order and the latent codes.
        diverge_loss: a discriminator or generator loss above this (or NaN/Inf) stops
            the run as diverged. A loss of 100 means a probability of about e^-100 on
            the correct label, far beyond any run that still learns.
        device: ``"cpu"`` or ``"cuda"``.
    """

    task: ClassVar[str] = GAN

    dataset: str = "digits"
    norm: str = "batchnorm"
    image_size: int = 16
    latent_dim: int = 32
    features: int = 16
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 64
    steps: int = 400
    eval_every: int = 50
    wn_init: bool = True
    recon_images: int = 64
    recon_steps: int = 100
    recon_lr: float = 0.05
    recon_restarts: int = 3
    seed: int = 0
    diverge_loss: float = 100.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", resolve_norm_name(self.norm))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must name a data set, got {self.dataset!r}")
        num_stages(self.image_size)
        for name in ("lr", "recon_lr", "diverge_loss"):
            _positive_finite(name, getattr(self, name))
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        counts = (
            "latent_dim", "features", "steps", "eval_every", "recon_images",
            "recon_steps", "recon_restarts",
        )
        for name in counts:
            _positive_int(name, getattr(self, name))
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(
                f"batch_size must be an integer of at least 2 (BatchNorm needs two "
                f"samples), got {self.batch_size!r}"
            )
        if not isinstance(self.wn_init, bool):
            raise ValueError(f"wn_init must be True or False, got {self.wn_init!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GANConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown GANConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def key(self) -> str:
        """Return a stable hex digest of the task and every field."""
        payload = {"task": self.task, **self.to_dict()}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def replace(self, **changes) -> "GANConfig":
        return dataclasses.replace(self, **changes)


def _positive_finite(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# -- data ------------------------------------------------------------------------------


def to_gan_images(split_x: torch.Tensor, data, image_size: int) -> torch.Tensor:
    """Return the images of one split on the [-1, 1] scale of a tanh generator.

    ``split_x`` is normalized with the data's per-channel ``mean`` and ``std``, which
    are on the [0, 1] pixel scale. This undoes that normalization, maps [0, 1] to
    [-1, 1] and resizes to ``image_size`` with bilinear interpolation (no antialiasing).
    """
    mean = torch.tensor(data.mean, dtype=split_x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=split_x.dtype).view(1, -1, 1, 1)
    images = (split_x * std + mean).clamp(0.0, 1.0) * 2.0 - 1.0
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    return images.contiguous()


# -- networks --------------------------------------------------------------------------


def build_gan(config: GANConfig, channels: int) -> tuple[nn.Module, nn.Module]:
    """Build the generator and discriminator that ``config`` describes."""
    generator = DCGANGenerator(
        config.latent_dim, channels, config.image_size, config.features, config.norm
    )
    discriminator = DCGANDiscriminator(
        channels, config.image_size, config.features, config.norm
    )
    return generator, discriminator


def _contains_weight_norm(model: nn.Module) -> bool:
    return any(
        name.endswith("parametrizations.weight.0.g")
        for name, _ in model.named_parameters()
    )


# -- measurements ----------------------------------------------------------------------


def fixed_latents(count: int, latent_dim: int, seed: int) -> torch.Tensor:
    """Return ``count`` latent codes from N(0, I), drawn with the seed ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, latent_dim, generator=generator)


def reconstruction_mse(
    generator: nn.Module,
    images: torch.Tensor,
    latent_dim: int,
    steps: int,
    lr: float,
    restarts: int,
    seed: int = RECON_SEED,
) -> torch.Tensor:
    """Return each image's lowest per-pixel MSE of ``generator(z)`` over fitted ``z``.

    The generator is frozen and runs in eval mode, so each image's reconstruction does
    not depend on the others. For each restart ``r``, ``z`` starts from N(0, I) drawn
    with seed ``seed + r`` and takes ``steps`` Adam steps (default betas) at ``lr``.
    The loss is the sum over images of their mean squared error, so each image's ``z``
    gets the gradient of its own error. ``z`` is not constrained to the prior. Each
    image keeps its lowest error after the last step over the restarts.

    Returns:
        a float tensor of shape ``(len(images),)`` on the CPU; a NaN entry means the
        generator's output was not finite.
    """
    was_training = generator.training
    requires_grad = [p.requires_grad for p in generator.parameters()]
    generator.eval()
    for parameter in generator.parameters():
        parameter.requires_grad_(False)
    device = images.device
    best = torch.full((len(images),), math.inf)
    try:
        for restart in range(restarts):
            z = fixed_latents(len(images), latent_dim, seed + restart).to(device)
            z.requires_grad_(True)
            optimizer = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                error = _per_image_mse(generator(z), images)
                optimizer.zero_grad(set_to_none=True)
                error.sum().backward()
                optimizer.step()
            with torch.no_grad():
                error = _per_image_mse(generator(z), images).cpu()
            error = torch.where(torch.isfinite(error), error, torch.nan)
            best = torch.fmin(best, error)
    finally:
        for parameter, flag in zip(generator.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        generator.train(was_training)
    return torch.where(torch.isinf(best), torch.nan, best)


def _per_image_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).flatten(1).mean(1)


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Return the mean Euclidean distance between distinct pairs of flattened images."""
    flat = images.flatten(1).double()
    count = len(flat)
    if count < 2:
        raise ValueError(f"mean_pairwise_distance needs 2 or more images, got {count}")
    distances = torch.cdist(flat, flat)
    return float(distances.sum() / (count * (count - 1)))


@torch.no_grad()
def diversity_ratio(generator: nn.Module, latent_dim: int, real: torch.Tensor) -> float:
    """Return the mean pairwise distance of samples over that of the images ``real``.

    The samples come from ``len(real)`` fixed latent codes (seed ``SAMPLE_SEED``) with
    the generator in eval mode. A ratio near 1 means that samples spread as much as
    real images do. A ratio near 0 means that the generator maps every code to about
    the same image.
    Returns NaN when a sample is not finite.
    """
    was_training = generator.training
    generator.eval()
    z = fixed_latents(len(real), latent_dim, SAMPLE_SEED).to(real.device)
    samples = generator(z)
    generator.train(was_training)
    if not torch.isfinite(samples).all():
        return math.nan
    return mean_pairwise_distance(samples) / mean_pairwise_distance(real)


@dataclass
class BatchDependence:
    """Outputs for the same latent codes in two batches that differ in the other codes.

    Attributes:
        train_diff: max absolute difference between the two batches' outputs for the
            shared codes, with the generator in train mode (batch statistics).
        eval_diff: the same in eval mode (running statistics).
        images: ``{(mode, companions): outputs}`` for mode ``"train"`` or ``"eval"`` and
            companions ``"A"`` or ``"B"``, each of shape ``(targets, C, H, W)``.
    """

    train_diff: float
    eval_diff: float
    images: dict


@torch.no_grad()
def batch_dependence(
    generator: nn.Module,
    latent_dim: int,
    batch_size: int,
    targets: int = PITFALL_TARGETS,
    seed: int = PITFALL_SEED,
) -> BatchDependence:
    """Measure how much a sample depends on the rest of its batch, in both modes.

    Two batches of ``batch_size`` codes share their first ``targets`` codes and draw
    the others (the companions) independently from N(0, I). Each batch runs through
    the generator in train mode and in eval mode. With BatchNorm, train mode normalizes
    with the batch's statistics, so the shared codes give different images. Eval mode
    uses the running statistics and gives the same images. The train-mode passes run on
    a copy, so the generator's running statistics are left as they are.
    """
    targets = min(targets, batch_size - 1)
    device = next(generator.parameters()).device
    codes = fixed_latents(targets + 2 * (batch_size - targets), latent_dim, seed)
    shared = codes[:targets]
    companions = {
        "A": codes[targets:batch_size],
        "B": codes[batch_size:],
    }
    was_training = generator.training
    copy_in_train_mode = copy.deepcopy(generator).train()
    generator.eval()
    images = {}
    for mode, model in (("train", copy_in_train_mode), ("eval", generator)):
        for name, others in companions.items():
            batch = torch.cat([shared, others]).to(device)
            images[(mode, name)] = model(batch)[:targets].cpu()
    generator.train(was_training)
    diffs = {
        mode: float((images[(mode, "A")] - images[(mode, "B")]).abs().max())
        for mode in ("train", "eval")
    }
    return BatchDependence(diffs["train"], diffs["eval"], images)


def collapse_reason(final: dict) -> Optional[str]:
    """Return why a finished run counts as collapsed, or None when it does not.

    A run collapses when its samples' diversity ratio is below ``MIN_DIVERSITY``
    (mode collapse), or when the discriminator wins: the mean discriminator loss of the
    last history window is below ``WIN_D_LOSS`` while the generator loss is above
    ``WIN_G_LOSS``.
    """
    diversity = final.get("diversity", math.nan)
    if math.isfinite(diversity) and diversity < MIN_DIVERSITY:
        return f"diversity {diversity:.3f} < {MIN_DIVERSITY}"
    d_loss = final.get("d_loss", math.nan)
    g_loss = final.get("g_loss", math.nan)
    if d_loss < WIN_D_LOSS and g_loss > WIN_G_LOSS:
        return (
            f"D loss {d_loss:.3f} < {WIN_D_LOSS} with G loss {g_loss:.2f} > "
            f"{WIN_G_LOSS}"
        )
    return None


def image_grid(images: torch.Tensor, columns: int = 8, padding: int = 1) -> np.ndarray:
    """Tile images on the [-1, 1] scale into one uint8 image with white padding.

    The result has shape (H, W) for gray images and (H, W, 3) for RGB ones.
    """
    images = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    count, channels, height, width = images.shape
    rows = math.ceil(count / columns)
    grid = torch.full(
        (channels, rows * (height + padding) + padding,
         columns * (width + padding) + padding),
        255,
        dtype=torch.uint8,
    )
    for index in range(count):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index]
    array = grid.numpy()
    return array[0] if channels == 1 else array.transpose(1, 2, 0)


# -- training --------------------------------------------------------------------------


def train_gan(
    config: GANConfig,
    data,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> RunResult:
    """Train the DCGAN that ``config`` describes on ``data`` and measure its generator.

    The run draws every random number (initialization, data order, latent codes) from
    generators seeded by ``config.seed``, inside :func:`torch.random.fork_rng`, so the
    caller's global random state is left as it was and the same config gives the same
    numbers on one machine.

    Final metrics: ``recon_mse`` (mean over the held-out images of
    :func:`reconstruction_mse`), ``recon_mse_mean_image`` (the MSE of the mean training
    image, what a generator that learned only the mean scores), ``diversity``
    (:func:`diversity_ratio`), ``batch_dependence_train`` and ``batch_dependence_eval``
    (:func:`batch_dependence`), and ``d_loss``, ``g_loss``, ``d_real``, ``d_fake`` of
    the last history row. Generator metrics are NaN for a diverged run.

    History rows: ``step``, ``epoch``, ``d_loss`` and ``g_loss`` (means over the steps
    since the previous row), ``d_real`` and ``d_fake`` (mean discriminator probability
    of real and generated images over those steps) and ``diversity``. ``step_loss``
    contains the discriminator loss of every step.

    Args:
        config: the run's settings.
        data: a ``normlab.data.ClassificationData`` named ``config.dataset``.
        on_step: called as ``on_step(step, total_steps)`` after every step.
    """
    if not isinstance(config, GANConfig):
        raise ValueError(f"train_gan needs a GANConfig, got {type(config).__name__}")
    name = getattr(data, "name", None)
    if name != config.dataset:
        raise ValueError(
            f"config dataset {config.dataset!r} does not match the loaded data "
            f"{name!r}; build the config with dataset={name!r}"
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


def _train(config: GANConfig, data, device, on_step) -> RunResult:
    started = time.perf_counter()
    real_images = to_gan_images(data.train.x, data, config.image_size).to(device)
    held_out = to_gan_images(data.test.x, data, config.image_size).to(device)
    channels = real_images.shape[1]
    if len(real_images) < config.batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {len(real_images)} training "
            f"images of {config.dataset}"
        )
    random = torch.Generator().manual_seed(config.seed)
    generator, discriminator = build_gan(config, channels)
    generator.to(device)
    discriminator.to(device)
    if config.wn_init and _contains_weight_norm(generator):
        z = torch.randn(config.batch_size, config.latent_dim, generator=random)
        init_weight_norm_(generator, z.to(device))
    if config.wn_init and _contains_weight_norm(discriminator):
        index = torch.randperm(len(real_images), generator=random)[: config.batch_size]
        init_weight_norm_(discriminator, real_images[index.to(device)])
    betas = (config.beta1, config.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=betas)
    diversity_real = held_out[:DIVERSITY_SAMPLES]

    per_step: dict[str, list[float]] = {"d_loss": [], "g_loss": [], "d_real": [],
                                        "d_fake": []}
    history: list[dict] = []
    diverged_step = None
    steps_per_epoch = len(real_images) // config.batch_size
    batches = iter(())
    for step in range(1, config.steps + 1):
        # data: a new permutation every epoch, the last incomplete batch dropped
        batch = next(batches, None)
        if batch is None:
            order = torch.randperm(len(real_images), generator=random).to(device)
            batches = iter(order[: steps_per_epoch * config.batch_size].split(
                config.batch_size))
            batch = next(batches)
        real = real_images[batch]
        z = torch.randn(config.batch_size, config.latent_dim, generator=random)

        values = _gan_step(generator, discriminator, opt_g, opt_d, real, z.to(device))
        for name, value in values.items():
            per_step[name].append(value)

        # divergence check: NaN, Inf or an exploding loss ends the run
        losses = (values["d_loss"], values["g_loss"])
        if not all(math.isfinite(v) and v <= config.diverge_loss for v in losses):
            diverged_step = step
            break
        if on_step is not None:
            on_step(step, config.steps)

        if step % config.eval_every == 0 or step == config.steps:
            row = _history_row(step, steps_per_epoch, per_step, history)
            row["diversity"] = diversity_ratio(
                generator, config.latent_dim, diversity_real
            )
            history.append(row)
            if not math.isfinite(row["diversity"]):
                diverged_step = step
                break

    diverged = diverged_step is not None
    if diverged:
        logger.debug("run %s diverged at step %d", config.key(), diverged_step)
    else:
        _KEPT_WEIGHTS.keep(config.key(), generator)
    final = _final_metrics(config, generator, real_images, held_out, history, diverged)
    return RunResult(
        status=DIVERGED if diverged else FINISHED,
        steps=len(per_step["d_loss"]),
        diverged_step=diverged_step,
        final=final,
        history=history,
        step_loss=per_step["d_loss"],
        wall_time=time.perf_counter() - started,
    )


def _gan_step(generator, discriminator, opt_g, opt_d, real, z) -> dict[str, float]:
    """Take one discriminator and one generator step; return the step's scalars.

    Real and generated images go through the discriminator in separate batches, so a
    BatchNorm discriminator normalizes each with its own statistics, as in
    pytorch/examples.
    """
    ones = torch.ones(len(real), device=real.device)
    zeros = torch.zeros(len(real), device=real.device)
    fake = generator(z)

    # discriminator: real images to 1, generated ones to 0
    real_logits = discriminator(real)
    fake_logits = discriminator(fake.detach())
    d_loss = F.binary_cross_entropy_with_logits(
        real_logits, ones
    ) + F.binary_cross_entropy_with_logits(fake_logits, zeros)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    # generator: the non-saturating loss -log D(G(z))
    g_loss = F.binary_cross_entropy_with_logits(discriminator(fake), ones)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return {
        "d_loss": d_loss.item(),
        "g_loss": g_loss.item(),
        "d_real": torch.sigmoid(real_logits).mean().item(),
        "d_fake": torch.sigmoid(fake_logits).mean().item(),
    }


def _history_row(step, steps_per_epoch, per_step, history) -> dict:
    since = history[-1]["step"] if history else 0
    row = {"step": step, "epoch": (step - 1) // steps_per_epoch + 1}
    for name, values in per_step.items():
        recent = values[since:step]
        row[name] = sum(recent) / len(recent)
    return row


def _final_metrics(config, generator, real_images, held_out, history, diverged) -> dict:
    targets = held_out[: config.recon_images]
    mean_image = real_images.mean(0, keepdim=True)
    final = {
        "recon_mse_mean_image": float(_per_image_mse(
            mean_image.expand_as(targets), targets).mean()),
        "recon_images": float(len(targets)),
    }
    last = history[-1] if history else {}
    for name in ("d_loss", "g_loss", "d_real", "d_fake"):
        final[name] = last.get(name, math.nan)
    names = (
        "recon_mse", "diversity", "batch_dependence_train", "batch_dependence_eval",
    )
    if diverged:
        final.update({name: math.nan for name in names})
        return final
    errors = reconstruction_mse(
        generator, targets, config.latent_dim, config.recon_steps, config.recon_lr,
        config.recon_restarts,
    )
    final["recon_mse"] = float(errors.mean())
    final["diversity"] = last.get("diversity", math.nan)
    dependence = batch_dependence(generator, config.latent_dim, config.batch_size)
    final["batch_dependence_train"] = dependence.train_diff
    final["batch_dependence_eval"] = dependence.eval_diff
    return final


# -- trained generators for plots ------------------------------------------------------

_KEPT_WEIGHTS = KeptWeights(MAX_KEPT_MODELS)


def trained_generator(
    config: GANConfig, data, checkpoint_dir: Optional[Path] = None
) -> Optional[nn.Module]:
    """Return the generator of a finished run, in eval mode on the CPU.

    The weights come from this process's memory when the run trained here, else from
    ``checkpoint_dir/<key>.pt``, else from training the run again. A run is
    deterministic for its seed on one machine, so retraining gives the same generator
    there. The weights are saved into ``checkpoint_dir`` when it is given. Returns None
    when the run diverges.
    """
    state = trained_state(
        config.key(), _KEPT_WEIGHTS, checkpoint_dir,
        retrain=lambda: train_gan(config, data).status == FINISHED,
    )
    if state is None:
        return None
    generator, _ = build_gan(config, data.in_channels)
    generator.load_state_dict(state)
    return generator.eval()


# -- registration with the sweep -------------------------------------------------------


def _gan_task(config, data) -> RunResult:
    # looked up at call time, so tests can replace train_gan in this module
    return train_gan(config, data)


register_trainer(GAN, _gan_task)
