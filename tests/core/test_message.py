import pytest
import torch

from potluck.core.message import Message, MessageError


def test_valid_message_passes_and_counts_bytes() -> None:
    m = Message(arrays={"delta": torch.zeros(10)}, scalars={"num_examples": 3})
    m.validate({"delta": 10})
    assert m.nbytes == 40
    assert m.scalar("num_examples") == 3.0


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (torch.zeros(9), r"shape \(9,\), expected \(10,\)"),
        (torch.zeros(2, 5), r"shape \(2, 5\)"),
        (torch.zeros(10, dtype=torch.float64), "float64, not float32"),
        (torch.tensor([float("nan")] * 10), "NaN or Inf"),
        (torch.tensor([float("inf")] + [0.0] * 9), "NaN or Inf"),
    ],
)
def test_bad_arrays_are_refused_with_source(array: torch.Tensor, match: str) -> None:
    with pytest.raises(MessageError, match=match) as info:
        Message(arrays={"delta": array}).validate({"delta": 10}, source="update from client 4")
    assert "client 4" in str(info.value)


def test_missing_array_and_bad_scalar() -> None:
    with pytest.raises(MessageError, match="missing array 'delta'"):
        Message().validate({"delta": 1})
    with pytest.raises(MessageError, match="'num_examples' missing or not numeric"):
        Message(scalars={"num_examples": "many"}).scalar("num_examples")
