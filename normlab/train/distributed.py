"""Data-parallel training of one classification config over several processes.

Each process trains a replica of the model wrapped in
:class:`torch.nn.parallel.DistributedDataParallel` on its slice of every
global batch. The BatchNorm layers are converted with :func:`normlab.nn.convert_sync`, so
their statistics span the global batch. With the same config, a run over ``N`` processes
therefore takes the steps of :func:`normlab.train.train_classifier` in one process, to
within the rounding of the cross-process sums:

- every process draws the same initialization and the same data order from
  ``config.seed``, and process ``r`` takes the ``r``-th of ``N`` contiguous slices of
  each global batch of ``config.batch_size`` samples;
- each process's loss is its sum of per-sample losses times ``N / B`` for a global batch
  of ``B`` samples. The gradient average of DistributedDataParallel is then the gradient
  of the global mean loss, also for a smaller last batch that splits unevenly;
- the step loss is the all-reduced sum divided by ``B``, so every process takes the same
  divergence decision.

Processes start in one of two ways. :func:`train_data_parallel` with ``nproc > 1``
spawns them (``torch.multiprocessing.spawn``) with a file rendezvous in a temporary
folder. Under ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``, each process joins the group that torchrun
describes. CPU training uses the gloo backend, and CUDA training uses NCCL with one GPU
per process (``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ..data import load_classification
from ..nn import convert_sync
from .config import TrainConfig
from .loop import (
    DIVERGED,
    FINISHED,
    RunResult,
    build_model,
    build_optimizer,
    evaluation_row,
    final_metrics,
    train_classifier,
    training_samples,
)

__all__ = ["torchrun_environment", "train_data_parallel", "validate_split"]

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
RESULT_FILE = "result.json"


def torchrun_environment() -> tuple[int, int, int] | None:
    """Return ``(rank, world_size, local_rank)`` when torchrun started this process.

    Returns None when any of ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` is unset.
    """
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    return rank, world_size, local_rank


def validate_split(batch_size: int, nproc: int) -> None:
    """Raise ``ValueError`` unless ``batch_size`` global samples split into ``nproc`` slices."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if batch_size % nproc != 0:
        lower = batch_size - batch_size % nproc
        raise ValueError(
            f"the global batch size {batch_size} does not split evenly over {nproc} "
            f"processes; use a multiple of {nproc}, for example {lower or nproc} or "
            f"{lower + nproc}"
        )


def train_data_parallel(
    config: TrainConfig,
    nproc: int | None = None,
    data_dir: str | os.PathLike | None = None,
    threads: int = 1,
    log_level: int = logging.WARNING,
) -> RunResult:
    """Train ``config`` data-parallel over ``nproc`` processes and return its result.

    ``config.batch_size`` is the global batch, split evenly over the processes. Under
    torchrun each process calls this function, ``nproc`` must be None or torchrun's
    world size, and every process returns the result. Otherwise ``nproc=1`` (the
    default) trains in this process with :func:`normlab.train.train_classifier`, and a
    larger ``nproc`` spawns that many processes and returns the result of rank 0.

    Args:
        config: the run's settings. ``device`` ``"cuda"`` puts process ``r`` on
            ``cuda:r`` (``cuda:LOCAL_RANK`` under torchrun) and uses NCCL, and
            ``"cpu"`` uses gloo.
        nproc: number of processes.
        data_dir: folder with the MNIST or CIFAR-10 files, as for
            :func:`normlab.data.load_classification`.
        threads: torch CPU threads per process.
        log_level: logging level of the spawned processes. Rank 0 logs one line per
            evaluation at INFO, and the others log warnings only.

    Raises:
        ValueError: for an invalid ``nproc``, a batch size that does not split, or
            ``nproc`` other than torchrun's world size.
        DataError: if the dataset cannot be loaded.
        torch.multiprocessing.ProcessRaisedException: if a spawned process fails; the
            message contains its traceback.
    """
    environment = torchrun_environment()
    if environment is not None:
        rank, world_size, local_rank = environment
        if nproc is not None and nproc != world_size:
            raise ValueError(
                f"nproc {nproc} differs from torchrun's WORLD_SIZE {world_size}; omit "
                f"--nproc under torchrun or pass --nproc {world_size}"
            )
        validate_split(config.batch_size, world_size)
        torch.set_num_threads(threads)
        data = load_classification(config.dataset, data_dir)
        return _run_process(config, data, rank, world_size, local_rank, "env://")

    nproc = 1 if nproc is None else nproc
    validate_split(config.batch_size, nproc)
    _check_devices(config, nproc)
    data = load_classification(config.dataset, data_dir)
    if nproc == 1:
        torch.set_num_threads(threads)
        return train_classifier(config, data)
    with tempfile.TemporaryDirectory(prefix="normlab-train-") as folder:
        init_method = f"file://{Path(folder) / 'rendezvous'}"
        result_path = Path(folder) / RESULT_FILE
        mp.spawn(
            _spawned_process,
            args=(nproc, init_method, config, data, threads, log_level, result_path),
            nprocs=nproc,
        )
        return _read_result(result_path)


def _check_devices(config: TrainConfig, nproc: int) -> None:
    if not config.device.startswith("cuda"):
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < nproc:
        raise ValueError(
            f"training on {config.device!r} with {nproc} processes needs {nproc} CUDA "
            f"devices, found {available}; lower --nproc or use --device cpu"
        )


def _spawned_process(
    rank, world_size, init_method, config, data, threads, log_level, result_path
) -> None:
    # The entry point of each spawned process. spawn passes the rank first.
    logging.basicConfig(
        level=log_level if rank == 0 else max(log_level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    torch.set_num_threads(threads)
    result = _run_process(config, data, rank, world_size, rank, init_method)
    if rank == 0:
        _write_result(result, result_path)


def _run_process(config, data, rank, world_size, local_rank, init_method) -> RunResult:
    # Join the group, train this process's replica and leave the group.
    if config.device.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device(config.device)
        backend = "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        devices = [device.index] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            return _train_replica(config, data, device, rank, world_size)
    finally:
        dist.destroy_process_group()


def _train_replica(config, data, device, rank, world_size) -> RunResult:
    """Train one process's replica; the steps mirror ``normlab.train.loop._train``."""
    started = time.perf_counter()
    model = build_model(config, data).to(device)
    convert_sync(model)
    device_ids = [device.index] if device.type == "cuda" else None
    parallel = DistributedDataParallel(model, device_ids=device_ids)
    optimizer = build_optimizer(config, model)
    order_generator = torch.Generator().manual_seed(config.seed)
    if rank > 0:
        # Dropout draws from the global generator, and equal masks on every process
        # would correlate the slices. Rank 0 keeps the stream of config.seed.
        # NOTE: so a run with dropout differs from the one-process run in its masks.
        seed = np.random.SeedSequence([config.seed, rank]).generate_state(1)[0]
        torch.manual_seed(int(seed))

    train_x, train_y = training_samples(config, data)
    train_x, train_y = train_x.to(device), train_y.to(device)
    val_x, val_y = data.val.x.to(device), data.val.y.to(device)
    num_train = len(train_x)
    # a last batch of one sample has no batch statistics, so it is dropped
    steps_per_epoch = num_train // config.batch_size + (num_train % config.batch_size > 1)
    total_steps = steps_per_epoch * config.epochs

    history: list[dict] = []
    step_loss: list[float] = []
    best_val_acc = 0.0
    step, diverged_step = 0, None
    model.train()
    for epoch in range(config.epochs):
        permutation = torch.randperm(num_train, generator=order_generator).to(device)
        epoch_x = train_x.index_select(0, permutation)
        epoch_y = train_y.index_select(0, permutation)
        for start in range(0, num_train, config.batch_size):
            global_size = min(config.batch_size, num_train - start)
            if global_size < 2:
                continue
            batch_x = epoch_x[start : start + global_size]
            batch_y = epoch_y[start : start + global_size]
            local_x = batch_x.tensor_split(world_size)[rank]
            local_y = batch_y.tensor_split(world_size)[rank]

            # forward and backward, where DistributedDataParallel averages the gradients
            loss_sum = F.cross_entropy(parallel(local_x), local_y, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            (loss_sum * (world_size / global_size)).backward()
            optimizer.step()
            step += 1

            # divergence check on the global mean loss, the same on every process
            total_loss = loss_sum.detach().clone()
            dist.all_reduce(total_loss)
            loss_value = total_loss.item() / global_size
            step_loss.append(loss_value)
            if not math.isfinite(loss_value) or loss_value > config.diverge_loss:
                diverged_step = step
                break

            # periodic evaluation on the validation split
            if step % config.eval_every == 0 or step == total_steps:
                # NOTE: every process evaluates the whole split on its replica. The
                # replicas have equal parameters, so all take the same decisions.
                row = evaluation_row(model, step, epoch, step_loss, history, val_x, val_y)
                history.append(row)
                if rank == 0:
                    logger.info(
                        "step %d/%d: train_loss %.4f, val_loss %.4f, val_acc %.4f",
                        step,
                        total_steps,
                        row["train_loss"],
                        row["val_loss"],
                        row["val_acc"],
                    )
                if not math.isfinite(row["val_loss"]):
                    diverged_step = step
                    break
                best_val_acc = max(best_val_acc, row["val_acc"])
        if diverged_step is not None:
            break

    splits = {
        "train": (train_x, train_y),
        "val": (val_x, val_y),
        "test": (data.test.x.to(device), data.test.y.to(device)),
    }
    final = final_metrics(model, splits, diverged_step is not None)
    final["best_val_acc"] = best_val_acc
    return RunResult(
        status=DIVERGED if diverged_step is not None else FINISHED,
        steps=step,
        diverged_step=diverged_step,
        final=final,
        history=history,
        step_loss=step_loss,
        wall_time=time.perf_counter() - started,
    )


def _write_result(result: RunResult, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(result)))


def _read_result(path: Path) -> RunResult:
    return RunResult(**json.loads(path.read_text()))
