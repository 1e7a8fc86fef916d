"""Memory that a training step needs: tensors saved for backward and the peak.

Claims such as "EDSR removes BatchNorm and saves about 40% of the memory" concern the
activations that autograd keeps between the forward and the backward pass. Two probes
measure them:

- ``saved_tensor_bytes`` counts, exactly and on any device, the bytes of the tensors
  that the forward pass saves for backward, per module and per layer type;
- ``peak_memory`` measures the peak of allocated memory during one forward and
  backward pass: the CUDA caching allocator's counters on a GPU, the profiler's
  allocation events on the CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger(__name__)

# Key of saved tensors outside every module's forward, such as those of the loss.
OTHER = "other"
# Key of the root module in ``by_module``, whose qualified name is "".
ROOT = "(root)"


@dataclass(frozen=True)
class SavedTensorReport:
    """Bytes of the tensors that one forward pass saved for backward.

    Each storage counts once, with its full size, however many saved tensors view it:
    a view keeps its whole storage alive. A storage saved by several modules counts
    for the first one that saved it.

    Attributes:
        total_bytes: bytes of all distinct saved storages.
        parameter_bytes: the part of ``total_bytes`` in storages of the model's
            parameters and buffers (weights, BN running statistics), which exist
            whether or not autograd saves them.
        by_layer_type: bytes per class name of the innermost module whose forward
            saved the tensor ("Conv2d", "BatchNorm2d", ...), ``"other"`` outside
            the model.
        by_module: bytes per qualified module name (``"(root)"`` for the model
            itself), ``"other"`` outside the model.
        num_saved: saved tensors, counting a storage each time it is saved.
        num_storages: distinct saved storages.
    """

    total_bytes: int
    parameter_bytes: int
    by_layer_type: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    num_saved: int = 0
    num_storages: int = 0

    @property
    def activation_bytes(self) -> int:
        """Bytes saved beyond the parameters and buffers: the memory a step adds."""
        return self.total_bytes - self.parameter_bytes


@dataclass(frozen=True)
class PeakMemory:
    """Peak memory of one forward and backward pass, above what was allocated before.

    Attributes:
        peak_bytes: maximum of allocated bytes during the step minus the allocated
            bytes at its start. It includes activations, temporaries and the new
            ``.grad`` tensors of the parameters.
        device: the device the step ran on.
        method: how it was measured.
    """

    peak_bytes: int
    device: str
    method: str


def saved_tensor_bytes(
    model: nn.Module,
    input: torch.Tensor | tuple[torch.Tensor, ...],
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    train: bool = True,
) -> SavedTensorReport:
    """Count the bytes that autograd saves for backward during one forward pass.

    The forward runs under ``torch.autograd.graph.saved_tensors_hooks``, whose pack
    hook sees every tensor that an operation saves for its backward. Storages are
    identified by ``untyped_storage().data_ptr()``, and the probe keeps a reference to
    each until it returns, so a freed address cannot be reused and counted twice.
    Forward pre-hooks and hooks on every module track which forward is running, so
    each tensor is attributed to the innermost module, including functional
    operations in a container's own ``forward``.

    What autograd saves depends on which inputs need gradients. For example
    ``nn.Linear`` on a 2-D input saves only the input when the input does not require
    grad, because the weight is needed only for the input's gradient.

    The model is restored afterwards: its train/eval flags and its buffers, such as the
    BN running statistics that a train-mode forward updates.

    Args:
        model: the model.
        input: the input tensor, or a tuple of positional inputs.
        loss_fn: applied to the output inside the probe, so that the tensors the loss
            saves count too (under ``"other"``). None counts the model only.
        train: run the forward in train mode (True) or eval mode (False). Eval mode
            still saves tensors when parameters require grad; only
            ``torch.no_grad()`` or frozen parameters and inputs save none.

    Returns:
        A :class:`SavedTensorReport`. Under ``torch.no_grad()`` every count is 0.
    """
    inputs = input if isinstance(input, tuple) else (input,)
    module_names = {module: name for name, module in model.named_modules()}
    owned_storages = {
        _storage_key(tensor)
        for tensor in itertools.chain(model.parameters(), model.buffers())
    }
    running: list[nn.Module] = []
    counts = {"saved": 0, "total": 0, "parameters": 0}
    sizes: dict[object, int] = {}
    by_type: dict[str, int] = {}
    by_module: dict[str, int] = {}
    kept: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        counts["saved"] += 1
        key = _storage_key(tensor)
        if key in sizes:
            return tensor
        size = _storage_bytes(tensor)
        sizes[key] = size
        kept.append(tensor)
        counts["total"] += size
        if key in owned_storages:
            counts["parameters"] += size
        if running:
            owner = running[-1]
            type_name = type(owner).__name__
            module_name = module_names.get(owner) or ROOT
        else:
            type_name = module_name = OTHER
        by_type[type_name] = by_type.get(type_name, 0) + size
        by_module[module_name] = by_module.get(module_name, 0) + size
        return tensor

    with _preserved_state(model), _module_tracking(model, running):
        model.train(train)
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            output = model(*inputs)
            # The loss runs after the model's forward hooks, so it counts as "other".
            if loss_fn is not None:
                loss_fn(output)
    del output, kept

    return SavedTensorReport(
        total_bytes=counts["total"],
        parameter_bytes=counts["parameters"],
        by_layer_type=by_type,
        by_module=by_module,
        num_saved=counts["saved"],
        num_storages=len(sizes),
    )


def peak_memory(
    model: nn.Module,
    input: torch.Tensor | tuple[torch.Tensor, ...],
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PeakMemory:
    """Measure the peak allocated memory of one train-mode forward and backward pass.

    On CUDA, the value is ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``, minus ``memory_allocated`` before the step. It counts
    tensors of the caching allocator, not its reserved-but-free blocks, nor cuDNN or
    cuBLAS workspaces allocated outside it.

    On the CPU, the step runs under ``torch.profiler`` with ``profile_memory=True``,
    and the value is the maximum running sum of the allocation and free events of the
    CPU allocator, in time order. This counts every tensor storage at byte precision,
    unlike the process RSS, which moves in pages and includes the allocator's free
    lists. It misses memory that libraries allocate outside PyTorch's allocator (such
    as oneDNN or BLAS scratch space) and counts allocations of other threads of the
    process during the step. The profiler also slows the step down.

    The model's train/eval flags, buffers and existing ``.grad`` tensors are restored
    afterwards. During the step the gradients start from None, so their allocation
    counts.

    Args:
        model: the model, on the device to measure.
        input: the input tensor, or a tuple of positional inputs, on that device.
        loss_fn: maps the output to a scalar loss; None uses ``output.sum()``.

    Raises:
        ValueError: for a device other than CPU or CUDA, or an output that is not a
            tensor when ``loss_fn`` is None.
    """
    inputs = input if isinstance(input, tuple) else (input,)
    device = _device_of(model, inputs)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"peak_memory supports CPU and CUDA devices, got {device}; move the model "
            f"and input to one of them"
        )

    def step() -> None:
        output = model(*inputs)
        if loss_fn is not None:
            loss = loss_fn(output)
        elif isinstance(output, torch.Tensor):
            loss = output.sum()
        else:
            raise ValueError(
                f"the model returned {type(output).__name__}, not a tensor; pass a "
                f"loss_fn that maps it to a scalar"
            )
        loss.backward()

    with _preserved_state(model):
        model.train()
        for parameter in model.parameters():
            parameter.grad = None
        if device.type == "cuda":
            peak = _cuda_peak(step, device)
            method = "torch.cuda.max_memory_allocated"
        else:
            peak = _cpu_peak(step)
            method = "torch.profiler CPU allocator events"
    return PeakMemory(peak_bytes=peak, device=str(device), method=method)


# NOTE: no GPU was available when this was written, so the CUDA branch has no test.
def _cuda_peak(step: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - baseline)


def _cpu_peak(step: Callable[[], None]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    # kineto_results holds the raw events that torch.autograd.profiler parses into
    # FunctionEvents. Those merge allocations into their operators, losing the order.
    results = getattr(profiler.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError(
            f"torch {torch.__version__} exposes no profiler kineto_results, so the CPU "
            f"peak cannot be measured; run on CUDA or update normlab"
        )
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _device_of(model: nn.Module, inputs: tuple) -> torch.device:
    for tensor in itertools.chain(model.parameters(), inputs):
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")


def _storage_key(tensor: torch.Tensor) -> object:
    """Return an id of the tensor's storage: device and address of its data."""
    try:
        return (tensor.device, tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        # Sparse and some subclass tensors have no single storage, so each counts
        # as its own.
        return ("tensor", id(tensor))


def _storage_bytes(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return tensor.nelement() * tensor.element_size()


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def _module_tracking(model: nn.Module, running: list[nn.Module]) -> Iterator[None]:
    """Keep ``running`` as the stack of modules whose forward is executing."""

    def push(module: nn.Module, args: tuple) -> None:
        running.append(module)

    def pop(module: nn.Module, args: tuple, output: object) -> None:
        if running and running[-1] is module:
            running.pop()

    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(push))
            handles.append(module.register_forward_hook(pop, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        running.clear()


@contextlib.contextmanager
def _preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore each module's train flag, every buffer and every ``.grad`` on exit."""
    flags = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    grads = [(parameter, parameter.grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for parameter, grad in grads:
            parameter.grad = grad
