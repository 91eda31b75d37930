"""Max-pooling in channels-last memory while evaluating, where PyTorch's CPU kernel is faster.

PyTorch's CPU max-pool vectorizes over channels in channels-last memory and not in NCHW:
from 8 channels (one AVX2 register of float32) the channels-last kernel measured 1.8-6x
faster on this project's CPU, and the evaluation of W2's ``small_cnn`` 1.6x faster
(BENCHMARKS.md §30); below 8 channels it is not faster (3 channels: 1.2-1.5x slower), so it
is left alone there. A window's maximum is exact, so the values are bit for bit the same in
either layout. Only calls without gradients are rewritten (a training step's pooling routes
gradients through its indices, and the channels-last backward measured slower), only on CPU
tensors, and only calls that return no indices.

Example:
    >>> x = torch.randn(2, 8, 6, 6)
    >>> with torch.no_grad(), channels_last_pooling():
    ...     pooled = torch.nn.MaxPool2d(2)(x)
    >>> torch.equal(pooled, torch.nn.functional.max_pool2d(x, 2)), pooled.is_contiguous()
    (True, True)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MIN_CHANNELS = 8  # the channels-last kernel is faster from here (BENCHMARKS.md §30)


class channels_last_pooling(TorchFunctionMode):
    """Within it, ``F.max_pool2d`` of a 4-D CPU tensor of at least ``MIN_CHANNELS`` channels
    that needs no gradient runs in channels-last memory; the result is contiguous again."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.max_pool2d and args and _pays(args[0], args[1:], kwargs):
            x = args[0].contiguous(memory_format=torch.channels_last)
            return func(x, *args[1:], **kwargs).contiguous()
        return func(*args, **kwargs)


def _pays(x: object, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether rewriting this ``max_pool2d(x, *rest, **kwargs)`` call is faster and exact."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.device.type != "cpu":
        return False
    if x.shape[1] < MIN_CHANNELS or (x.requires_grad and torch.is_grad_enabled()):
        return False
    indices = rest[5] if len(rest) > 5 else kwargs.get("return_indices", False)
    return not indices
