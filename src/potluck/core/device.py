"""``run.device``: where a simulation's clients train and the model is evaluated.

Everything that crosses the client/server boundary stays a CPU float32 vector (what a
deployed site would send); an engine that runs on an accelerator moves a client's (or a
vectorized cohort's) weights, optimizer state, term working state and data there for the
local steps and brings the trained weights back, and the centralised and federated
evaluations run there too. A round's updates are stacked and aggregated there when the
aggregator says it runs on the updates' device (``Need.ON_DEVICE``; on CUDA only:
``aggregation_device``), and the aggregate comes back to the host. Random draws (batch
orders, DP noise, dropout seeds) stay on CPU generators, so a run draws the same numbers on
every device; results then agree with CPU within float tolerance (kernels sum in other
orders).

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: run.device = 'tpu': ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from potluck.core.parts import Need, gives

DEVICE_TYPES = ("cpu", "cuda", "mps")
HOST = torch.device("cpu")


def resolve_device(name: str | torch.device) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1", "mps") as a device this machine has, or a
    ``ValueError`` saying what is missing."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"run.device = {name!r}: not a device name ({exc})") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(
            f"run.device = {name!r}: potluck trains on {', '.join(DEVICE_TYPES)}, not "
            f"{device.type!r}"
        )
    if device.type == "cuda":
        _check_cuda(name, device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"run.device = {name!r}: this torch sees no MPS device")
    return device


def _check_cuda(name: str | torch.device, device: torch.device) -> None:
    if not torch.cuda.is_available():
        build = torch.__version__
        raise ValueError(
            f"run.device = {name!r}: this torch ({build}) sees no CUDA device "
            "(torch.cuda.is_available() is False); install a CUDA build of torch on a machine "
            'with a GPU, or use run.device = "cpu"'
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"run.device = {name!r}: this machine has {count} CUDA device(s)")


def fork_problem() -> str | None:
    """Why worker processes forked from this one could not train, or ``None``. Once a
    process has used CUDA, PyTorch's autograd refuses to run in a child forked from it
    (its CUDA threads do not survive ``fork``), also for a child that trains on CPU.

    Example:
        >>> why = fork_problem()  # None in a process that has not used CUDA
        >>> why is None or why.startswith("this process has used CUDA")
        True
    """
    if torch.cuda.is_initialized():
        return (
            "this process has used CUDA (torch.cuda.is_initialized()), and PyTorch's autograd "
            "does not run in processes forked after that"
        )
    return None


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions in full float32 inside the block, the previous
    settings restored after (PyTorch runs cuDNN convolutions in TF32, a 10-bit mantissa, by
    default): for comparing a run on CUDA with one on CPU at float32 tolerance.

    Example:
        >>> with full_float32():
        ...     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        (False, False)
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``tensors`` moved to ``device`` (the same tensors where they already are).

    Example:
        >>> on_device({"w": torch.ones(2)}, HOST)["w"].device
        device(type='cpu')
    """
    return {key: value.to(device) for key, value in tensors.items()}


def aggregation_device(aggregator: object, device: torch.device) -> torch.device:
    """Where a round's updates are stacked and aggregated: ``device`` if it is a CUDA
    device and ``aggregator`` gives ``Need.ON_DEVICE``; the host otherwise (MPS has no
    float64, which weights and scores are computed in; an aggregator that does not say it
    runs on the device, a user's among them, is never moved).

    Example:
        >>> from potluck.aggregate import WeightedMean
        >>> aggregation_device(WeightedMean(), HOST)
        device(type='cpu')
    """
    if device.type == "cuda" and str(Need.ON_DEVICE) in gives(aggregator):
        return device
    return HOST
