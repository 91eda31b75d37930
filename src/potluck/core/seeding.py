"""One run seed, many named child generators.

Every random choice in a run (partition, sampling, init, batch order, noise, dropout) draws
from a generator derived from the run seed and a path of names and integers, e.g.
``("batch", round, client_id)``. Derivation is stateless: the same path always yields the
same stream, independent of what else was drawn before, so runs are reproducible, engines
agree, and a resumed run continues exactly.

Example:
    >>> seeds = Seeds(42)
    >>> a = seeds.numpy("sampling", 3).integers(0, 100, 4)
    >>> b = Seeds(42).numpy("sampling", 3).integers(0, 100, 4)
    >>> bool((a == b).all())
    True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

Key = str | int


def _encode(path: tuple[Key, ...]) -> list[int]:
    """Map a path of names and non-negative ints to 32-bit words, stably across processes."""
    words: list[int] = []
    for part in path:
        if isinstance(part, bool) or not isinstance(part, (str, int, np.integer)):
            raise TypeError(f"seed path parts must be str or int, got {type(part).__name__}")
        if isinstance(part, str):
            digest = hashlib.blake2b(part.encode(), digest_size=8).digest()
            words.extend(int.from_bytes(digest[i : i + 4], "little") for i in (0, 4))
        else:
            value = int(part)
            if value < 0:
                raise ValueError(f"seed path integers must be >= 0, got {value}")
            words.extend((value & 0xFFFFFFFF, value >> 32 & 0xFFFFFFFF))
    return words


@dataclass(frozen=True)
class Seeds:
    """The run seed and a factory of named, independent child generators."""

    seed: int

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def sequence(self, *path: Key) -> np.random.SeedSequence:
        """The ``SeedSequence`` for ``path`` (128 bits of entropy from seed and path)."""
        return np.random.SeedSequence(entropy=self.seed, spawn_key=tuple(_encode(path)))

    def numpy(self, *path: Key) -> np.random.Generator:
        """A NumPy generator (PCG64) for ``path``."""
        return np.random.default_rng(self.sequence(*path))

    def integer(self, *path: Key) -> int:
        """A 63-bit integer seed for ``path`` (for libraries that take an int seed)."""
        return int(self.sequence(*path).generate_state(2, np.uint64)[0] >> np.uint64(1))

    def torch(self, *path: Key) -> torch.Generator:
        """A CPU ``torch.Generator`` for ``path``."""
        import torch

        gen = torch.Generator()
        gen.manual_seed(self.integer(*path))
        return gen
