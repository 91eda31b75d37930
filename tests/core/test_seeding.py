import numpy as np
import pytest

from potluck.core.seeding import Seeds


def test_same_path_same_stream_different_paths_independent() -> None:
    a = Seeds(7).numpy("batch", 3, 11).random(5)
    assert np.array_equal(a, Seeds(7).numpy("batch", 3, 11).random(5))
    assert not np.array_equal(a, Seeds(7).numpy("batch", 3, 12).random(5))
    assert not np.array_equal(a, Seeds(7).numpy("batch", 4, 11).random(5))
    assert not np.array_equal(a, Seeds(8).numpy("batch", 3, 11).random(5))
    assert not np.array_equal(a, Seeds(7).numpy("noise", 3, 11).random(5))


def test_order_of_draws_does_not_matter() -> None:
    s = Seeds(1)
    first = s.numpy("sampling", 2).integers(0, 1000, 10)
    s.numpy("sampling", 1).integers(0, 1000, 10)
    assert np.array_equal(first, Seeds(1).numpy("sampling", 2).integers(0, 1000, 10))


def test_torch_generator_is_reproducible() -> None:
    import torch

    a = torch.randperm(10, generator=Seeds(3).torch("batch", 1, 2))
    b = torch.randperm(10, generator=Seeds(3).torch("batch", 1, 2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_seed_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        Seeds(bad)  # type: ignore[arg-type]


def test_bad_path_parts_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Seeds(0).numpy("x", -3)
    with pytest.raises(TypeError, match="str or int"):
        Seeds(0).numpy("x", 1.5)  # type: ignore[arg-type]
