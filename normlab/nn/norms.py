r"""Normalization layers that the lab compares with Batch Normalization.

* :class:`FrozenBatchNorm1d`, :class:`FrozenBatchNorm2d` and :class:`FrozenBatchNorm3d`
  apply fixed statistics and a fixed affine, as torchvision's ``FrozenBatchNorm2d``.
* :class:`LayerNorm` (Ba et al., 2016, https://arxiv.org/abs/1607.06450) normalizes each
  sample over all its channels and positions.
* :class:`GroupNorm` (Wu and He, 2018, https://arxiv.org/abs/1803.08494) normalizes each
  sample over groups of channels and their positions.
* :class:`InstanceNorm1d`, :class:`InstanceNorm2d` and :class:`InstanceNorm3d` (Ulyanov
  et al., 2016, https://arxiv.org/abs/1607.08022) normalize each sample and channel over
  its positions.

Layer, group and instance normalization are the same computation with 1, ``num_groups``
and ``C`` groups, so all three run through :func:`group_norm`, which is written from the
definition with torch's autograd for the backward. The tests check that each layer
matches its torch counterpart in outputs and gradients.
"""

import math

import torch
from torch import Tensor, nn

__all__ = [
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "default_num_groups",
    "group_norm",
]


# Half-precision inputs are normalized in float32, as in normlab.nn.batchnorm.
_REDUCED_PRECISION_DTYPES = (torch.float16, torch.bfloat16)

# Upper bound of the default group count.
_MAX_DEFAULT_GROUPS = 32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _REDUCED_PRECISION_DTYPES else dtype


def _per_channel_view(input: Tensor) -> tuple[int, ...]:
    # Shape that broadcasts a (C,) vector against the input, e.g. (1, C, 1, 1).
    return (1, input.size(1)) + (1,) * (input.dim() - 2)


def _check_num_channels(layer_name: str, num_channels: int, input: Tensor) -> None:
    if input.size(1) != num_channels:
        raise ValueError(
            f"{layer_name} expected input with {num_channels} channels, got "
            f"{input.size(1)} channels in input of size {tuple(input.shape)}. Set "
            "the channel count to the input's size along dimension 1."
        )


def default_num_groups(num_channels: int, min_group_size: int = 1) -> int:
    """Return the largest divisor of ``num_channels`` that is at most 32.

    This is 32 when ``num_channels`` is a multiple of 32, ``num_channels`` itself when
    it is at most 32, and otherwise the largest divisor below 32, for example 24 for 48
    channels or 25 for 100 channels. ``min_group_size`` caps the number of groups at
    ``num_channels // min_group_size``, so every group contains at least that many channels.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be a positive integer, got {num_channels}")
    largest = min(num_channels, _MAX_DEFAULT_GROUPS, max(1, num_channels // min_group_size))
    for num_groups in range(largest, 0, -1):
        if num_channels % num_groups == 0:
            return num_groups
    raise AssertionError("1 divides every positive integer")


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Apply Group Normalization to ``input``, computed from the definition.

    The channels of each sample are split into ``num_groups`` groups of consecutive
    channels. Each group is normalized with the mean and biased variance of all its
    values (its channels at every position), then each channel is scaled and shifted:

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    ``num_groups=1`` gives layer normalization over ``(C, *)`` and ``num_groups=C``
    gives instance normalization. The result matches
    :func:`torch.nn.functional.group_norm` to within rounding. The backward is torch's
    autograd through these operations.

    Args:
        input (Tensor): floating-point input of shape :math:`(N, C, *)`.
        num_groups (int): number of groups. It must divide :math:`C`.
        weight (Tensor, optional): per-channel scale :math:`\gamma` of shape
            :math:`(C,)`. Default: ``None`` (a scale of 1).
        bias (Tensor, optional): per-channel shift :math:`\beta` of shape
            :math:`(C,)`. Default: ``None`` (a shift of 0).
        eps (float): value added to the variance before the square root. Default: 1e-5

    Shape:
        - Input: :math:`(N, C, *)`
        - Output: same shape and dtype as the input, contiguous.

    .. note::
        float16 and bfloat16 inputs are normalized in float32 and the output is cast
        back to the input dtype.
    """
    if not input.is_floating_point():
        raise TypeError(
            f"group_norm expected a floating-point input, got dtype {input.dtype}"
        )
    if input.dim() < 2:
        raise ValueError(
            f"group_norm expected input with at least 2 dimensions (N, C, ...), got "
            f"{input.dim()}D input of size {tuple(input.shape)}"
        )
    num_samples, num_channels = input.shape[:2]
    if num_groups < 1 or num_channels % num_groups != 0:
        raise ValueError(
            f"num_groups must be a positive divisor of the channel count "
            f"{num_channels}, got num_groups={num_groups}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.numel() != num_channels:
            raise ValueError(
                f"{name} should contain {num_channels} elements (the input's channel "
                f"count), got {tensor.numel()}"
            )

    compute_dtype = _compute_dtype(input.dtype)
    # The explicit group size keeps an empty batch (N = 0) reshapeable.
    group_size = (num_channels // num_groups) * math.prod(input.shape[2:])
    grouped = input.to(compute_dtype).reshape(num_samples, num_groups, group_size)
    if grouped.numel() == 0:
        # Nothing to normalize, and var_mean would warn about zero degrees of freedom.
        normalized = grouped
    else:
        var, mean = torch.var_mean(grouped, dim=-1, correction=0, keepdim=True)
        normalized = (grouped - mean) * torch.rsqrt(var + eps)
    output = normalized.reshape(input.shape)

    view = _per_channel_view(input)
    if weight is not None:
        output = output * weight.to(compute_dtype).view(view)
    if bias is not None:
        output = output + bias.to(compute_dtype).view(view)
    return output.to(input.dtype)


class _FrozenBatchNorm(nn.Module):
    """Common base of FrozenBatchNorm1d, FrozenBatchNorm2d and FrozenBatchNorm3d.

    Subclasses implement ``_check_input_dim``.
    """

    num_features: int
    eps: float

    def __init__(
        self, num_features: int, eps: float = 1e-5, device=None, dtype=None
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(
                f"num_features must be a positive integer, got {num_features}"
            )
        if eps < 0.0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory_kwargs))
        self.register_buffer("bias", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer(
            "running_mean", torch.zeros(num_features, **factory_kwargs)
        )
        self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        # A BatchNorm state_dict also carries num_batches_tracked, which a frozen
        # layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        _check_num_channels(type(self).__name__, self.num_features, input)
        compute_dtype = _compute_dtype(input.dtype)
        # Fold the statistics and the affine into one per-channel scale and shift,
        # as BatchNorm does in eval mode.
        running_mean = self.running_mean.to(compute_dtype)
        invstd = torch.rsqrt(self.running_var.to(compute_dtype) + self.eps)
        scale = self.weight.to(compute_dtype) * invstd
        shift = self.bias.to(compute_dtype) - running_mean * scale
        view = _per_channel_view(input)
        output = torch.addcmul(
            shift.view(view), input.to(compute_dtype), scale.view(view)
        )
        return output.to(input.dtype)


_FROZEN_DOC_TEMPLATE = r"""Batch Normalization with fixed statistics and affine for {input_desc}.

    .. math::

        y = \frac{{x - \mathrm{{running\_mean}}}}{{\sqrt{{\mathrm{{running\_var}} +
        \epsilon}}}} \cdot \mathrm{{weight}} + \mathrm{{bias}}

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers, not
    parameters, so the layer learns nothing and computes the same function in train and
    eval mode. It behaves like :class:`torchvision.ops.FrozenBatchNorm2d` and like a
    BatchNorm in eval mode. Gradients flow to the input only.

    ``load_state_dict`` accepts the state_dict of a BatchNorm layer with
    ``affine=True`` and ``track_running_stats=True``, and ignores its
    ``num_batches_tracked``.

    Args:
        num_features (int): number of channels :math:`C` of the input.
        eps (float): value added to the variance before the square root. Default: 1e-5
        device (torch.device, optional): device of the buffers.
        dtype (torch.dtype, optional): dtype of the buffers.

    Shape:
        - Input: {input_shape}
        - Output: same shape and dtype as the input.
"""


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = _FROZEN_DOC_TEMPLATE.format(
        input_desc="2D or 3D input",
        input_shape=r":math:`(N, C)` or :math:`(N, C, L)`",
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = _FROZEN_DOC_TEMPLATE.format(
        input_desc="4D input (a batch of images)",
        input_shape=r":math:`(N, C, H, W)`",
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = _FROZEN_DOC_TEMPLATE.format(
        input_desc="5D input (a batch of volumes)",
        input_shape=r":math:`(N, C, D, H, W)`",
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class _PerSampleNorm(nn.Module):
    """Common base of LayerNorm, GroupNorm and the InstanceNorm layers.

    It contains the per-channel affine. Subclasses pass their group count to
    :meth:`_normalize` and name their channel-count argument in ``_channel_arg``.
    """

    eps: float
    affine: bool
    _channel_arg = "num_features"

    def __init__(
        self,
        num_channels: int,
        eps: float,
        affine: bool,
        bias: bool,
        device,
        dtype,
    ) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(
                f"{self._channel_arg} must be a positive integer, got {num_channels}"
            )
        factory_kwargs = {"device": device, "dtype": dtype}
        self._num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set weight to 1 and bias to 0."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _normalize(self, input: Tensor, num_groups: int) -> Tensor:
        _check_num_channels(type(self).__name__, self._num_channels, input)
        return group_norm(input, num_groups, self.weight, self.bias, self.eps)


class _FeatureNorm(_PerSampleNorm):
    """A per-sample normalization whose constructor takes ``num_features`` first, as
    ``torch.nn.BatchNorm*d`` does: the base of LayerNorm and InstanceNorm*d."""

    num_features: int

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, affine, bias, device, dtype)
        self.num_features = num_features

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class LayerNorm(_FeatureNorm):
    r"""Layer Normalization over all channels and positions of each sample.

    Ba, Kiros and Hinton, "Layer Normalization", 2016
    (https://arxiv.org/abs/1607.06450). Each sample is normalized with the mean and
    biased variance of all its values, then each channel is scaled and shifted:

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    For :math:`(N, C)` features this is :class:`torch.nn.LayerNorm` ``(C)``. For
    :math:`(N, C, *)` features it is :class:`torch.nn.GroupNorm` ``(1, C)``: the
    statistics span the channels and every position, and :math:`\gamma` and
    :math:`\beta` have one value per channel. A per-element affine (torch's
    ``LayerNorm((C, H, W))``) would tie the layer to one input size, so it is not used.

    Args:
        num_features (int): number of channels :math:`C` of the input.
        eps (float): value added to the variance before the square root. Default: 1e-5
        affine (bool): if ``True``, learn a per-channel scale ``weight`` (initialized
            to 1) and shift ``bias`` (initialized to 0). Default: ``True``
        device (torch.device, optional): device of the parameters.
        dtype (torch.dtype, optional): dtype of the parameters.
        bias (bool, keyword-only): if ``False`` (and ``affine`` is ``True``), learn no
            shift. Default: ``True``

    Shape:
        - Input: :math:`(N, C, *)`, any number of positions ``*`` including none.
        - Output: same shape and dtype as the input.
    """

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input, num_groups=1)


class GroupNorm(_PerSampleNorm):
    r"""Group Normalization over groups of channels of each sample.

    Wu and He, "Group Normalization", 2018 (https://arxiv.org/abs/1803.08494). The
    channels are split into ``num_groups`` groups of consecutive channels. Each group
    of each sample is normalized with the mean and biased variance of its values, then
    each channel is scaled and shifted:

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    It computes the same function as :class:`torch.nn.GroupNorm` and has the same
    attributes and state_dict keys. Unlike torch, the channel count comes first, as in
    every normalization of this package, so ``GroupNorm(64)`` can replace
    ``BatchNorm2d(64)``.

    Args:
        num_channels (int): number of channels :math:`C` of the input.
        num_groups (int, optional): number of groups, which must divide
            ``num_channels``. Default: ``None``, which takes the largest divisor of
            ``num_channels`` that is at most 32 (see :func:`default_num_groups`): 32
            groups for 64 channels, 8 for 8 channels, 24 for 48 channels.
        eps (float): value added to the variance before the square root. Default: 1e-5
        affine (bool): if ``True``, learn a per-channel scale ``weight`` (initialized
            to 1) and shift ``bias`` (initialized to 0). Default: ``True``
        device (torch.device, optional): device of the parameters.
        dtype (torch.dtype, optional): dtype of the parameters.
        bias (bool, keyword-only): if ``False`` (and ``affine`` is ``True``), learn no
            shift. Default: ``True``

    Shape:
        - Input: :math:`(N, C, *)`, any number of positions ``*`` including none.
        - Output: same shape and dtype as the input.
    """

    num_groups: int
    num_channels: int
    _channel_arg = "num_channels"

    def __init__(
        self,
        num_channels: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        if num_groups is None:
            num_groups = default_num_groups(num_channels)
        elif num_groups < 1 or num_channels % num_groups != 0:
            raise ValueError(
                "num_groups must be a positive divisor of "
                f"num_channels={num_channels}, got num_groups={num_groups}"
            )
        super().__init__(num_channels, eps, affine, bias, device, dtype)
        self.num_channels = num_channels
        self.num_groups = num_groups

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, "
            f"affine={self.affine}"
        )

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input, self.num_groups)


class _InstanceNorm(_FeatureNorm):
    """Common base of InstanceNorm1d, InstanceNorm2d and InstanceNorm3d.

    Subclasses set ``_expected_dim`` and ``_shape_desc``.
    """

    _expected_dim: int
    _shape_desc: str

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        if input.dim() != self._expected_dim:
            hint = ""
            if input.dim() == 2:
                hint = (
                    ". Instance statistics need at least one spatial dimension, so "
                    "use layernorm or batchnorm for (N, C) features"
                )
            raise ValueError(
                f"{name} expected {self._expected_dim}D input {self._shape_desc}, got "
                f"{input.dim()}D input of size {tuple(input.shape)}{hint}"
            )
        if self.training and math.prod(input.shape[2:]) == 1:
            # torch.nn.functional.instance_norm raises the same way: a single value
            # per channel normalizes to 0 and leaves only the bias.
            raise ValueError(
                f"{name} expected more than 1 spatial element when training, got "
                f"input of size {tuple(input.shape)}"
            )
        # One group per channel gives per-sample, per-channel statistics.
        return self._normalize(input, num_groups=self.num_features)


_INSTANCE_DOC_TEMPLATE = r"""Instance Normalization over the {positions} of each channel.

    Ulyanov, Vedaldi and Lempitsky, "Instance Normalization: The Missing Ingredient for
    Fast Stylization", 2016 (https://arxiv.org/abs/1607.08022). Each channel of each
    sample is normalized with the mean and biased variance of its values, then scaled
    and shifted:

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \gamma + \beta

    It computes the same function as :class:`torch.nn.{name}` with ``affine=True`` and
    ``track_running_stats=False``, and has the same state_dict keys. Train and eval mode
    both use the statistics of the input.

    .. note::
        ``affine`` defaults to ``True`` here, where torch defaults to ``False``, so that
        every normalization of this package learns a per-channel scale and shift as
        BatchNorm does. Running statistics are not supported.

    Args:
        num_features (int): number of channels :math:`C` of the input.
        eps (float): value added to the variance before the square root. Default: 1e-5
        affine (bool): if ``True``, learn a per-channel scale ``weight`` (initialized
            to 1) and shift ``bias`` (initialized to 0). Default: ``True``
        device (torch.device, optional): device of the parameters.
        dtype (torch.dtype, optional): dtype of the parameters.
        bias (bool, keyword-only): if ``False`` (and ``affine`` is ``True``), learn no
            shift. Default: ``True``

    Shape:
        - Input: {input_shape}{input_note}
        - Output: same shape and dtype as the input.

    Raises:
        ValueError: in forward, if the input has another number of dimensions, or has a
            single spatial element while training.
"""


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _INSTANCE_DOC_TEMPLATE.format(
        name="InstanceNorm1d",
        positions="length",
        input_shape=r":math:`(N, C, L)`",
        input_note=(
            ". Unlike torch, which reads a 2D input as one unbatched :math:`(C, L)` "
            "sample,\n          a 2D input raises ``ValueError``, because in this lab "
            "it would be :math:`(N, C)` features."
        ),
    )
    _expected_dim = 3
    _shape_desc = "(N, C, L)"


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _INSTANCE_DOC_TEMPLATE.format(
        name="InstanceNorm2d",
        positions="height and width",
        input_shape=r":math:`(N, C, H, W)`",
        input_note="",
    )
    _expected_dim = 4
    _shape_desc = "(N, C, H, W)"


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _INSTANCE_DOC_TEMPLATE.format(
        name="InstanceNorm3d",
        positions="depth, height and width",
        input_shape=r":math:`(N, C, D, H, W)`",
        input_note="",
    )
    _expected_dim = 5
    _shape_desc = "(N, C, D, H, W)"
