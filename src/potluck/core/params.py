"""``ParamSpec``: named tensors <-> one flat float32 vector.

Everything that crosses the client/server boundary is a flat float32 vector; a ``ParamSpec``
records the names, shapes and offsets that map it back to a model's tensors.

Example:
    >>> import torch
    >>> spec = ParamSpec.from_module(torch.nn.Linear(3, 2))
    >>> spec.names, spec.size
    (('weight', 'bias'), 8)
    >>> flat = spec.flatten({"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    >>> spec.unflatten(flat)["weight"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import torch

FLOAT = torch.float32


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of a model's trainable parameters in one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ValueError("ParamSpec: names and shapes must have the same length")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"ParamSpec: duplicate parameter names in {self.names}")
        for name, shape in zip(self.names, self.shapes, strict=True):
            if any(d < 0 for d in shape):
                raise ValueError(f"ParamSpec: negative dimension in {name}{shape}")

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ParamSpec:
        """The spec of ``module``'s trainable parameters, in registration order."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for name, param in named:
            if param.dtype != FLOAT:
                raise TypeError(
                    f"parameter {name!r} has dtype {param.dtype}; potluck trains float32 "
                    "parameters (call model.float())"
                )
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(self.numels)

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``tensors`` (validated against the spec) into a new flat float32 vector."""
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self.names]
        if missing or extra:
            raise ValueError(f"ParamSpec.flatten: missing {missing}, unexpected {extra}")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"ParamSpec.flatten: {name!r} has shape {tuple(t.shape)}, expected {shape}"
                )
            if not t.is_floating_point():
                raise TypeError(f"ParamSpec.flatten: {name!r} has non-float dtype {t.dtype}")
            parts.append(t.detach().reshape(-1).to(FLOAT))
        if not parts:
            return torch.zeros(0, dtype=FLOAT)
        return torch.cat(parts)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` shaped as the named tensors (no copy; gradients flow through)."""
        self.check(flat)
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape, n in zip(self.names, self.shapes, self.numels, strict=True):
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out

    def check(self, flat: torch.Tensor, what: str = "vector") -> None:
        """Raise a clear error unless ``flat`` is a 1-D float32 tensor of length ``size``."""
        if not isinstance(flat, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(flat).__name__}")
        if flat.dtype != FLOAT:
            raise TypeError(f"{what} must be float32, got {flat.dtype}")
        if flat.dim() != 1 or flat.numel() != self.size:
            raise ValueError(
                f"{what} has shape {tuple(flat.shape)}, expected ({self.size},) for this model"
            )

    def layer_mask(self, prefixes: tuple[str, ...] | list[str]) -> torch.Tensor:
        """Boolean (d,) mask of the parameters whose names start with any of ``prefixes``;
        no prefixes means the last layer (the module owning the last parameter). Refuses
        a mask that selects nothing or everything.

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> int(ParamSpec.from_module(net).layer_mask(()).sum())  # "1.": 2 weights, 1 bias
            3
        """
        chosen = tuple(prefixes) or (self.names[-1].rsplit(".", 1)[0] + ".",)
        parts = [
            torch.full((n,), any(name.startswith(p) for p in chosen), dtype=torch.bool)
            for name, n in zip(self.names, self.numels, strict=True)
        ]
        mask = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
        if not bool(mask.any()):
            raise ValueError(f"no parameter matches layers {chosen}; names: {self.names}")
        if bool(mask.all()):
            raise ValueError(f"layers {chosen} cover every parameter: nothing is shared")
        return mask

    def from_module_values(self, module: torch.nn.Module) -> torch.Tensor:
        """The module's current parameter values as a flat vector."""
        params = dict(module.named_parameters())
        return self.flatten({n: params[n] for n in self.names})

    def load_into(self, module: torch.nn.Module, flat: torch.Tensor) -> None:
        """Copy ``flat`` into the module's parameters in place."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in self.unflatten(flat).items():
                params[name].copy_(value)
