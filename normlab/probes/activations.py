"""Percentiles of layer inputs over training, and per-layer weight-gradient norms.

Ioffe and Szegedy (2015, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", https://arxiv.org/abs/1502.03167, figure 1) show
how the input of a sigmoid drifts during training by plotting its 15th, 50th and 85th
percentiles against the training step. :class:`ActivationRecorder` records the same
statistics for every activation module of a model (or for chosen layers) with forward
hooks, and :func:`grad_norms` returns the L2 norm of each layer's weight gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Union

import torch
from torch import nn

# Activation modules whose inputs are recorded when no layers are given.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
)

# Percentiles of Ioffe and Szegedy's figure 1, in percent.
PERCENTILES = (15.0, 50.0, 85.0)

LayerSpec = Union[str, nn.Module]

# True while a probe runs its own forward passes, which recorders must not record.
_recording_suspended: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "normlab_recording_suspended", default=False
)


@contextlib.contextmanager
def suspend_recording() -> Iterator[None]:
    """Make every :class:`ActivationRecorder` ignore the forward passes in the block.

    The ICS and landscape probes run extra forward passes at moved parameters. Those
    passes are not training steps, so they must not add rows to a recorder's history.
    """
    token = _recording_suspended.set(True)
    try:
        yield
    finally:
        _recording_suspended.reset(token)


def resolve_layers(
    model: nn.Module, layers: Sequence[LayerSpec]
) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified name, module)`` for each layer, given as a module or a name.

    Raises:
        ValueError: if a name is not a submodule of ``model`` or a module is not part
            of it.
    """
    names_by_id = {id(module): name for name, module in model.named_modules()}
    resolved = []
    for layer in layers:
        if isinstance(layer, str):
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                raise ValueError(
                    f"layer {layer!r} is not a submodule of the model; pass a name "
                    "from model.named_modules()"
                ) from None
            resolved.append((layer, module))
        elif isinstance(layer, nn.Module):
            if id(layer) not in names_by_id:
                raise ValueError(
                    f"layer {type(layer).__name__} is not a submodule of the model; "
                    "pass a module of the model or its qualified name"
                )
            resolved.append((names_by_id[id(layer)], layer))
        else:
            raise TypeError(
                f"layers must contain modules or qualified names, got "
                f"{type(layer).__name__}"
            )
    return resolved


def percentiles(
    tensor: torch.Tensor, q: Sequence[float] = PERCENTILES
) -> list[float]:
    r"""Return the percentiles ``q`` (in percent) of all values of ``tensor``.

    The percentile interpolates linearly between the two nearest sorted values, like
    ``numpy.percentile`` and ``torch.quantile`` with their default ``"linear"``
    method: with the ``n`` values sorted as :math:`v_0 \le \dots \le v_{n-1}` and
    :math:`h = (n - 1) q / 100`, the result is
    :math:`v_{\lfloor h \rfloor} + (h - \lfloor h \rfloor)
    (v_{\lfloor h \rfloor + 1} - v_{\lfloor h \rfloor})`. It sorts the values
    itself, because ``torch.quantile`` rejects inputs of more than 2**24 values.
    Values are taken in float64.

    Raises:
        ValueError: if ``tensor`` is empty or a percentile is outside [0, 100].
    """
    if tensor.numel() == 0:
        raise ValueError("cannot take percentiles of an empty tensor")
    for value in q:
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"percentiles must be in [0, 100], got {value}")
    values = tensor.detach().reshape(-1).to(torch.float64).sort().values
    last = values.numel() - 1
    results = []
    for value in q:
        h = last * value / 100.0
        below = int(h)
        above = min(below + 1, last)
        fraction = h - below
        low, high = values[below], values[above]
        results.append(float(low + fraction * (high - low)))
    return results


def grad_norms(model: nn.Module) -> dict[str, float]:
    """Return the L2 norm of the weight gradient of each module that has one.

    A module counts when it has a parameter named ``weight`` whose ``.grad`` is set,
    so call this after ``loss.backward()`` and before ``optimizer.zero_grad()``. Keys
    are qualified module names. Parametrized weights (such as weight normalization)
    are not parameters named ``weight`` and are left out.
    """
    norms = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.grad is not None:
            norms[name] = float(weight.grad.detach().to(torch.float64).norm())
    return norms


class ActivationRecorder:
    """Context manager that records percentiles of layer inputs at each training step.

    Inside the ``with`` block, a forward pre-hook on each recorded layer appends a row
    ``{"step", "layer", "p15", "p50", "p85"}`` to :attr:`history` on every forward
    pass. The percentiles are those of :func:`percentiles` over all values of the
    layer's input (the whole batch), or of its output with ``record="output"``. The
    step is the number of recorded forward passes of ``model`` itself, so in a
    training loop that calls ``model(x)`` once per step it counts training steps from
    1. Hooks are removed on exit, also when the block raises.

    Args:
        model (nn.Module): the model to watch.
        layers (sequence of modules or names, optional): the layers to record. Default:
            every activation module of ``model`` (:data:`ACTIVATION_TYPES`), so the
            recorded inputs are the pre-activations, as in Ioffe and Szegedy's figure 1.
        record (str): ``"input"`` records the first positional input of each layer,
            ``"output"`` its output. Default: ``"input"``.
        train_only (bool): record only while ``model.training`` is True, so that
            evaluation passes in eval mode add no rows. Default: True.

    Forward passes that the ICS and landscape probes run inside
    :func:`suspend_recording` are never recorded.

    Example::

        with ActivationRecorder(model) as recorder:
            for x, y in batches:
                loss = loss_fn(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                recorder.record_grad_norms()
                optimizer.step()
        rows = recorder.history
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSpec] | None = None,
        record: str = "input",
        train_only: bool = True,
    ) -> None:
        if record not in ("input", "output"):
            raise ValueError(f"record must be 'input' or 'output', got {record!r}")
        if layers is None:
            self.layers = [
                (name, module)
                for name, module in model.named_modules()
                if isinstance(module, ACTIVATION_TYPES)
            ]
        else:
            self.layers = resolve_layers(model, layers)
        if not self.layers:
            raise ValueError(
                "found no layers to record: the model has no activation module of "
                "ACTIVATION_TYPES; pass layers explicitly"
            )
        self.model = model
        self.record = record
        self.train_only = train_only
        self.step = 0
        self.history: list[dict] = []
        self.grad_norm_history: list[dict] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ActivationRecorder:
        if self._handles:
            raise RuntimeError("this ActivationRecorder is already active")
        self._handles.append(self.model.register_forward_pre_hook(self._count_step))
        for name, module in self.layers:
            if self.record == "input":
                hook = self._make_input_hook(name)
                self._handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = self._make_output_hook(name)
                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def record_grad_norms(self) -> dict[str, float]:
        """Append the current :func:`grad_norms` of the model to
        :attr:`grad_norm_history` as rows ``{"step", "layer", "grad_norm"}``.

        Returns the norms by layer name.
        """
        norms = grad_norms(self.model)
        for layer, norm in norms.items():
            self.grad_norm_history.append(
                {"step": self.step, "layer": layer, "grad_norm": norm}
            )
        return norms

    def _active(self) -> bool:
        if _recording_suspended.get():
            return False
        return self.model.training or not self.train_only

    def _count_step(self, module: nn.Module, args: tuple) -> None:
        if self._active():
            self.step += 1

    def _append(self, layer: str, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"layer {layer!r} {self.record} is a {type(tensor).__name__}, not a "
                "tensor; record a layer whose input and output are tensors"
            )
        p15, p50, p85 = percentiles(tensor, PERCENTILES)
        self.history.append(
            {"step": self.step, "layer": layer, "p15": p15, "p50": p50, "p85": p85}
        )

    def _make_input_hook(self, layer: str):
        # A pre-hook receives the input before an in-place activation overwrites it.
        def hook(module: nn.Module, args: tuple) -> None:
            if self._active():
                self._append(layer, args[0] if args else None)

        return hook

    def _make_output_hook(self, layer: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._active():
                self._append(layer, output)

        return hook
