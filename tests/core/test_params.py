import pytest
import torch
from torch import nn

from potluck.core.params import ParamSpec
from potluck.models import build_model


class CharLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(80, 8)
        self.lstm = nn.LSTM(8, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 80)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


@pytest.mark.parametrize(
    "module",
    [build_model("cnn", input_shape=(1, 28, 28), num_classes=10), CharLSTM()],
    ids=["cnn", "lstm"],
)
def test_round_trip_is_exact(module: nn.Module) -> None:
    spec = ParamSpec.from_module(module)
    flat = spec.from_module_values(module)
    assert flat.dtype == torch.float32 and flat.shape == (spec.size,)
    assert spec.size == sum(p.numel() for p in module.parameters())
    back = spec.unflatten(flat)
    for name, param in module.named_parameters():
        assert torch.equal(back[name], param.detach())
    assert torch.equal(spec.flatten(back), flat)


def test_load_into_copies_values() -> None:
    module = CharLSTM()
    spec = ParamSpec.from_module(module)
    target = torch.arange(spec.size, dtype=torch.float32)
    spec.load_into(module, target)
    assert torch.equal(spec.from_module_values(module), target)


def test_unflatten_returns_views_that_carry_gradients() -> None:
    spec = ParamSpec.from_module(nn.Linear(3, 2))
    flat = torch.zeros(spec.size, requires_grad=True)
    parts = spec.unflatten(flat)
    (parts["weight"].sum() * 2 + parts["bias"].sum()).backward()
    assert flat.grad is not None
    assert flat.grad.tolist() == [2.0] * 6 + [1.0] * 2


def test_wrong_shapes_and_dtypes_are_refused_with_names() -> None:
    spec = ParamSpec.from_module(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"expected \(8,\)"):
        spec.unflatten(torch.zeros(7))
    with pytest.raises(TypeError, match="float32"):
        spec.unflatten(torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'weight' has shape \(3, 2\), expected \(2, 3\)"):
        spec.flatten({"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        spec.flatten({"weight": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="float32"):
        ParamSpec.from_module(nn.Linear(2, 2).double())
