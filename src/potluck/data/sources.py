"""Dataset sources: in-memory arrays with a train set and a held-out centralised test set.

Three sources ship with potluck: ``fashion_mnist`` (Xiao et al. 2017, read from local IDX
files), ``digits`` (the UCI handwritten digits bundled with scikit-learn) and ``synthetic``
(Synthetic(alpha, beta) of Li et al. 2020, generated on the fly).

Example:
    >>> src = load_source("digits", seed=0)
    >>> src.train.x.shape, src.test.x.shape, src.num_classes
    ((1437, 64), (360, 64), 10)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potluck.data.options import check_options

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MD5",
    "FASHION_MNIST_SHA256",
    "ArrayDataset",
    "DataSource",
    "available_sources",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "load_source",
    "verify_checksum",
]


@dataclass(frozen=True)
class ArrayDataset:
    """Examples ``x`` (``(n, *feature_shape)``) with int64 labels ``y`` (``(n,)``).

    ``x`` holds float32 features; or int64/int32 integer inputs (token ids, category codes,
    for an embedding layer), which ``features`` returns unchanged; or, with
    ``decode = (scale, shift)``, uint8 codes whose features are ``x * scale + shift`` in
    float32 (a quarter of the memory: Fashion-MNIST's training images take 47 MB instead of
    188 MB). Read features with ``features(idx)``. ``groups`` optionally holds a natural
    client key per example (writer, user, device).

    Example:
        >>> ds = ArrayDataset(np.zeros((3, 2), np.float32), np.array([0, 1, 1]))
        >>> len(ds), len(ds.subset(np.array([0, 2])))
        (3, 2)
        >>> codes = ArrayDataset(np.array([[0], [255]], np.uint8), np.array([0, 1]), None,
        ...                      decode=(1 / 255, -0.5))
        >>> codes.features().ravel().tolist()
        [-0.5, 0.5]
        >>> tokens = ArrayDataset(np.array([[5, 7], [7, 2]]), np.array([2, 0]))
        >>> tokens.features(np.array([1])).tolist(), tokens.integer_features
        ([[7, 2]], True)
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None
    decode: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        allowed = _X_DTYPES if self.decode is None else (np.dtype(np.uint8),)
        if not isinstance(self.x, np.ndarray) or self.x.dtype not in allowed or self.x.ndim < 1:
            what = (
                "float32 array (or an int64/int32 array of integer inputs)"
                if self.decode is None
                else "uint8 array (with decode)"
            )
            raise ValueError(f"ArrayDataset.x must be a {what} (n, ...), got {_desc(self.x)}")
        n = len(self.x)
        _check_int_vector("ArrayDataset.y", self.y, n)
        if self.groups is not None:
            _check_int_vector("ArrayDataset.groups", self.groups, n)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def integer_features(self) -> bool:
        """Whether ``features()`` gives integer inputs (token ids) rather than float32.

        Example:
            >>> ArrayDataset(np.zeros((1, 2), np.int32), np.array([0])).integer_features
            True
        """
        return self.decode is None and self.x.dtype.kind == "i"

    def features(self, idx: np.ndarray | slice | None = None) -> np.ndarray:
        """Features of the examples at ``idx`` (all by default): float32, decoded if stored as
        codes, or the integer inputs unchanged; a new array only when decoding (else a view
        or NumPy's gather)."""
        x = self.x if idx is None else self.x[idx]
        if self.decode is None:
            return x
        scale, shift = self.decode
        out = np.multiply(x, np.float32(scale), dtype=np.float32)
        out += np.float32(shift)
        return out

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """The examples at positions ``idx`` (a copy)."""
        groups = None if self.groups is None else self.groups[idx]
        return ArrayDataset(self.x[idx], self.y[idx], groups, self.decode)


_X_DTYPES = (np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int32))


def _desc(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def _check_int_vector(name: str, a: object, n: int) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D int64 array, got {_desc(a)}")
    if len(a) != n:
        raise ValueError(f"{name} has {len(a)} entries but x has {n} examples")


@dataclass(frozen=True)
class DataSource:
    """A named dataset: ``train``, a held-out centralised ``test`` and its label space.

    Example:
        >>> src = load_source("synthetic", num_clients=3)
        >>> src.input_shape, src.num_classes
        ((60,), 10)
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.train.integer_features != self.test.integer_features:
            kinds = {True: "integer", False: "float"}
            raise ValueError(
                f"{self.name}: train inputs are {kinds[self.train.integer_features]} but test "
                f"inputs are {kinds[self.test.integer_features]}; use one kind for both"
            )
        for split in ("train", "test"):
            ds: ArrayDataset = getattr(self, split)
            if ds.x.shape[1:] != tuple(self.input_shape):
                raise ValueError(
                    f"{self.name}: {split}.x feature shape {ds.x.shape[1:]} != "
                    f"input_shape {tuple(self.input_shape)}"
                )
            if len(ds) and (ds.y.min() < 0 or ds.y.max() >= self.num_classes):
                raise ValueError(
                    f"{self.name}: {split}.y labels must lie in [0, {self.num_classes}), "
                    f"got [{ds.y.min()}, {ds.y.max()}]"
                )


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
#: MD5 of the gzip archives as published by Zalando (github.com/zalandoresearch/fashion-mnist).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
#: SHA-256 of the decompressed IDX payloads. The Debian package ``dataset-fashion-mnist``
#: re-compresses the archives, so its ``.gz`` files differ from the published MD5s while the
#: payloads are identical; loading therefore verifies payloads, which is robust to
#: re-compression (the decompressed MD5s, f4a8712d..., 9018921c..., 8181f547..., 15d48437...,
#: agree with those published alongside torchvision's loader).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_IDX_UBYTE = 0x08


def verify_checksum(path: Path, expected: str, algorithm: str = "md5") -> None:
    """Raise ``ValueError`` unless the file at ``path`` hashes to ``expected``.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "f"
        >>> _ = p.write_bytes(b"abc")
        >>> verify_checksum(p, "900150983cd24fb0d6963f7d28e17f72")
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise ValueError(
            f"checksum mismatch for {path}: {algorithm} is {digest.hexdigest()}, expected "
            f"{expected}; the file is corrupt or incomplete, delete it and fetch it again"
        )


def _fashion_candidates(path: str | os.PathLike[str] | None) -> list[Path]:
    if path is not None:
        return [Path(path), Path(path) / "fashion-mnist"]
    env = os.environ.get("POTLUCK_DATA")
    roots = [Path(env), Path(env) / "fashion-mnist"] if env else []
    return [*roots, DEBIAN_FASHION_MNIST_DIR]


def find_fashion_mnist(path: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the four Fashion-MNIST IDX ``.gz`` files.

    Searched in order: ``path`` (or its ``fashion-mnist/`` subdirectory) when given, and
    otherwise ``$POTLUCK_DATA`` (or ``$POTLUCK_DATA/fashion-mnist``), then the Debian package
    location ``/usr/share/datasets/fashion-mnist``. An explicit ``path`` is authoritative:
    nothing else is searched, so a typo is reported rather than silently ignored.

    Example:
        >>> find_fashion_mnist()  # doctest: +SKIP
        PosixPath('/usr/share/datasets/fashion-mnist')
    """
    candidates = _fashion_candidates(path)
    for cand in candidates:
        if all((cand / f).is_file() for f in FASHION_MNIST_FILES):
            return cand
    searched = "\n".join(f"  - {c}" for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST files ({', '.join(FASHION_MNIST_FILES)}) not found; searched:\n"
        f"{searched}\nFix one of: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu); "
        "set POTLUCK_DATA to a directory holding the files; pass path=...; or download them "
        "with potluck.data.download_fashion_mnist(dest) and set POTLUCK_DATA=dest."
    )


def download_fashion_mnist(dest: Path) -> Path:
    """Download the four Fashion-MNIST archives into ``dest`` and verify their MD5s.

    Files already present with the right checksum are kept. Each download goes to a temporary
    file that is renamed into place only after verification, so ``dest`` never holds a
    partial archive. Returns ``dest``.

    Example:
        >>> download_fashion_mnist(Path("~/data/fashion-mnist").expanduser())  # doctest: +SKIP
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = dest / name
        if target.is_file():
            try:
                verify_checksum(target, FASHION_MNIST_MD5[name])
                continue
            except ValueError:
                target.unlink()
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(FASHION_MNIST_URL + name, timeout=60) as resp,
            ):
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
            verify_checksum(Path(tmp), FASHION_MNIST_MD5[name])
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def _read_payload(path: Path) -> bytes:
    raw = path.read_bytes()
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{path}: not a complete gzip file ({exc})") from exc


def _parse_idx(data: bytes, ndim: int, source: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions (LeCun's MNIST format)."""
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise ValueError(
            f"{source}: bad IDX magic {data[:4].hex()}, expected 0000{_IDX_UBYTE:02x}{ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise ValueError(
            f"{source}: IDX payload has {len(data) - header} bytes, dims {dims} need {expected}"
            " (file truncated or corrupt)"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_idx(path: Path, ndim: int, verify: bool) -> np.ndarray:
    data = _read_payload(path)
    arr = _parse_idx(data, ndim, path)
    if verify:
        got = hashlib.sha256(data).hexdigest()
        if got != FASHION_MNIST_SHA256[path.name]:
            raise ValueError(
                f"{path}: decompressed sha256 {got} does not match Fashion-MNIST "
                f"({FASHION_MNIST_SHA256[path.name]}); the file is corrupt or not Fashion-MNIST "
                "(pass verify=False to load it anyway)"
            )
    return arr


def _file_key(directory: Path) -> tuple[tuple[str, int, int], ...]:
    key = []
    for name in FASHION_MNIST_FILES:
        real = (directory / name).resolve()
        st = real.stat()
        key.append((str(real), st.st_size, st.st_mtime_ns))
    return tuple(key)


_IDX_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def cache_dir() -> Path | None:
    """Where decoded datasets are kept between runs: ``$POTLUCK_CACHE``, else
    ``$XDG_CACHE_HOME/potluck``, else ``~/.cache/potluck``; ``None`` (no cache) when
    ``POTLUCK_CACHE`` is ``off`` or empty.

    Example:
        >>> import os
        >>> os.environ["POTLUCK_CACHE"] = "off"
        >>> cache_dir() is None
        True
        >>> del os.environ["POTLUCK_CACHE"]
    """
    chosen = os.environ.get("POTLUCK_CACHE")
    if chosen is not None:
        return None if chosen.strip() in ("", "off") else Path(chosen)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "potluck"


def _cache_entry(key: tuple[tuple[str, int, int], ...]) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
    return root / f"fashion_mnist-{digest}"


def _cached_arrays(entry: Path | None) -> tuple[np.ndarray, ...] | None:
    """The decoded arrays of a cache entry, memory-mapped read-only, or ``None`` when it
    is missing or unreadable (then the files are decoded again and the entry rewritten)."""
    if entry is None or not entry.is_dir():
        return None
    try:
        arrays = tuple(
            np.load(entry / f"{n}.npy", mmap_mode="r").view(np.ndarray) for n in _IDX_ARRAYS
        )
    except (OSError, ValueError):
        return None
    shapes_ok = all(a.dtype == np.uint8 for a in arrays) and [a.ndim for a in arrays] == [
        3,
        1,
        3,
        1,
    ]
    return arrays if shapes_ok else None


def _store_arrays(entry: Path | None, arrays: tuple[np.ndarray, ...]) -> None:
    """Write a cache entry atomically (a temporary directory renamed into place); a cache
    that cannot be written is skipped, never an error."""
    if entry is None:
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError:
        return
    try:
        for name, arr in zip(_IDX_ARRAYS, arrays, strict=True):
            np.save(tmp / f"{name}.npy", arr)
        shutil.rmtree(entry, ignore_errors=True)  # an unreadable entry, if any
        os.replace(tmp, entry)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=4)
def _fashion_arrays(
    key: tuple[tuple[str, int, int], ...], verify: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw uint8 images and labels (read-only), cached per resolved file identity: in this
    process, and decoded on disk (``cache_dir``) once they have passed the checksums, which
    saves the 0.45 s of decompressing and hashing at every later start."""
    paths, entry = [Path(p) for p, _, _ in key], _cache_entry(key)
    cached = _cached_arrays(entry)
    if cached is not None:
        x_tr, y_tr, x_te, y_te = cached
    else:
        x_tr, y_tr, x_te, y_te = (
            _read_idx(p, nd, verify) for p, nd in zip(paths, (3, 1, 3, 1), strict=True)
        )
        if verify:  # only what matched the published checksums is kept
            _store_arrays(entry, (x_tr, y_tr, x_te, y_te))
    for x, y, p in ((x_tr, y_tr, paths[0]), (x_te, y_te, paths[2])):
        if len(x) != len(y):
            raise ValueError(f"{p}: {len(x)} images but {len(y)} labels")
        if len(y) and y.max() > 9:
            raise ValueError(f"{p}: labels must lie in 0..9, got max {y.max()}")
    return x_tr, y_tr, x_te, y_te


FASHION_MNIST_DECODE = (1 / (255 * FASHION_MNIST_STD), -FASHION_MNIST_MEAN / FASHION_MNIST_STD)


def _load_fashion_mnist(path: str | None, seed: int, verify: bool = True) -> DataSource:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747), 10 classes of 28x28.

    Pixels are scaled to [0, 1] and standardised with mean 0.2860 and std 0.3530 when read
    (the images stay uint8 in memory: ``ArrayDataset.decode``).
    """
    del seed  # fixed train/test split
    x_tr, y_tr, x_te, y_te = _fashion_arrays(_file_key(find_fashion_mnist(path)), verify)
    train = ArrayDataset(x_tr[:, None], y_tr.astype(np.int64), None, FASHION_MNIST_DECODE)
    test = ArrayDataset(x_te[:, None], y_te.astype(np.int64), None, FASHION_MNIST_DECODE)
    return DataSource("fashion_mnist", train, test, 10, (1, 28, 28))


# --------------------------------------------------------------------------- digits


def _load_digits(path: str | None, seed: int) -> DataSource:
    """UCI optical handwritten digits (Alpaydin & Kaynak 1998), 8x8 as 64, from the copy
    scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, read directly: importing
    scikit-learn costs about 2 s, the file 30 ms) or from ``path`` (the same CSV format).

    Pixels are divided by 16; a stratified 80/20 train/test split uses ``seed``.
    """
    csv = Path(path) if path else _sklearn_data("digits.csv.gz")
    table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / 16.0, table[:, -1].astype(np.int64)
    test = stratified_test_indices(y, 0.2, np.random.default_rng(seed))
    train = np.setdiff1d(np.arange(len(y)), test)
    return DataSource(
        "digits", ArrayDataset(x[train], y[train]), ArrayDataset(x[test], y[test]), 10, (64,)
    )


def _sklearn_data(name: str) -> Path:
    """A data file bundled with scikit-learn, found without importing it."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name}: scikit-learn, which ships it, is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: not in this scikit-learn installation")
    return path


def stratified_test_indices(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a test split of ``ceil(fraction * n)`` examples (as scikit-learn's
    ``train_test_split``) spread over the classes in proportion to their sizes (largest
    remainders get the leftover places), drawn uniformly within each class.

    Example:
        >>> y = np.array([0] * 10 + [1] * 5)
        >>> np.bincount(y[stratified_test_indices(y, 0.2, np.random.default_rng(0))]).tolist()
        [2, 1]
    """
    classes, sizes = np.unique(y, return_counts=True)
    exact = fraction * sizes
    counts = np.floor(exact).astype(np.int64)
    leftover = math.ceil(fraction * len(y) - 1e-9) - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    picks = [
        rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, counts, strict=True)
    ]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- synthetic


def _load_synthetic(
    path: str | None,
    seed: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
) -> DataSource:
    """Synthetic(alpha, beta) of Li et al. 2020, "Federated Optimization in Heterogeneous
    Networks" (FedProx, MLSys), following the reference generator of FedProx/LEAF.

    Client k has ``lognormal(4, 2) + 50`` samples; ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``,
    ``W_k ~ N(u_k, 1)``, ``b_k ~ N(u_k, 1)``, ``v_k ~ N(B_k, 1)``, ``x ~ N(v_k, Sigma)`` with
    ``Sigma = diag(j^-1.2)`` and ``y = argmax(W_k^T x + b_k)``. ``alpha`` controls how much the
    local models differ, ``beta`` how much the local inputs differ. With ``iid=True`` all
    clients share one ``W, b ~ N(0, 1)`` and ``v_k = 0`` (the reference IID variant).
    ``groups`` holds the client index; 20% of each client's samples form the test set.
    """
    del path  # generated
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    for name, value, low in (("num_clients", num_clients, 1), ("dim", dim, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    mean_w = rng.normal(0, alpha, num_clients)
    b_prior = rng.normal(0, beta, num_clients)
    sd = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of j^-1.2
    if iid:
        mean_x = np.zeros((num_clients, dim))
        w_shared = rng.normal(0, 1, (dim, num_classes))
        b_shared = rng.normal(0, 1, num_classes)
    else:
        mean_x = rng.normal(b_prior[:, None], 1, (num_clients, dim))
    xs, ys = [], []
    for k in range(num_clients):
        if iid:
            w, b = w_shared, b_shared
        else:
            w = rng.normal(mean_w[k], 1, (dim, num_classes))
            b = rng.normal(mean_w[k], 1, num_classes)
        x = mean_x[k] + rng.standard_normal((int(sizes[k]), dim)) * sd
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1))  # argmax of softmax == argmax of logits
    groups = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
    data = ArrayDataset(np.concatenate(xs), np.concatenate(ys).astype(np.int64), groups)
    is_test = np.zeros(len(data), bool)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for k in range(num_clients):
        n_test = int(sizes[k]) // 5
        is_test[starts[k] + rng.permutation(int(sizes[k]))[:n_test]] = True
    train, test = data.subset(np.flatnonzero(~is_test)), data.subset(np.flatnonzero(is_test))
    return DataSource("synthetic", train, test, num_classes, (dim,))


# --------------------------------------------------------------------------- registry

_SOURCES: dict[str, Callable[..., DataSource]] = {
    "digits": _load_digits,
    "fashion_mnist": _load_fashion_mnist,
    "synthetic": _load_synthetic,
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits": (),
    "fashion_mnist": ("verify",),
    "synthetic": ("alpha", "beta", "num_clients", "dim", "num_classes", "iid"),
}


def available_sources() -> list[str]:
    """Names accepted by :func:`load_source`.

    Example:
        >>> available_sources()
        ['digits', 'fashion_mnist', 'synthetic']
    """
    return sorted(_SOURCES)


def load_source(name: str, *, path: str | None = None, seed: int = 0, **options: Any) -> DataSource:
    """Load dataset ``name`` (see :func:`available_sources`).

    ``path`` points at local files (Fashion-MNIST), ``seed`` fixes any random split or
    generation, and ``options`` are source specific: ``verify`` (fashion_mnist: check the
    payload SHA-256, default True); ``alpha, beta, num_clients, dim, num_classes, iid``
    (synthetic).

    Example:
        >>> src = load_source("synthetic", seed=1, alpha=0.5, beta=0.5, num_clients=5)
        >>> int(src.train.groups.max()) + 1
        5
    """
    key = name.lower().replace("-", "_")
    if key not in _SOURCES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_sources())}")
    check_options(options, _OPTIONS[key], f"dataset {key!r}")
    return _SOURCES[key](path, seed, **options)
