"""Task: factory checks; check_outputs on good and bad models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from potluck.core.task import Task, check_outputs
from potluck.data import Federation


class Net(nn.Module):
    def __init__(self, inputs: int = 4, outputs: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(inputs, outputs)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


class LSTMNet(nn.Module):
    """The classic mistake: returns nn.LSTM's (output, (h, c)) as is."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.lstm(x)


class Lambda(nn.Module):
    def __init__(self, fn: object) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> object:
        return self.fn(x)


X, Y = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2, 1])


def check(task: Task, model: nn.Module, y: torch.Tensor = Y, x: torch.Tensor = X) -> None:
    check_outputs(task, model, x, y, where="client 3")


# --------------------------------------------------------------------------- Task


def test_a_model_instance_is_refused_with_the_fix() -> None:
    with pytest.raises(
        TypeError,
        match=r"got a model instance \(Net\).*Task\(model_fn=Net\).*Task\(model_fn=lambda: Net",
    ):
        Task(model_fn=Net())
    assert isinstance(Task(model_fn=Net).build_model(), Net)
    assert isinstance(Task(model_fn=lambda: Net(4, 2)).build_model(), Net)


def test_non_callable_fields_are_refused() -> None:
    with pytest.raises(TypeError, match=r"Task\.model_fn must be callable, got str"):
        Task(model_fn="Net")
    with pytest.raises(TypeError, match=r"Task\.loss_fn must be callable, got NoneType"):
        Task(model_fn=Net, loss_fn=None)


# --------------------------------------------------------------------------- check_outputs


def test_a_good_model_passes_and_nothing_is_disturbed() -> None:
    class Noisy(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 0 * torch.rand(1)  # draws from the global RNG

    task, model = Task(model_fn=Noisy), Noisy()
    model.train()
    model.drop.eval()  # mixed flags must come back exactly
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    check(task, model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training and model.fc.training and not model.drop.training
    assert all(p.grad is None for p in model.parameters())


def test_a_tuple_output_is_refused_with_the_fix() -> None:
    with pytest.raises(
        TypeError,
        match=r"client 3: the model returned a tuple of 2, not a tensor.*"
        r"logits tensor only, e.g. `out, _ = self\.lstm\(x\)`",
    ):
        check(Task(model_fn=LSTMNet), LSTMNet(), x=torch.randn(5, 7, 4))


def test_other_non_tensor_outputs_are_refused() -> None:
    model = Lambda(lambda x: {"logits": x})
    with pytest.raises(
        TypeError, match=r"client 3: the model returned a dict, not a torch\.Tensor"
    ):
        check(Task(model_fn=Net), model)


@pytest.mark.parametrize("fn", [lambda x: x.reshape(-1), lambda x: x.sum(), lambda x: x.T])
def test_an_output_without_the_batch_first_is_refused(fn: object) -> None:
    with pytest.raises(ValueError, match=r"client 3: .*first dimension must be the batch"):
        check(Task(model_fn=Net), Lambda(fn))


def test_labels_beyond_the_outputs_are_refused() -> None:
    y = torch.tensor([0, 1, 7, 2, 1])
    with pytest.raises(
        ValueError,
        match=r"client 3: label 7 is out of range for the model's 3 outputs.*"
        r"at least 8 outputs \(its output size / num_classes\)",
    ):
        check(Task(model_fn=Net), Net(), y)
    with pytest.raises(ValueError, match=r"client 3: label -1 is negative.*\[0, 3\)"):
        check(Task(model_fn=Net), Net(), torch.tensor([0, 1, -1, 2, 1]))


def test_the_label_check_applies_to_the_default_loss_only() -> None:
    def regression(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out[:, 0] - y.float()) ** 2).mean()

    check(Task(model_fn=Net, loss_fn=regression), Net(), torch.tensor([10, 20, 30, 40, 50]))
    probs = torch.softmax(torch.randn(5, 3), dim=1)  # cross_entropy with class probabilities
    check(Task(model_fn=Net), Net(), probs)


def test_a_loss_that_is_not_a_finite_scalar_is_refused() -> None:
    per_example = Task(model_fn=Net, loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none"))
    with pytest.raises(
        ValueError, match=r"client 3: task.loss_fn returned shape \(5,\), not a 0-d"
    ):
        check(per_example, Net())
    as_float = Task(model_fn=Net, loss_fn=lambda o, y: float(F.cross_entropy(o, y)))
    with pytest.raises(TypeError, match=r"client 3: task\.loss_fn returned a float"):
        check(as_float, Net())
    with pytest.raises(ValueError, match="client 3: the loss on a first batch is nan"):
        check(Task(model_fn=Net), Lambda(lambda x: torch.full((len(x), 3), float("nan"))))


def test_errors_inside_the_model_name_where() -> None:
    with pytest.raises(RuntimeError) as info:
        check(Task(model_fn=Net), Net(inputs=6))  # 4 features into Linear(6, ...)
    assert any("client 3" in note for note in getattr(info.value, "__notes__", []))


def test_an_embedding_model_on_integer_client_data_passes() -> None:
    ids = np.random.default_rng(0).integers(0, 20, (30, 6))
    fed = Federation.from_client_data([(ids, ids[:, -1]), (ids[::-1], ids[::-1, 0])])

    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(24, 20))

    data, task = fed.client(1), Task(model_fn=model_fn)
    x, y = torch.from_numpy(data.x_train[:8]), torch.from_numpy(data.y_train[:8])
    check_outputs(task, task.build_model(), x, y, where="client 1")
    small = Task(
        model_fn=lambda: nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(24, 5))
    )
    big_label = torch.full((8,), 19)
    with pytest.raises(ValueError, match="client 1: label 19 is out of range for the model's 5"):
        check_outputs(small, small.build_model(), x, big_label, where="client 1")
