"""A fake accelerator: device placement checked on a machine without a GPU.

Inside ``FakeAccelerator()``, ``torch.device("meta")`` (``FAKE``) stands for an accelerator.
A tensor moved there (``.to(FAKE)``, or made with ``device=FAKE``) is a CPU tensor of the
class ``OnFake`` that reports ``FAKE`` as its device, so the same kernels compute the same
bits as on the host. The mode refuses what a real accelerator refuses, and a little more:

- an operation mixing fake tensors with host tensors of one or more dimensions (0-dim host
  tensors are allowed, as CUDA allows them; ``copy_`` may cross, and a fake tensor may be
  indexed with host integer or boolean tensors, as on CUDA);
- ``.numpy()`` of a fake tensor;
- a host ``generator=`` for a tensor made on the fake device.

A part that claims to run on ``run.device`` (an aggregator giving ``Need.ON_DEVICE``) is
checked by running it here on fake tensors and comparing with the host run. A missing
``device=`` (a host tensor made beside fake ones) then fails as it would on a GPU.

What it cannot follow: ``torch.func`` transforms (``vmap``, ``grad``) return plain tensors,
which then look like host tensors, and ``module.to(FAKE)`` swaps parameters' data in place,
which leaves them reporting the host; code using either is checked on a real GPU only.

Example:
    >>> with FakeAccelerator():
    ...     x = torch.ones(3).to(FAKE)
    ...     y = x * 2 + torch.zeros(3, device=x.device)
    ...     y.device, y.tolist(), y.to("cpu").device
    (device(type='meta'), [2.0, 2.0, 2.0], device(type='cpu'))
    >>> with FakeAccelerator():
    ...     torch.ones(3).to(FAKE) + torch.ones(3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    RuntimeError: add: expected all tensors on one device, got host tensors of shapes [(3,)] ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

FAKE = torch.device("meta")
_CROSSING = {torch.Tensor.copy_}  # operations that may read another device's tensor


class OnFake(torch.Tensor):
    """A CPU tensor standing for one on the fake accelerator."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return FAKE


def _fake(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, OnFake) else t.as_subclass(OnFake)


def _on_fake(out: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, _fake, out)


def _is_fake(device: object) -> bool:
    return device is not None and torch.device(device) == FAKE  # type: ignore[call-overload]


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", repr(func))


class FakeAccelerator(TorchFunctionMode):
    """Makes ``FAKE`` behave as an accelerator beside the host (see the module)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            return self._move(args[0], args[1:], kwargs)
        if func is torch.Tensor.cpu:
            return self._move(args[0], ("cpu",), {})
        if _is_fake(kwargs.get("device")):
            if kwargs.get("generator") is not None:
                raise RuntimeError(f"{_name(func)}: a host generator for a tensor on {FAKE}")
            return _on_fake(func(*args, **{**kwargs, "device": "cpu"}))
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not any(isinstance(t, OnFake) for t in tensors):
            return func(*args, **kwargs)
        if func is torch.Tensor.numpy:
            raise TypeError(f"can't convert a tensor on {FAKE} to numpy: move it to the host")
        if func in _CROSSING:
            return func(*args, **kwargs)
        host = [t for t in tensors if not isinstance(t, OnFake) and t.dim() > 0]
        if func is torch.Tensor.__getitem__:  # CUDA takes host indices
            host = [t for t in host if t.is_floating_point() or t.is_complex()]
        if host:
            shapes = [tuple(t.shape) for t in host]
            raise RuntimeError(
                f"{_name(func)}: expected all tensors on one device, got host tensors of shapes "
                f"{shapes} beside tensors on {FAKE}"
            )
        return _on_fake(func(*args, **kwargs))

    @staticmethod
    def _move(t: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """``t.to(*args, **kwargs)``: a copy when it crosses between host and ``FAKE``."""
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        here = torch.Tensor.as_subclass(t, torch.Tensor)
        moved = here.to(
            dtype=dtype or t.dtype, memory_format=memory_format or torch.preserve_format
        )
        if device is None:
            return _fake(moved) if isinstance(t, OnFake) else moved
        if _is_fake(device):
            return t if isinstance(t, OnFake) and moved is here else _fake(_copied(moved, here))
        if device.type != "cpu":
            raise RuntimeError(f"FakeAccelerator: no device {device} here (only cpu and {FAKE})")
        return _copied(moved, here) if isinstance(t, OnFake) else moved


def _copied(moved: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``moved``, or a copy of it when it is still ``source``'s memory (a real move copies)."""
    return moved.clone() if moved.data_ptr() == source.data_ptr() else moved
