"""Dataset sources: Fashion-MNIST IDX loading, digits, Synthetic(alpha, beta)."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from potluck.data import sources
from potluck.data.sources import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_MD5,
    FASHION_MNIST_SHA256,
    ArrayDataset,
    DataSource,
    available_sources,
    find_fashion_mnist,
    load_source,
    verify_checksum,
)

DEBIAN = sources.DEBIAN_FASHION_MNIST_DIR
needs_fmnist = pytest.mark.skipif(
    not all((DEBIAN / f).is_file() for f in FASHION_MNIST_FILES),
    reason="apt-get install dataset-fashion-mnist",
)


def write_idx(path: Path, arr: np.ndarray, *, truncate: int = 0) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload[: len(payload) - truncate]))


def write_fake_fmnist(directory: Path, n: int = 12, **trunc: int) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        arr = rng.integers(0, 256, (n, 28, 28)) if "images" in name else np.arange(n) % 10
        write_idx(directory / name, arr, truncate=trunc.get(name.split("-")[1], 0))


@pytest.fixture
def no_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.delenv("POTLUCK_DATA", raising=False)


def test_available_sources_and_unknown_name() -> None:
    assert available_sources() == ["digits", "fashion_mnist", "synthetic"]
    with pytest.raises(ValueError, match="available: digits, fashion_mnist, synthetic"):
        load_source("mnist")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gamma'\].*allowed: alpha"):
        load_source("synthetic", gamma=1)


@needs_fmnist
def test_fashion_mnist_from_debian_location(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POTLUCK_DATA", raising=False)
    assert find_fashion_mnist() == DEBIAN
    src = load_source("fashion_mnist")
    assert src.train.x.shape == (60000, 1, 28, 28) and src.test.x.shape == (10000, 1, 28, 28)
    assert src.train.x.dtype == np.uint8 and src.train.y.dtype == np.int64  # stored compact
    assert (np.bincount(src.train.y) == 6000).all() and (np.bincount(src.test.y) == 1000).all()
    assert src.num_classes == 10 and src.input_shape == (1, 28, 28)
    # Standardised with the dataset's own mean/std when read.
    x = src.train.features()
    assert x.dtype == np.float32 and x.shape == (60000, 1, 28, 28)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert x.flags.writeable  # fresh arrays; the shared cache holds raw bytes
    rows = np.array([5, 3, 59999])
    np.testing.assert_array_equal(src.train.features(rows), x[rows])


@needs_fmnist
def test_debian_files_checksums() -> None:
    # The Debian package re-compresses the archives: its .gz MD5s differ from Zalando's
    # published ones, but the decompressed payloads are byte-identical to the originals.
    for name in FASHION_MNIST_FILES:
        payload = gzip.decompress((DEBIAN / name).read_bytes())
        assert hashlib.sha256(payload).hexdigest() == FASHION_MNIST_SHA256[name]
        assert len(FASHION_MNIST_MD5[name]) == 32


@needs_fmnist
def test_potluck_data_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sub = tmp_path / "fashion-mnist"
    sub.mkdir()
    for name in FASHION_MNIST_FILES:
        (sub / name).symlink_to(DEBIAN / name)
    monkeypatch.setenv("POTLUCK_DATA", str(tmp_path))
    assert find_fashion_mnist() == sub
    assert load_source("fashion_mnist").train.x.shape == (60000, 1, 28, 28)


def test_fashion_mnist_idx_parsing_small_files(tmp_path: Path, no_debian: None) -> None:
    write_fake_fmnist(tmp_path, n=12)
    src = load_source("fashion_mnist", path=str(tmp_path), verify=False)
    assert src.train.x.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(src.train.y, np.arange(12) % 10)
    with pytest.raises(ValueError, match="does not match Fashion-MNIST"):
        load_source("fashion_mnist", path=str(tmp_path))


def test_missing_data_names_the_fixes(tmp_path: Path, no_debian: None) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_source("fashion_mnist")
    msg = str(err.value)
    assert "dataset-fashion-mnist" in msg and "POTLUCK_DATA" in msg
    assert "download_fashion_mnist" in msg and "no-debian" in msg
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_fashion_mnist(tmp_path / "nowhere")


def test_truncated_idx_is_a_clear_error(tmp_path: Path, no_debian: None) -> None:
    write_fake_fmnist(tmp_path / "a", n=5, images=100)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_source("fashion_mnist", path=str(tmp_path / "a"), verify=False)
    write_fake_fmnist(tmp_path / "b", n=5)
    victim = tmp_path / "b" / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-10])  # a cut-off download
    with pytest.raises(ValueError, match="not a complete gzip file"):
        load_source("fashion_mnist", path=str(tmp_path / "b"), verify=False)


def test_bad_idx_magic(tmp_path: Path, no_debian: None) -> None:
    write_fake_fmnist(tmp_path, n=3)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" * 3))
    with pytest.raises(ValueError, match="bad IDX magic"):
        load_source("fashion_mnist", path=str(tmp_path), verify=False)


def test_verify_checksum_detects_corruption(tmp_path: Path) -> None:
    f = tmp_path / "archive.gz"
    f.write_bytes(b"fashion" * 1000)
    good = hashlib.md5(f.read_bytes()).hexdigest()
    verify_checksum(f, good)
    verify_checksum(f, hashlib.sha256(f.read_bytes()).hexdigest(), algorithm="sha256")
    data = bytearray(f.read_bytes())
    data[500] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify_checksum(f, good)


def test_digits_shapes_and_seeded_split() -> None:
    a, b, c = (
        load_source("digits", seed=0),
        load_source("digits", seed=0),
        load_source("digits", seed=1),
    )
    assert a.train.x.shape == (1437, 64) and a.test.x.shape == (360, 64)
    assert a.train.x.dtype == np.float32 and a.train.x.min() >= 0 and a.train.x.max() <= 1
    np.testing.assert_array_equal(a.train.y, b.train.y)
    assert not np.array_equal(a.train.y, c.train.y)
    assert a.input_shape == (64,) and a.num_classes == 10
    assert abs(np.bincount(a.test.y).min() - 36) <= 1  # stratified


def test_synthetic_shapes_groups_and_determinism() -> None:
    a = load_source("synthetic", seed=3, alpha=1.0, beta=1.0, num_clients=30)
    b = load_source("synthetic", seed=3, alpha=1.0, beta=1.0, num_clients=30)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert a.train.x.shape[1:] == (60,) and a.input_shape == (60,) and a.num_classes == 10
    assert a.train.groups is not None and a.test.groups is not None
    sizes = np.bincount(a.train.groups) + np.bincount(a.test.groups)
    assert len(sizes) == 30 and sizes.min() >= 50
    assert sizes.std() / sizes.mean() > 0.5  # lognormal(4, 2) sizes are very unequal
    assert (np.bincount(a.test.groups) == sizes // 5).all()
    c = load_source("synthetic", seed=4)
    assert not np.array_equal(a.train.y[:50], c.train.y[:50])


def test_synthetic_iid_variant_and_validation() -> None:
    src = load_source("synthetic", iid=True, num_clients=4, dim=8, num_classes=3)
    assert src.input_shape == (8,) and src.train.y.max() < 3
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        load_source("synthetic", alpha=-1.0)
    with pytest.raises(ValueError, match="num_clients must be an integer >= 1"):
        load_source("synthetic", num_clients=0)


def test_array_dataset_validation() -> None:
    x, y = np.zeros((3, 2), np.float32), np.array([0, 1, 2])
    assert len(ArrayDataset(x, y).subset(np.array([2]))) == 1
    with pytest.raises(ValueError, match="x must be a float32 array"):
        ArrayDataset(x.astype(np.float64), y)
    with pytest.raises(ValueError, match="y must be a 1-D int64 array"):
        ArrayDataset(x, y.astype(np.int32))
    with pytest.raises(ValueError, match="y has 2 entries but x has 3"):
        ArrayDataset(x, y[:2])
    with pytest.raises(ValueError, match="groups has 1 entries"):
        ArrayDataset(x, y, np.array([0]))
    with pytest.raises(ValueError, match="feature shape"):
        DataSource("d", ArrayDataset(x, y), ArrayDataset(x, y), 3, (3,))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        DataSource("d", ArrayDataset(x, y), ArrayDataset(x, y), 2, (2,))


def test_array_dataset_integer_inputs() -> None:
    y = np.array([0, 1, 2])
    for dtype in (np.int64, np.int32):
        x = np.arange(6, dtype=dtype).reshape(3, 2)
        ds = ArrayDataset(x, y)
        assert ds.integer_features and ds.features() is x  # unchanged, no copy
        assert ds.features(np.array([2])).dtype == dtype
        assert ds.subset(np.array([0, 1])).x.dtype == dtype
    assert not ArrayDataset(np.zeros((3, 2), np.float32), y).integer_features
    codes = ArrayDataset(np.zeros((3, 2), np.uint8), y, decode=(1.0, 0.0))
    assert not codes.integer_features and codes.features().dtype == np.float32
    for bad in (np.uint8, np.int16, np.float64, np.bool_):
        with pytest.raises(ValueError, match=r"x must be a float32 array \(or an int64/int32"):
            ArrayDataset(np.zeros((3, 2), bad), y)
    with pytest.raises(ValueError, match=r"x must be a uint8 array \(with decode\)"):
        ArrayDataset(np.zeros((3, 2), np.int64), y, decode=(1.0, 0.0))


def test_data_source_refuses_integer_train_with_float_test() -> None:
    y = np.array([0, 1])
    ints = ArrayDataset(np.zeros((2, 3), np.int64), y)
    floats = ArrayDataset(np.zeros((2, 3), np.float32), y)
    assert DataSource("d", ints, ints, 2, (3,)).train.integer_features
    with pytest.raises(ValueError, match="d: train inputs are integer but test inputs are float"):
        DataSource("d", ints, floats, 2, (3,))


def test_decoded_arrays_are_cached_once_verified(
    tmp_path: Path, no_debian: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verified files are decoded once and then read from the cache, equal to a fresh
    decode; unverified ones are never cached; a damaged entry is decoded again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("POTLUCK_CACHE", str(cache))
    write_fake_fmnist(tmp_path / "d", n=12)
    monkeypatch.setattr(
        sources,
        "FASHION_MNIST_SHA256",
        {n: hashlib.sha256(gzip.decompress((tmp_path / "d" / n).read_bytes())).hexdigest()
         for n in FASHION_MNIST_FILES},
    )  # fmt: skip
    sources._fashion_arrays.cache_clear()
    load_source("fashion_mnist", path=str(tmp_path / "d"), verify=False)
    assert not cache.exists() or not any(cache.iterdir())  # unverified: not kept
    sources._fashion_arrays.cache_clear()
    fresh = load_source("fashion_mnist", path=str(tmp_path / "d"))
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        f"{n}.npy" for n in ("x_train", "y_train", "x_test", "y_test")
    )
    reads: list[Path] = []
    monkeypatch.setattr(sources, "_read_idx", lambda p, *a: reads.append(p))  # must not run
    sources._fashion_arrays.cache_clear()
    cached = load_source("fashion_mnist", path=str(tmp_path / "d"))
    assert reads == []
    np.testing.assert_array_equal(cached.train.x, fresh.train.x)
    np.testing.assert_array_equal(cached.test.y, fresh.test.y)
    assert not cached.train.x.flags.writeable and type(cached.train.x) is np.ndarray
    monkeypatch.undo()
    monkeypatch.setenv("POTLUCK_CACHE", str(cache))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    (entry / "x_train.npy").write_bytes(b"\x93NUMPY damaged")
    sources._fashion_arrays.cache_clear()
    again = load_source("fashion_mnist", path=str(tmp_path / "d"), verify=False)
    np.testing.assert_array_equal(again.train.x, fresh.train.x)


def test_the_cache_directory_can_be_chosen_or_turned_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "c"))
    assert sources.cache_dir() == tmp_path / "c"
    for off in ("off", ""):
        monkeypatch.setenv("POTLUCK_CACHE", off)
        assert sources.cache_dir() is None
    monkeypatch.delenv("POTLUCK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.cache_dir() == tmp_path / "xdg" / "potluck"
