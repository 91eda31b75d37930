from pathlib import Path

import pytest

from potluck.config import ConfigError, ExperimentConfig


def test_defaults_are_the_default_experiment() -> None:
    cfg = ExperimentConfig()
    assert cfg.data.dataset == "fashion_mnist" and cfg.data.num_clients == 100
    assert cfg.data.partition.kind == "dirichlet" and cfg.data.partition.alpha == 0.5
    assert cfg.algorithm.name == "fedavg" and cfg.sampler.clients_per_round == 10
    assert cfg.model.name == "small_cnn" and cfg.rounds == 20


def test_toml_round_trip_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(
        'rounds = 4\n[data]\ndataset = "digits"\nnum_clients = 20\n'
        '[data.partition]\nkind = "iid"\n[client]\nlr = 0.1\n'
    )
    cfg = ExperimentConfig.from_toml(
        path, ["client.epochs=3", "sampler.fraction=0.5", 'run.name="digits-test"']
    )
    assert (cfg.rounds, cfg.data.dataset, cfg.client.lr, cfg.client.epochs) == (4, "digits", 0.1, 3)
    assert cfg.sampler.fraction == 0.5 and cfg.sampler.clients_per_round is None
    assert cfg.run.name == "digits-test"
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert ExperimentConfig.from_toml(again) == cfg


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        (
            {"client": {"lrr": 0.1}},
            [],
            "client.lrr: unknown field; allowed: epochs, batch_size, lr",
        ),
        ({}, ["client.lr=-1"], "client.lr: Input should be greater than 0"),
        ({}, ["rounds=many"], "rounds: Input should be a valid integer"),
        (
            {"data": {"dataset": "cifar"}},
            [],
            "data.dataset: Input should be 'fashion_mnist', 'digits' or 'synthetic'",
        ),
        (
            {"data": {"partition": {"kind": "zipf"}}},
            [],
            "data.partition.kind: Input should be 'iid'",
        ),
        (
            {},
            ["sampler.clients_per_round=0"],
            "sampler.clients_per_round: Input should be greater than or equal to 1",
        ),
        (
            {"sampler": {"clients_per_round": 5, "fraction": 0.1}},
            [],
            "exactly one of sampler.clients_per_round",
        ),
        ({"bogus": 1}, [], "bogus: unknown field; allowed: seed, rounds, data"),
        ({}, ["client.lr"], "--set expects key=value"),
        ({"rounds": 3}, ["rounds.x=1"], "'rounds' is not a section"),
        ({}, ["rounds.x=1"], "rounds: Input should be a valid integer"),
    ],
)
def test_bad_configs_name_the_field(data: dict, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(data, overrides)
    assert message in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="experiment file not found"):
        ExperimentConfig.from_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        ExperimentConfig.from_toml(broken)


def test_algorithm_parts_follow_the_config() -> None:
    cfg = ExperimentConfig.from_dict(
        {}, ["server.momentum=0.9", "client.momentum=0.5", "algorithm.clip_norm=2.0"]
    )
    algo = cfg.algorithm_parts()
    assert algo.server.momentum == 0.9 and algo.local.momentum == 0.5
    assert len(algo.transforms.transforms) == 1
    sgd = ExperimentConfig.from_dict({"algorithm": {"name": "fedsgd"}, "server": {"lr": 0.3}})
    assert sgd.algorithm_parts().name == "fedsgd" and sgd.algorithm_parts().server.lr == 0.3


def test_non_iid_algorithms_from_config() -> None:
    prox = ExperimentConfig.from_dict(
        {"algorithm": {"name": "fedprox", "mu": 1.0, "stragglers": 0.5}}
    ).algorithm_parts()
    assert (prox.name, prox.rule.name, prox.stragglers.fraction) == ("fedprox", "fedprox", 0.5)
    assert prox.stragglers.mode == "partial"
    avg = ExperimentConfig.from_dict({"algorithm": {"stragglers": 0.9}}).algorithm_parts()
    assert avg.stragglers.mode == "drop"
    nova = ExperimentConfig.from_dict(
        {"algorithm": {"name": "fednova"}, "client": {"momentum": 0.9}}
    ).algorithm_parts()
    assert nova.rule.normaliser(1) == 1.0 and nova.rule.momentum == 0.9
    assert ExperimentConfig.from_dict(
        {"algorithm": {"name": "scaffold"}}
    ).algorithm_parts().rule.client_state == ("c_i",)
    with pytest.raises(ConfigError, match="stragglers do not apply"):
        ExperimentConfig.from_dict({"algorithm": {"name": "fedsgd", "stragglers": 0.5}})


def test_adaptive_server_optimizers_from_config() -> None:
    from potluck.optim import ServerAdagrad, ServerAdam, ServerSGD, ServerYogi

    expected = {"sgd": ServerSGD, "adam": ServerAdam, "yogi": ServerYogi, "adagrad": ServerAdagrad}
    for name, cls in expected.items():
        algo = ExperimentConfig.from_dict(
            {"server": {"optimizer": name, "lr": 0.03, "tau": 0.01}}
        ).algorithm_parts()
        assert isinstance(algo.server, cls) and algo.server.lr == 0.03
    assert (
        ExperimentConfig.from_dict({"server": {"optimizer": "yogi"}}).algorithm_parts().server.tau
        == 1e-3
    )
    with pytest.raises(ConfigError, match=r"server\.optimizer: Input should be 'sgd'"):
        ExperimentConfig.from_dict({"server": {"optimizer": "lamb"}})
