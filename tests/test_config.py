from pathlib import Path

import pytest

from potluck.algorithms import Algorithm, fedavg, fedprox
from potluck.client import FedNova, FedProx, Scaffold
from potluck.config import ConfigError, ExperimentConfig, upgrade
from potluck.updates import ClipNorm


def test_defaults_are_the_default_experiment() -> None:
    cfg = ExperimentConfig.from_dict({})
    assert cfg.data.dataset == "fashion_mnist" and cfg.data.num_clients == 100
    assert cfg.data.partition.kind == "dirichlet" and cfg.data.partition.alpha == 0.5
    assert cfg.algorithm == {"name": "fedavg"}
    assert cfg.sampler == {"name": "uniform", "min_clients": 1}
    assert cfg.algorithm_parts().sampler.cohort_size(100) == 10
    assert (cfg.client["epochs"], cfg.client["batch_size"], cfg.client["lr"]) == (2, 32, 0.1)
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
    assert (cfg.rounds, cfg.data.dataset, cfg.client["lr"], cfg.client["epochs"]) == (
        4,
        "digits",
        0.1,
        3,
    )
    assert cfg.sampler["fraction"] == 0.5 and "clients_per_round" not in cfg.sampler
    assert cfg.run.name == "digits-test"
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    back = ExperimentConfig.from_toml(again)
    assert back.to_dict() == cfg.to_dict()
    assert back.algorithm_parts() == cfg.algorithm_parts()


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        (
            {"client": {"lrr": 0.1}},
            [],
            "client.lrr: unknown parameter of LocalSGD (did you mean 'lr'?); allowed: epochs, "
            "batch_size, lr",
        ),
        ({}, ["client.lr=-1"], "client: client lr must be > 0, got -1"),
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
            {"data": {"num_client": 5}},
            [],
            "data.num_client: unknown field (did you mean 'num_clients'?); allowed:",
        ),
        (
            {},
            ["sampler.clients_per_round=0"],
            "sampler: clients_per_round must be >= 1, got 0",
        ),
        (
            {"sampler": {"clients_per_round": 5, "fraction": 0.1}},
            [],
            "sampler: give one of clients_per_round or fraction, not both",
        ),
        (
            {"aggregator": {"name": "meen"}},
            [],
            "aggregator.name: unknown aggregator 'meen' (did you mean 'mean'?)",
        ),
        (
            {"server": {"name": "adam", "beta3": 0.5}},
            [],
            "server.beta3: unknown parameter of ServerAdam (did you mean 'beta2'?)",
        ),
        (
            {"server": {"name": "sgd", "lr": "fast"}},
            [],
            "server.lr: Input should be a valid number",
        ),
        (
            {"stragglers": {"mode": "slow"}},
            [],
            "stragglers.mode: Input should be 'drop' or 'partial' (got 'slow')",
        ),
        (
            {"terms": [{"name": "fedprx"}]},
            [],
            "terms[0].name: unknown term 'fedprx' (did you mean 'fedprox'?)",
        ),
        (
            {"algorithm": {"name": "fedprox", "muu": 1.0}},
            [],
            "algorithm.muu: unknown parameter of algorithm 'fedprox' (did you mean 'mu'?)",
        ),
        (
            {"algorithm": {"name": "fedprox", "mu": 1.0}, "terms": [{"name": "scaffold"}]},
            [],
            "algorithm: parameters ['mu'] of 'fedprox' set its terms, which the config replaces",
        ),
        (
            {"aggregator": {"name": "no_such_lab.agg:Median"}},
            [],
            "aggregator.name: cannot import 'no_such_lab.agg'",
        ),
        ({"bogus": 1}, [], "bogus: unknown field; allowed: format, seed, rounds, data"),
        ({}, ["client.lr"], "--set expects key=value"),
        ({"rounds": 3}, ["rounds.x=1"], "'rounds' is not a section"),
        ({}, ["rounds.x=1"], "rounds: Input should be a valid integer"),
    ],
)
def test_bad_configs_name_the_field(data: dict, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(data, overrides)
    assert message in str(info.value)


def test_impossible_combinations_are_refused_naming_both_parts() -> None:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(
            {"algorithm": {"name": "fedsgd"}, "stragglers": {"fraction": 0.5}}
        )
    assert "stragglers (Stragglers) needs more than one local step" in str(info.value)
    assert "local (LocalSGD)" in str(info.value) and "max_steps=1" in str(info.value)
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"algorithm": {"name": "qffl"}, "server": {"lr": 0.5}})
    assert "terms.0.qffl (QFFL) needs the server step" in str(info.value)
    assert "server (ServerSGD) (lr=0.5" in str(info.value)
    with pytest.raises(ConfigError, match=r"terms.0.ditto \(Ditto\) and terms.1.fedper"):
        ExperimentConfig.from_dict({"terms": [{"name": "ditto"}, {"name": "fedper"}]})


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="experiment file not found"):
        ExperimentConfig.from_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        ExperimentConfig.from_toml(broken)


def test_algorithm_parts_follow_the_config() -> None:
    cfg = ExperimentConfig.from_dict(
        {"transforms": [{"name": "clip", "max_norm": 2.0}]},
        ["server.momentum=0.9", "client.momentum=0.5"],
    )
    algo = cfg.algorithm_parts()
    assert algo.server.momentum == 0.9 and algo.local.momentum == 0.5
    assert algo.transforms == (ClipNorm(2.0),)
    sgd = ExperimentConfig.from_dict({"algorithm": {"name": "fedsgd"}, "server": {"lr": 0.3}})
    parts = sgd.algorithm_parts()
    assert parts.name == "fedsgd" and parts.server.lr == 0.3
    assert (parts.local.max_steps, parts.local.batch_size, parts.local.lr) == (1, "full", 1.0)


def test_non_iid_algorithms_from_config() -> None:
    prox = ExperimentConfig.from_dict(
        {"algorithm": {"name": "fedprox", "mu": 1.0}, "stragglers": {"fraction": 0.5}}
    ).algorithm_parts()
    assert (prox.name, prox.terms, prox.stragglers.fraction) == ("fedprox", (FedProx(1.0),), 0.5)
    assert prox.stragglers.mode == "partial"
    avg = ExperimentConfig.from_dict({"stragglers": {"fraction": 0.9}}).algorithm_parts()
    assert avg.stragglers.mode == "drop"
    nova = ExperimentConfig.from_dict(
        {"algorithm": {"name": "fednova"}, "client": {"momentum": 0.9}}
    ).algorithm_parts()
    assert nova.terms == (FedNova(),) and nova.local.momentum == 0.9
    scaffold = ExperimentConfig.from_dict({"algorithm": {"name": "scaffold"}}).algorithm_parts()
    assert scaffold.terms == (Scaffold(),)


def test_composition_from_config_fedprox_plus_scaffold() -> None:
    cfg = ExperimentConfig.from_dict(
        {"terms": [{"name": "fedprox", "mu": 0.1}, {"name": "scaffold"}]}
    )
    algo = cfg.algorithm_parts()
    assert algo.terms == (FedProx(0.1), Scaffold())
    assert [ns for ns, _ in algo.parts() if ns.startswith("terms")] == [
        "terms.0.fedprox",
        "terms.1.scaffold",
    ]


def test_adaptive_server_optimizers_from_config() -> None:
    from potluck.optim import ServerAdagrad, ServerAdam, ServerSGD, ServerYogi

    expected = {"sgd": ServerSGD, "adam": ServerAdam, "yogi": ServerYogi, "adagrad": ServerAdagrad}
    for name, cls in expected.items():
        extra = {} if name == "sgd" else {"tau": 0.01}
        algo = ExperimentConfig.from_dict(
            {"server": {"name": name, "lr": 0.03, **extra}}
        ).algorithm_parts()
        assert isinstance(algo.server, cls) and algo.server.lr == 0.03
    yogi = ExperimentConfig.from_dict({"server": {"name": "yogi"}}).algorithm_parts().server
    assert yogi.tau == 1e-3
    with pytest.raises(ConfigError, match=r"server.name: unknown server 'lamb'"):
        ExperimentConfig.from_dict({"server": {"name": "lamb"}})


def test_python_built_algorithms_write_back_as_config() -> None:
    """Python -> config -> Python gives an equal algorithm (presets and compositions)."""
    algos = [
        fedprox(mu=0.3, clients_per_round=4, epochs=3, lr=0.2, stragglers=0.5),
        fedavg(fraction=0.2, terms=(FedProx(0.1), Scaffold()), transforms=(ClipNorm(1.0),)),
        Algorithm(name="my-method", terms=(FedNova(momentum=0.5),)),
    ]
    for algo in algos:
        cfg = ExperimentConfig.from_dict(algo.to_config())
        assert cfg.algorithm_parts() == algo


def test_format_1_configs_are_upgraded() -> None:
    old = {
        "algorithm": {
            "name": "fedprox",
            "mu": 0.1,
            "q": 1.0,
            "lam": 0.1,
            "personal_layers": [],
            "stragglers": 0.5,
            "clip_norm": 2.0,
        },
        "server": {"optimizer": "adam", "lr": 0.01, "momentum": 0.0, "beta1": 0.8, "tau": 0.01},
    }
    new = upgrade(old)
    assert new["algorithm"] == {"name": "fedprox", "mu": 0.1}
    assert new["stragglers"] == {"fraction": 0.5}
    assert new["transforms"] == [{"name": "clip", "max_norm": 2.0}]
    assert new["server"] == {"name": "adam", "lr": 0.01, "beta1": 0.8, "tau": 0.01}
    algo = ExperimentConfig.from_dict(old).algorithm_parts()
    assert algo.terms == (FedProx(0.1),) and algo.transforms == (ClipNorm(2.0),)
    assert algo.stragglers.mode == "partial" and algo.server.beta1 == 0.8
    current = {"algorithm": {"name": "fedprox", "mu": 0.1}}
    assert upgrade(current) is current  # a current config is left alone


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00garbage", "not a UTF-8 text file"),
        (b"a = " + b"[" * 5000 + b"]" * 5000, "invalid TOML"),
        (b"", "holds no settings; to run the default experiment, give no file"),
        (b"# only a comment\n", "holds no settings"),
    ],
)
def test_file_problems_are_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "exp.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_toml(path)


def test_a_directory_given_as_the_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not an experiment file"):
        ExperimentConfig.from_toml(tmp_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"client": {"lr": float("inf")}}, "client.lr: must be a finite number (got inf)"),
        ({"server": {"lr": float("nan")}}, "server.lr: must be a finite number (got nan)"),
        ({"deploy": {"round_timeout_s": float("inf")}}, "deploy.round_timeout_s"),
        ({"evaluation": {"every": 1}, "data": {"test_fraction": float("nan")}}, "test_fraction"),
    ],
)
def test_non_finite_numbers_are_refused(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ExperimentConfig.from_dict(data)
