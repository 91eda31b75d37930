"""The cryptography of secure aggregation, all from ``cryptography`` (OpenSSL):

- X25519 key agreement (RFC 7748) and HKDF-SHA256 (RFC 5869): every symmetric key is the
  full 32-byte HKDF output of a shared secret (or of a 32-byte seed), bound to its purpose
  and the round;
- ChaCha20-Poly1305 (RFC 8439) for the encrypted shares, with associated data naming the
  round, the sender and the receiver, so a share that is altered, or replayed to another
  receiver, round or sender, fails authentication;
- masks expanded by AES-256 in counter mode: a cryptographic pseudo-random stream of whole
  vectors, uniform over ``2^32`` or ``2^64`` per coordinate (a key is used for one mask).

Private keys and seeds come from the operating system's entropy (``os.urandom``, through
``cryptography`` for the X25519 keys), in simulation as in deployment.

Example:
    >>> sk_a, pk_a = keypair()
    >>> sk_b, pk_b = keypair()
    >>> agree(sk_a, pk_b, b"mask", 3) == agree(sk_b, pk_a, b"mask", 3)
    True
    >>> key = agree(sk_a, pk_b, b"share", 3)
    >>> box = seal(key, b"a share", associated(3, 1, 2))
    >>> unseal(key, box, associated(3, 1, 2)), unseal(key, box, associated(3, 2, 1))
    (b'a share', None)
    >>> expand(key, 4, 32).dtype, expand(key, 4, 32).tolist() == expand(key, 4, 32).tolist()
    (dtype('uint32'), True)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_DOMAIN = b"potluck secagg v1 "
_ZERO_IV = bytes(16)  # every mask key is fresh: one stream per key
DTYPES: dict[int, np.dtype[Any]] = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}


def keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair (private, public), 32 raw bytes each."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def public_key(sk: bytes) -> bytes:
    """The public key of private key ``sk``."""
    return X25519PrivateKey.from_private_bytes(sk).public_key().public_bytes_raw()


def private_key(sk: bytes) -> X25519PrivateKey:
    """The X25519 private key of raw bytes ``sk`` (build it once to agree with many peers)."""
    return X25519PrivateKey.from_private_bytes(sk)


def agree(sk: bytes | X25519PrivateKey, peer: bytes, purpose: bytes, round: int) -> bytes:
    """The 32-byte key for ``purpose`` in ``round`` that ``sk``'s holder shares with the
    holder of public key ``peer``: HKDF-SHA256 of their X25519 secret. A public key of small
    order (whose secret would be all zeros) is refused."""
    key = private_key(sk) if isinstance(sk, bytes) else sk
    try:
        secret = key.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError as exc:
        raise ValueError(f"X25519 key agreement failed: {exc}") from None
    return derive(secret, purpose, round)


def derive(secret: bytes, purpose: bytes, round: int) -> bytes:
    """HKDF-SHA256 of ``secret``: the full 32-byte key for ``purpose`` in ``round``."""
    info = _DOMAIN + purpose + b" " + round.to_bytes(8, "big")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def associated(round: int, sender: int, receiver: int) -> bytes:
    """The associated data of a share: the round, its sender and its receiver."""
    return _DOMAIN + b"share " + b"".join(v.to_bytes(8, "big") for v in (round, sender, receiver))


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """``nonce || ChaCha20-Poly1305(key, nonce, plaintext, ad)`` with a random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def unseal(key: bytes, box: bytes, ad: bytes) -> bytes | None:
    """The plaintext of ``box``, or ``None`` if it fails authentication under ``ad``."""
    if len(box) < NONCE_BYTES + TAG_BYTES:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(box[:NONCE_BYTES], box[NONCE_BYTES:], ad)
    except InvalidTag:
        return None


def expand(key: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudo-random integers modulo ``2^bits`` (32 or 64): the AES-256-CTR
    stream of ``key``."""
    dtype = DTYPES[bits]
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize))
    return np.frombuffer(stream, dtype=dtype)
