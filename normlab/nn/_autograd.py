"""A once-differentiable backward whose second backward names the fix."""

import functools

import torch
from torch.autograd.function import once_differentiable

SECOND_BACKWARD_HINT = (
    "normlab's BatchNorm computed this gradient with a backward that cannot be "
    "differentiated again (create_graph=True). For a second backward, such as a gradient "
    "penalty, select the composite path: "
    "normlab.nn.batchnorm.set_batch_norm_backend('composite'), the context manager "
    "batch_norm_backend('composite'), or NORMLAB_BN_BACKEND=composite"
)


def first_order_only(backward):
    """Wrap an ``autograd.Function.backward`` like ``once_differentiable``.

    The wrapper raises ``RuntimeError`` with :data:`SECOND_BACKWARD_HINT` as soon as the
    backward runs with ``create_graph=True``. torch's own error comes only at the second
    backward and does not name the composite path.
    """
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        # autograd enables grad mode inside backward exactly when create_graph=True
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_BACKWARD_HINT)
        return once(ctx, *grad_outputs)

    return wrapper
