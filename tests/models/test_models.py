import pytest
import torch

from potluck.core.task import Task
from potluck.models import available_models, build_model


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("mlp2nn", 199_210),
        ("cnn", 1_663_370),
        ("logreg", 7_850),
        ("small_cnn", 28_874),
        ("lenet5", 44_426),
    ],
)
def test_parameter_counts_match_the_papers(name: str, params: int) -> None:
    model = build_model(name, input_shape=(1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_on_digits_shape() -> None:
    model = build_model("mlp", input_shape=(64,), num_classes=10)
    assert model(torch.zeros(2, 64)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 64 * 64 + 64 + 64 * 10 + 10


def test_bad_model_requests_are_refused() -> None:
    with pytest.raises(
        ValueError, match="unknown model 'resnet'; available: " + ", ".join(available_models())
    ):
        build_model("resnet", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ValueError, match=r"needs image inputs shaped \(channels, height, width\)"):
        build_model("cnn", input_shape=(64,), num_classes=10)


def test_task_refuses_batch_norm_running_stats() -> None:
    task = Task(lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)))
    with pytest.raises(ValueError, match="running statistics"):
        task.build_model()
    ok = Task(lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
    ok.build_model()
