"""CKKS (Cheon, Kim, Kim and Song 2017, "Homomorphic Encryption for Arithmetic of Approximate
Numbers", ASIACRYPT) through TenSEAL (Benaissa et al. 2021, Microsoft SEAL underneath): the
parameters and their security, a round's key pair, an update packed into ciphertexts, their
homomorphic sum and its decryption.

*Parameters.* ``poly_modulus_degree`` ``N`` (a ciphertext holds ``N / 2`` real slots), the
bit sizes of the coefficient modulus primes (the last is SEAL's special prime, the others hold
the data) and the scale ``2^scale_bits`` of the fixed-point encoding. 128-bit security bounds
the modulus: at most 27, 54, 109, 218, 438 or 881 bits for ``N`` = 1024 ... 32768 (the
Homomorphic Encryption Standard, Albrecht et al. 2018, uniform ternary secret; SEAL enforces
the same table). The defaults, ``N = 8192`` with primes of (60, 60) bits and scale ``2^50``,
use 120 of the 218 bits: each slot of a sum of ``n`` updates is exact to about ``n * 2^-30``
(``Parameters.error_bound``, from the fresh-encryption noise bound of Cheon et al., Lemma 1;
measured: about ``2^-37`` per ciphertext), and a slot's sum may reach ``2^(60 - 50 - 2) =
256`` in magnitude (``check_capacity``).

*Rows.* An update of ``m`` values becomes ``ceil(m / (N / 2))`` ciphertexts, serialised and
packed into one ``uint8`` vector of fixed length: a header (``b"CKKS"``, the number of
ciphertexts, the bytes kept for each, the SHA-256 fingerprint of the public context that
encrypted them) and each ciphertext after its length. Rows of one round add up slot-wise
(``add``), into a row of the same form.

Example (the layout, which needs no TenSEAL):
    >>> p = Parameters()
    >>> p.slots, p.ciphertexts(10_002), p.chunk_bytes, p.row_length(10_002)
    (4096, 3, 131584, 394808)
    >>> Parameters(4096, (60, 60)).check()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ckks: coefficient modulus primes of 120 bits at poly_modulus_degree 4096 are ...
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from potluck.core.message import MessageError
from potluck.secagg import crypto

# the largest coefficient modulus (bits) with 128-bit security per poly_modulus_degree (HE
# Standard, Albrecht et al. 2018, Table 1, uniform ternary secret; SEAL's CoeffModulus table)
MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAGIC = b"CKKS"
HEADER = struct.Struct("<4sII32s")  # magic, ciphertexts, bytes kept per ciphertext, fingerprint
LENGTH = struct.Struct("<I")
SIGMA = 3.2  # SEAL's error standard deviation
_SLACK = 512  # serialisation overhead allowed beyond a ciphertext's raw data (measured: 145)
EXTRA = "he"  # pip install 'potluck[he]'
_PROTOC = "grpc_tools._protoc_compiler"


def tenseal() -> Any:
    """The ``tenseal`` module, or an error naming the optional extra that installs it.

    Refused, with the reason, in a process that has loaded grpcio-tools' protoc compiler
    (``grpc.protos``): each carries its own protobuf C++ runtime, and TenSEAL's then aborts the
    whole process as it loads (seen with grpcio-tools 1.85).
    """
    if "tenseal" not in sys.modules and _PROTOC in sys.modules:
        raise RuntimeError(
            f"TenSEAL cannot load in a process that has loaded {_PROTOC} (grpc.protos or "
            "grpc_tools.protoc): its protobuf runtime would abort the process; compile protos "
            "in a child process, or load TenSEAL first"
        )
    try:
        import tenseal as ts
        import tenseal.sealapi  # the bindings that read a context's moduli
    except ImportError:
        raise ImportError(
            "homomorphic aggregation (transform ckks) needs TenSEAL: pip install "
            f"'potluck[{EXTRA}]' (or scripts/setup.sh --he)"
        ) from None
    return ts


@dataclass(frozen=True)
class Parameters:
    """CKKS settings; ``where`` names them in errors (the transform's namespace)."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 50
    where: str = "ckks"

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives under (all primes but the special)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def chunk_bytes(self) -> int:
        """Bytes kept for one serialised ciphertext: two polynomials of ``N`` 64-bit words per
        data prime, and the serialisation's headers."""
        primes = len(self.coeff_mod_bit_sizes) - 1
        return 2 * self.poly_modulus_degree * primes * 8 + _SLACK

    def ciphertexts(self, length: int) -> int:
        return math.ceil(length / self.slots)

    def row_length(self, length: int) -> int:
        """The bytes of a row that encrypts ``length`` values."""
        return HEADER.size + self.ciphertexts(length) * (LENGTH.size + self.chunk_bytes)

    def check(self) -> None:
        """Refuse settings that are not 128-bit secure or leave no room for a sum."""
        n, bits, where = self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.where
        if n not in MAX_BITS_128:
            raise ValueError(
                f"{where}: poly_modulus_degree must be one of {sorted(MAX_BITS_128)}, got {n}"
            )
        if len(bits) < 2 or any(not 20 <= b <= 60 for b in bits):
            raise ValueError(
                f"{where}: coeff_mod_bit_sizes must be at least two primes of 20 to 60 bits "
                f"(the data primes, then the special one), got {list(bits)}"
            )
        if sum(bits) > MAX_BITS_128[n]:
            raise ValueError(
                f"{where}: coefficient modulus primes of {sum(bits)} bits at "
                f"poly_modulus_degree {n} are not 128-bit secure (at most {MAX_BITS_128[n]} "
                "bits): raise poly_modulus_degree or use fewer or smaller primes"
            )
        if not 20 <= self.scale_bits <= self.data_bits - 4:
            raise ValueError(
                f"{where}: scale_bits must be in [20, {self.data_bits - 4}] (the data primes' "
                f"{self.data_bits} bits less room for a sum of a few clients), got "
                f"{self.scale_bits}"
            )

    @property
    def capacity(self) -> int:
        """The largest magnitude a slot of a sum may reach: ``2^(data_bits - scale_bits - 2)``
        (decryption needs it below ``2^(data_bits - scale_bits - 1)``; a factor 2 spare)."""
        return 1 << (self.data_bits - self.scale_bits - 2)

    def check_capacity(self, n: int) -> None:
        """Refuse a cohort of ``n`` whose sum could overflow the modulus (each slot of an
        update is in [-1, 1], its count slot 1), naming the setting to change.

        Example:
            >>> Parameters(where="transforms.0.ckks").check_capacity(300)
            ... # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: transforms.0.ckks: 300 clients can sum to 300 in a slot, above ...
        """
        if n < self.capacity:
            return
        fits = self.data_bits - 2 - math.ceil(math.log2(n + 1))
        raise ValueError(
            f"{self.where}: {n} clients can sum to {n} in a slot, above the {self.capacity} "
            f"that {self.data_bits} data bits hold at scale 2^{self.scale_bits}: lower "
            f"scale_bits to at most {fits}, add a data prime to coeff_mod_bit_sizes, or sample "
            "fewer clients per round"
        )

    def error_bound(self, n: int) -> float:
        """A bound on each slot's CKKS error in a sum of ``n`` fresh ciphertexts: ``n`` times
        the fresh-encryption bound ``8 sqrt(2) sigma N + 6 sigma sqrt(N) + 16 sigma sqrt(h N)``
        (Cheon et al. 2017, Lemma 1, with ``h = N``) plus the encoding's rounding ``N``, over
        the scale.

        Example:
            >>> f"{Parameters().error_bound(10):.1e}"
            '6.4e-09'
        """
        big_n = self.poly_modulus_degree
        fresh = SIGMA * (8 * math.sqrt(2) * big_n + 6 * math.sqrt(big_n) + 16 * big_n) + big_n
        return n * fresh / 2.0**self.scale_bits

    def matches(self, context: Any) -> bool:
        """Whether a TenSEAL ``context`` was made with these parameters."""
        data = context.seal_context().data.key_context_data()
        parms = data.parms()
        bits = tuple(int(m.bit_count()) for m in parms.coeff_modulus())
        return (
            int(parms.poly_modulus_degree()) == self.poly_modulus_degree
            and bits == tuple(self.coeff_mod_bit_sizes)
            and context.global_scale == 2.0**self.scale_bits
        )


# ---- keys -----------------------------------------------------------------------------------


def keygen(params: Parameters) -> tuple[bytes, bytes]:
    """A fresh key pair: the serialised context with the secret key (the key holder's) and
    the public context (the public key alone: no secret, relinearisation or Galois keys)."""
    ts = tenseal()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        n_threads=1,
    )
    context.global_scale = 2.0**params.scale_bits
    keep = {"save_galois_keys": False, "save_relin_keys": False}
    secret = context.serialize(save_public_key=True, save_secret_key=True, **keep)
    public = context.serialize(save_public_key=True, save_secret_key=False, **keep)
    return secret, public


def load(blob: bytes, params: Parameters | None, who: str, secret: bool = False) -> Any:
    """A serialised context, refused unless it has these parameters (if given) and holds the
    secret key exactly when ``secret`` (a server must never load one that does)."""
    ts = tenseal()
    try:
        context = ts.context_from(blob, n_threads=1)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MessageError(f"{who}: not a TenSEAL context ({exc})") from None
    if context.has_secret_key() != secret:
        holds = "holds a secret key" if context.has_secret_key() else "holds no secret key"
        raise MessageError(f"{who}: the context {holds}; refused")
    if params is not None and not params.matches(context):
        raise MessageError(f"{who}: the context's CKKS parameters are not {params}")
    return context


def fingerprint(public: bytes) -> bytes:
    """The SHA-256 digest that names a public context (and so a round's key)."""
    return hashlib.sha256(public).digest()


# ---- rows -------------------------------------------------------------------------------------


def encrypt(context: Any, values: np.ndarray, params: Parameters, key: bytes) -> np.ndarray:
    """``values`` (float64) encrypted under ``context``'s public key, ``N / 2`` slots per
    ciphertext, packed in a row (``key``: the context's fingerprint)."""
    ts = tenseal()
    chunks = [values[i : i + params.slots] for i in range(0, len(values), params.slots)]
    blobs = [ts.ckks_vector(context, c.tolist()).serialize() for c in chunks]
    return _pack(blobs, params.chunk_bytes, key)


@dataclass(frozen=True)
class Row:
    """A checked row: its fingerprint, the bytes kept per ciphertext, and where each
    ciphertext lies in ``data`` (start, size)."""

    key: bytes
    kept: int
    data: np.ndarray
    spans: tuple[tuple[int, int], ...]

    @property
    def ciphertexts(self) -> list[bytes]:
        return [self.data[start : start + size].tobytes() for start, size in self.spans]


def unpack(row: np.ndarray, who: str) -> Row:
    """A row's fingerprint and where its serialised ciphertexts lie; a malformed row is
    refused."""
    if row.dtype != np.uint8 or row.ndim != 1 or row.size < HEADER.size:
        raise MessageError(f"{who}: not a row of CKKS ciphertexts")
    magic, count, kept, key = HEADER.unpack_from(row.data, 0)
    if magic != MAGIC or row.size != HEADER.size + count * (LENGTH.size + kept):
        raise MessageError(f"{who}: not a row of CKKS ciphertexts (header {magic!r}, {count})")
    spans, offset = [], HEADER.size
    for _ in range(count):
        (size,) = LENGTH.unpack_from(row.data, offset)
        if size > kept:
            raise MessageError(f"{who}: a ciphertext of {size} bytes in a slot of {kept}")
        spans.append((offset + LENGTH.size, size))
        offset += LENGTH.size + kept
    return Row(key, kept, row, tuple(spans))


def add(context: Any, rows: np.ndarray, key: bytes, who: str) -> np.ndarray:
    """The slot-wise homomorphic sum of ``rows`` (K, L), each encrypted under ``context``'s
    public key (fingerprint ``key``): a row of the same layout."""
    ts = tenseal()
    if rows.ndim != 2 or not len(rows):
        raise MessageError(f"{who}: expected a (K, L) stack of rows, got {rows.shape}")
    first = unpack(rows[0], who)
    sums: list[Any] = []
    for i in range(len(rows)):
        row = first if i == 0 else unpack(rows[i], who)
        if row.key != key or len(row.spans) != len(first.spans):
            raise MessageError(f"{who}: a row not encrypted under the round's key and layout")
        vectors = [_vector(ts, context, c, who) for c in row.ciphertexts]
        if not sums:
            sums = vectors
            continue
        for acc, v in zip(sums, vectors, strict=True):
            acc.add_(v)
    return _pack([s.serialize() for s in sums], first.kept, key)


def decrypt(context: Any, row: np.ndarray, length: int, who: str) -> np.ndarray:
    """The ``length`` values (float64) a row encrypts, with the secret key of ``context``."""
    ts = tenseal()
    cts = unpack(row, who).ciphertexts
    values = np.concatenate([np.array(_vector(ts, context, c, who).decrypt()) for c in cts])
    if values.size != length:
        raise MessageError(f"{who}: the row holds {values.size} values, not {length}")
    return values


def gaussian(size: int, std: float) -> np.ndarray:
    """``size`` Gaussian draws of ``std`` from the operating system's entropy (Box-Muller
    over an AES-256-CTR stream keyed by ``os.urandom``): noise no one else can predict."""
    bits = crypto.expand(os.urandom(crypto.KEY_BYTES), 2 * size, 64) >> np.uint64(11)
    u = (bits.astype(np.float64) + 1.0) / 2.0**53  # in (0, 1]
    return std * np.sqrt(-2.0 * np.log(u[:size])) * np.cos(2.0 * np.pi * u[size:])


def _vector(ts: Any, context: Any, blob: bytes, who: str) -> Any:
    try:
        return ts.ckks_vector_from(context, blob)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MessageError(f"{who}: a ciphertext that is not for this context ({exc})") from None


def _pack(blobs: Sequence[bytes], kept: int, key: bytes) -> np.ndarray:
    buf = bytearray(HEADER.size + len(blobs) * (LENGTH.size + kept))
    HEADER.pack_into(buf, 0, MAGIC, len(blobs), kept, key)
    offset = HEADER.size
    for blob in blobs:
        if len(blob) > kept:
            raise RuntimeError(
                f"a serialised ciphertext of {len(blob)} bytes exceeds the {kept} kept for it "
                "(a TenSEAL build that serialises differently?)"
            )
        LENGTH.pack_into(buf, offset, len(blob))
        buf[offset + LENGTH.size : offset + LENGTH.size + len(blob)] = blob
        offset += LENGTH.size + kept
    return np.frombuffer(buf, dtype=np.uint8)
