"""Cross-process BatchNorm over gloo, checked against one process on the whole batch.

Each spawned test starts one gloo group (file rendezvous in a temporary folder, loopback
only) and runs many cases in it. Every worker builds the whole batch from a fixed seed,
runs normlab's BatchNorm on it as the reference, and runs the synchronized layer on its
own slice. Output, input gradient and running statistics must equal the reference on
the whole batch, and so must the weight and bias gradients summed over the processes. A
failing assert ends that worker, and ``torch.multiprocessing.spawn`` raises with its
traceback.
"""

import copy
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from normlab.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FrozenBatchNorm2d,
    SyncBatchNorm,
    convert_sync,
    sync_batch_norm,
)

# The spawned workers import this module by name, which needs the repository root on
# sys.path whatever folder pytest runs from.
REPOSITORY_ROOT = str(Path(__file__).resolve().parents[2])
NUM_CHANNELS = 3


def _spawn(worker, world_size, tmp_path, monkeypatch, *args):
    monkeypatch.syspath_prepend(REPOSITORY_ROOT)
    init_method = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(worker, args=(world_size, init_method, *args), nprocs=world_size)


def _init_group(rank, world_size, init_method, backend="gloo"):
    """Join the default group and return a group of this process alone.

    With an initialized default group, normlab's BatchNorm synchronizes even with
    ``process_group=None``, so the single-process references get the one-process group.
    """
    torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    # every process creates every group, as torch.distributed.new_group requires
    solo_groups = [dist.new_group([other]) for other in range(world_size)]
    return solo_groups[rank]


def _full_batch(sizes, spatial, dtype, seed=0, center=5.0):
    # Channels get different means and spreads, so a wrong merge shows in every channel.
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), NUM_CHANNELS) + tuple(spatial)
    channel_view = (1, NUM_CHANNELS) + (1,) * len(spatial)
    spread = torch.tensor([0.5, 1.0, 3.0], dtype=dtype).view(channel_view)
    offsets = torch.tensor([-1.0, 0.0, 2.0], dtype=dtype).view(channel_view)
    values = torch.randn(shape, generator=generator, dtype=dtype)
    return center + offsets + spread * values, torch.randn(
        shape, generator=generator, dtype=dtype
    )


def _local_slice(tensor, sizes, rank):
    start = sum(sizes[:rank])
    return tensor[start : start + sizes[rank]]


def _summed_over_group(tensor):
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def _check_against_full_batch(
    rank,
    solo,
    sizes,
    spatial=(),
    dtype=torch.float64,
    channels_last=False,
    steps=2,
    atol=1e-12,
    device="cpu",
    **module_kwargs,
):
    """Train ``steps`` steps on the slice and the whole batch, then compare eval mode."""
    layer_class = {0: BatchNorm1d, 1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
    factory = {"dtype": dtype, "device": device}
    reference = layer_class[len(spatial)](
        NUM_CHANNELS, process_group=solo, **factory, **module_kwargs
    )
    if reference.affine:
        with torch.no_grad():
            reference.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
            if reference.bias is not None:
                reference.bias.copy_(torch.tensor([0.1, -0.3, 1.0]))
    synced = layer_class[len(spatial)](NUM_CHANNELS, **factory, **module_kwargs)
    synced.load_state_dict(reference.state_dict())
    context = f"rank {rank}, sizes {sizes}, spatial {spatial}, {dtype}"

    for step in range(steps):
        full, grad_full = _full_batch(sizes, spatial, dtype, seed=step)
        full, grad_full = full.to(device), grad_full.to(device)
        local = _local_slice(full, sizes, rank).clone()
        local_grad_output = _local_slice(grad_full, sizes, rank)
        if channels_last:
            local = local.contiguous(memory_format=torch.channels_last)
        full.requires_grad_(True)
        local.requires_grad_(True)
        for module in (reference, synced):
            module.zero_grad(set_to_none=True)

        expected = reference(full)
        expected.backward(grad_full)
        output = synced(local)
        output.backward(local_grad_output)

        expected_slice = _local_slice(expected.detach(), sizes, rank)
        torch.testing.assert_close(output, expected_slice, atol=atol, rtol=0, msg=context)
        expected_grad = _local_slice(full.grad, sizes, rank)
        torch.testing.assert_close(local.grad, expected_grad, atol=atol, rtol=0, msg=context)
        if channels_last:
            assert output.is_contiguous(memory_format=torch.channels_last), context
        if synced.affine:
            # dweight and dbias are local sums, so their sum over the group is the
            # whole batch's gradient (DistributedDataParallel divides it by the size).
            weight_grad = _summed_over_group(synced.weight.grad)
            torch.testing.assert_close(weight_grad, reference.weight.grad, atol=atol, rtol=0)
        if synced.bias is not None:
            bias_grad = _summed_over_group(synced.bias.grad)
            torch.testing.assert_close(bias_grad, reference.bias.grad, atol=atol, rtol=0)
        if synced.track_running_stats:
            torch.testing.assert_close(synced.running_mean, reference.running_mean, atol=atol, rtol=0)
            torch.testing.assert_close(synced.running_var, reference.running_var, atol=atol, rtol=0)
            assert synced.num_batches_tracked.item() == step + 1

    # eval mode uses no collective and equals the reference on the slice
    synced.eval()
    reference.eval()
    local = _local_slice(full.detach(), sizes, rank)
    torch.testing.assert_close(
        synced(local), reference(local), atol=atol, rtol=0, msg=context
    )


def _worker_two_processes(rank, world_size, init_method):
    solo = _init_group(rank, world_size, init_method)
    try:
        _check_against_full_batch(rank, solo, (4, 4))
        _check_against_full_batch(rank, solo, (3, 6), spatial=(5,))
        _check_against_full_batch(rank, solo, (2, 3), spatial=(4, 5))
        _check_against_full_batch(rank, solo, (3, 2), spatial=(4, 5), channels_last=True)
        _check_against_full_batch(rank, solo, (2, 2), spatial=(2, 3, 2))
        _check_against_full_batch(rank, solo, (5, 2), momentum=None, steps=3)
        _check_against_full_batch(rank, solo, (5, 2), affine=False)
        _check_against_full_batch(rank, solo, (5, 2), bias=False, spatial=(3, 3))
        _check_against_full_batch(rank, solo, (4, 3), track_running_stats=False)
        _check_against_full_batch(
            rank, solo, (3, 4), spatial=(4, 4), dtype=torch.float32, atol=2e-5
        )
        _check_float32_far_from_zero(rank, solo)
        _check_one_value_in_total(rank)
        _check_gradient_average_under_ddp(rank, solo)
    finally:
        dist.destroy_process_group()


def _check_float32_far_from_zero(rank, solo):
    # Values near 1e4 with unit spread: a float32 mean rounded once per process would
    # shift every output by up to 5e-4.
    sizes = (6, 5)
    full, _ = _full_batch(sizes, (4, 4), torch.float32, center=1e4)
    full64 = full.double()
    layer = convert_sync(BatchNorm2d(NUM_CHANNELS))
    output = layer(_local_slice(full, sizes, rank))
    expected = BatchNorm2d(NUM_CHANNELS, dtype=torch.float64, process_group=solo)
    expected = expected(full64)
    error = (output.double() - _local_slice(expected, sizes, rank)).abs().max().item()
    assert error < 1e-5, f"rank {rank}: max error {error} for inputs near 1e4"


def _check_one_value_in_total(rank):
    layer = convert_sync(BatchNorm1d(NUM_CHANNELS))
    local = torch.randn(1 - rank, NUM_CHANNELS)
    with pytest.raises(ValueError, match="got 1 in total over 2 processes"):
        layer(local)


def _check_gradient_average_under_ddp(rank, solo):
    # Under DistributedDataParallel each process's loss is the mean over its equal
    # slice, and the averaged gradients equal one process training on the whole batch.
    sizes = (4, 4)
    full, _ = _full_batch(sizes, (), torch.float64)
    target = torch.arange(sum(sizes)) % 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(NUM_CHANNELS, 5), BatchNorm1d(5), nn.Linear(5, 2))
    model = model.double()
    reference = copy.deepcopy(model)
    reference[1].process_group = solo
    parallel = nn.parallel.DistributedDataParallel(convert_sync(model))
    loss = nn.functional.cross_entropy(
        parallel(_local_slice(full, sizes, rank)), _local_slice(target, sizes, rank)
    )
    loss.backward()
    nn.functional.cross_entropy(reference(full), target).backward()
    for (name, parameter), expected in zip(
        model.named_parameters(), reference.parameters()
    ):
        torch.testing.assert_close(
            parameter.grad, expected.grad, atol=1e-12, rtol=0, msg=f"{name} on rank {rank}"
        )


def _worker_three_processes(rank, world_size, init_method):
    solo = _init_group(rank, world_size, init_method)
    try:
        _check_against_full_batch(rank, solo, (5, 1, 3))
        _check_against_full_batch(rank, solo, (5, 1, 3), spatial=(3, 4))
        _check_against_full_batch(rank, solo, (2, 1, 3), spatial=(3, 4), channels_last=True)
        _check_against_full_batch(rank, solo, (0, 4, 2))
        _check_against_full_batch(rank, solo, (3, 0, 2), spatial=(2, 2))
        _check_against_full_batch(rank, solo, (1, 1, 1), momentum=None)
        _check_group_subset(rank, solo)
    finally:
        dist.destroy_process_group()


def _check_group_subset(rank, solo):
    # A layer bound to a group of ranks 0 and 1 ignores rank 2. Every process creates
    # the group, as torch.distributed.new_group requires.
    sizes = (2, 3)
    group = dist.new_group([0, 1])
    if rank == 2:
        return
    full, _ = _full_batch(sizes, (), torch.float64)
    layer = convert_sync(BatchNorm1d(NUM_CHANNELS, dtype=torch.float64), group)
    output = layer(_local_slice(full, sizes, rank))
    expected = BatchNorm1d(NUM_CHANNELS, dtype=torch.float64, process_group=solo)(full)
    torch.testing.assert_close(output, _local_slice(expected, sizes, rank), atol=1e-12, rtol=0)


def _worker_nccl(rank, world_size, init_method):
    torch.cuda.set_device(rank)
    solo = _init_group(rank, world_size, init_method, backend="nccl")
    device = f"cuda:{rank}"
    try:
        _check_against_full_batch(rank, solo, (5, 2), device=device)
        _check_against_full_batch(rank, solo, (3, 2), spatial=(4, 5), device=device)
        _check_against_full_batch(
            rank, solo, (2, 3), spatial=(4, 5), channels_last=True, device=device
        )
        _check_against_full_batch(
            rank, solo, (4, 3), spatial=(4, 4), dtype=torch.float32, atol=2e-5,
            device=device,
        )
        _check_against_full_batch(rank, solo, (0, 4), device=device)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs 2 CUDA devices"
)
def test_nccl_two_gpus_match_full_batch(tmp_path, monkeypatch):
    _spawn(_worker_nccl, 2, tmp_path, monkeypatch)


def test_two_processes_match_full_batch(tmp_path, monkeypatch):
    _spawn(_worker_two_processes, 2, tmp_path, monkeypatch)


def test_three_uneven_processes_match(tmp_path, monkeypatch):
    _spawn(_worker_three_processes, 3, tmp_path, monkeypatch)


def test_without_group_matches_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, NUM_CHANNELS, 4, 4)
    plain = BatchNorm2d(NUM_CHANNELS)
    synced = convert_sync(copy.deepcopy(plain))
    assert torch.equal(synced(x), plain(x))
    assert torch.equal(synced.running_var, plain.running_var)
    functional = sync_batch_norm(x, None, None)
    assert torch.equal(functional, BatchNorm2d(NUM_CHANNELS, affine=False)(x))


def test_convert_sync_sets_group_in_place():
    layer = BatchNorm2d(NUM_CHANNELS)
    group = object()
    assert convert_sync(layer, group) is layer
    assert layer.process_group is group


def test_convert_sync_replaces_torch_layers():
    model = nn.Sequential(
        nn.Linear(4, NUM_CHANNELS),
        nn.BatchNorm1d(NUM_CHANNELS, momentum=None, eps=1e-3),
        nn.Sequential(nn.BatchNorm2d(NUM_CHANNELS, affine=False)),
        nn.BatchNorm3d(NUM_CHANNELS, bias=False, dtype=torch.float64),
        nn.SyncBatchNorm(NUM_CHANNELS, track_running_stats=False),
        FrozenBatchNorm2d(NUM_CHANNELS),
    )
    model[1].weight.requires_grad_(False)
    model[2][0].eval()
    old = [model[1], model[2][0], model[3], model[4]]
    group = object()
    assert convert_sync(model, group) is model

    new = [model[1], model[2][0], model[3], model[4]]
    assert [type(layer) for layer in new] == [
        BatchNorm1d,
        BatchNorm2d,
        BatchNorm3d,
        SyncBatchNorm,
    ]
    assert isinstance(model[5], FrozenBatchNorm2d)
    for before, after in zip(old, new):
        assert after.process_group is group
        assert after.training == before.training
        for name in ("eps", "momentum", "affine", "track_running_stats"):
            assert getattr(after, name) == getattr(before, name), name
        for name, tensor in before.named_parameters():
            assert getattr(after, name) is tensor, name
        for name, tensor in before.named_buffers():
            assert getattr(after, name) is tensor, name
    assert model[1].eps == 1e-3
    assert model[1].momentum is None
    assert not model[1].weight.requires_grad
    assert not model[2][0].training
    assert model[3].bias is None
    assert model[3].weight.dtype == torch.float64
    assert model[4].running_mean is None


def test_convert_sync_returns_new_top_layer():
    layer = nn.BatchNorm1d(NUM_CHANNELS)
    converted = convert_sync(layer)
    assert isinstance(converted, BatchNorm1d)
    assert converted.weight is layer.weight
    x = torch.randn(5, NUM_CHANNELS)
    torch.testing.assert_close(converted(x), layer(x))


def test_sync_batchnorm_accepts_any_rank():
    layer = SyncBatchNorm(NUM_CHANNELS)
    assert layer(torch.randn(4, NUM_CHANNELS, 2, 2, 2, 2)).shape == (4, 3, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        layer(torch.randn(NUM_CHANNELS))
