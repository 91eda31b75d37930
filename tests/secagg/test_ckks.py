"""Homomorphic aggregation with CKKS (TenSEAL): over in-memory messages (``ckks_harness``) the
decrypted mean is the plaintext weighted mean within the stated error, the key holder's
released sum carries its flooding noise, the server side never holds a secret key, an update
under another key is refused by name, the key holder decrypts one sum of at least
``min_clients``, and its leaving aborts the round; in whole runs it equals FedAvg within the
error on every engine, runs from TOML and the CLI, and settings and compositions that cannot
work are refused with the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ckks_harness import CLIENT, NS, bound, error_bound, he_round, inputs_for, weighted_mean
from typer.testing import CliRunner

from potluck.cli import app
from potluck.config import ExperimentConfig
from potluck.core.message import Message, MessageError
from potluck.core.params import ParamSpec
from potluck.core.parts import Context
from potluck.engines import available_engines
from potluck.engines.inline import InlineEngine
from potluck.orchestrator import RunResult, run_experiment
from potluck.secagg import ckks
from potluck.secagg.homomorphic import CKKS
from potluck.store.sqlite import RunStore

pytest.importorskip("tenseal")
ts = ckks.tenseal()  # refuses, rather than aborts, where protoc's compiler was loaded first

D = 5000  # two ciphertexts of 4096 slots: the update is split and summed slot-wise
CLIENTS = [0, 1, 2, 3, 4]


def test_the_decrypted_mean_is_the_weighted_mean_within_the_stated_error() -> None:
    part = bound(CKKS(), D)
    inputs = inputs_for(CLIENTS, D)
    out = he_round(part, inputs)
    assert out.aborted is None and out.mean is not None
    plain = weighted_mean(part, inputs, CLIENTS)
    error = np.abs(out.mean.numpy().astype(np.float64) - plain)
    assert bool((error <= error_bound(part, inputs, CLIENTS, plain) + 1e-7).all())
    # the released sum carries the key holder's flooding noise, of its standard deviation
    w = sum(inputs[c][1] for c in CLIENTS) / part.max_weight
    spread = float(np.std((out.mean.numpy() - plain) * w / part.clip_range))
    assert 0.8 * part.flooding < spread < 1.25 * part.flooding
    assert out.view.metrics == {"key_holder": 0.0, "contributors": 5.0}


def test_ckks_alone_is_within_its_error_bound() -> None:
    part = bound(CKKS(flooding=1e-300), D)  # no flooding to speak of: CKKS's own error
    inputs = inputs_for(CLIENTS, D, seed=1)
    out = he_round(part, inputs)
    assert out.mean is not None
    z_error = np.abs(out.mean.numpy().astype(np.float64) - weighted_mean(part, inputs, CLIENTS))
    w = sum(inputs[c][1] for c in CLIENTS) / part.max_weight
    slot_error = float(z_error.max()) * w  # clip 1; the float32 mean rounds to ~6e-8
    assert slot_error < part.parameters().error_bound(len(CLIENTS)) + 1e-7 * w


def test_the_server_side_never_holds_a_secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every context built on the server side (the server half and the aggregator) holds no
    secret key, keys are made only in client code, and the key holder's secret key is in
    nothing the server side received or kept."""
    made: list[bool] = []  # per context made: in client code?
    loaded: list[tuple[bool, bool]] = []  # per context loaded: (in client code, with a key)
    real_context, real_from = ts.context, ts.context_from

    def context(*args: Any, **kwargs: Any) -> Any:
        made.append(CLIENT.running)
        return real_context(*args, **kwargs)

    def context_from(*args: Any, **kwargs: Any) -> Any:
        c = real_from(*args, **kwargs)
        loaded.append((CLIENT.running, c.has_secret_key()))
        return c

    monkeypatch.setattr(ts, "context", context)
    monkeypatch.setattr(ts, "context_from", context_from)
    part = bound(CKKS(key_holder=2), D)
    out = he_round(part, inputs_for(CLIENTS, D))
    assert out.mean is not None
    assert made == [True]  # one key pair, by the key holder
    server_loads = [secret for on_client, secret in loaded if not on_client]
    assert len(server_loads) == 2 and not any(server_loads)  # the half, the aggregator
    assert (True, True) in loaded  # the key holder's own decryption
    holder = real_from(out.view.states[2]["secret_context"].numpy().tobytes())
    sk_only = holder.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False,
        save_relin_keys=False,
    )  # fmt: skip
    window = sk_only[len(sk_only) // 2 :][:64]  # 64 bytes of the secret key's data
    assert window in out.view.states[2]["secret_context"].numpy().tobytes()
    messages = [*out.view.seen, out.view.told or Message()]
    received = [t for m in messages for t in m.arrays.values()]
    kept = [t for s in out.server for t in s.values()]
    for t in [*received, *kept]:
        assert window not in t.numpy().tobytes()


def test_a_context_is_loaded_only_as_public_or_secret_as_expected() -> None:
    params = ckks.Parameters()
    secret, public = ckks.keygen(params)
    with pytest.raises(MessageError, match="the key holder: the context holds a secret key"):
        ckks.load(secret, params, "the key holder")  # what a server half would do with it
    with pytest.raises(MessageError, match="holds no secret key"):
        ckks.load(public, params, "x", secret=True)
    with pytest.raises(MessageError, match="x: not a TenSEAL context"):
        ckks.load(b"\x00" * 64, params, "x")
    assert ckks.load(secret, params, "x", secret=True).has_secret_key()


def other_key_row(part: CKKS, delta: np.ndarray, weight: float, claim: bytes | None) -> Message:
    """A client's update encrypted under a key pair of its own, claiming the fingerprint
    ``claim`` (its own if ``None``)."""
    params = part.parameters()
    _, public = ckks.keygen(params)
    context = ckks.load(public, params, "test")
    key = ckks.fingerprint(public) if claim is None else claim
    row = ckks.encrypt(context, part.slots(delta, weight, NS), params, key)
    return Message({"delta": torch.from_numpy(row)}, {"num_examples": 1})


def test_an_update_under_another_key_is_refused_naming_its_client() -> None:
    part = bound(CKKS(), D)
    inputs = inputs_for(CLIENTS, D)

    def swap(c: int, upload: Message) -> Message:
        return other_key_row(part, *inputs[c], None) if c == 3 else upload

    with pytest.raises(MessageError, match="update from client 3 is encrypted under another key"):
        he_round(part, inputs, tamper=swap)


def test_an_update_that_lies_about_its_key_makes_the_key_holder_refuse() -> None:
    part = bound(CKKS(), D)
    inputs = inputs_for(CLIENTS, D)

    def lie(c: int, upload: Message) -> Message:
        if c != 3:
            return upload
        claimed = ckks.unpack(upload.arrays["delta"].numpy(), "test").key  # the round's
        return other_key_row(part, *inputs[c], claimed)

    out = he_round(part, inputs, tamper=lie)
    assert out.mean is None and out.aborted is not None
    assert "the key holder refused: the sum counts" in out.aborted
    assert "not the 5 announced" in out.aborted


def test_a_context_of_other_parameters_is_refused_by_the_client_naming_it() -> None:
    part = bound(CKKS(), D)
    small = ckks.Parameters(4096, (60, 49), 40)
    _, public = ckks.keygen(small)
    forged = Message({"public_context": as_tensor(public), "fingerprint": as_tensor(
        ckks.fingerprint(public)
    )})  # fmt: skip

    def other(c: int, message: Message) -> Message:
        return forged if c == 1 else message

    with pytest.raises(MessageError, match="ckks encoding of client 1: the context's CKKS param"):
        he_round(part, inputs_for(CLIENTS, D), on_leave=other)


def as_tensor(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())


def test_a_member_that_leaves_before_uploading_is_left_out_of_the_sum() -> None:
    part = bound(CKKS(), D)
    inputs = inputs_for(CLIENTS, D)
    out = he_round(part, inputs, drops={"train": {2}})
    assert out.mean is not None and out.view.metrics["contributors"] == 4
    rest = [0, 1, 3, 4]
    plain = weighted_mean(part, inputs, rest)
    error = np.abs(out.mean.numpy().astype(np.float64) - plain)
    assert bool((error <= error_bound(part, inputs, rest, plain) + 1e-7).all())


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("keys", "the key holder, client 0, sent no key"),
        ("train", "the key holder, client 0, left the round before the decryption"),
        ("decrypt", "the key holder, client 0, did not decrypt"),
    ],
)
def test_the_key_holder_leaving_aborts_the_round(stage: str, message: str) -> None:
    out = he_round(bound(CKKS(), D), inputs_for(CLIENTS, D), drops={stage: {0}})
    assert out.mean is None and out.aborted is not None and message in out.aborted


def test_the_key_holder_decrypts_no_sum_of_fewer_than_min_clients() -> None:
    part = bound(CKKS(min_clients=3), D)
    out = he_round(part, inputs_for(CLIENTS, D), drops={"train": {1, 2, 3}})
    assert out.aborted is not None and "a sum of 2 updates, fewer than min_clients = 3" in (
        out.aborted
    )


def test_the_key_holder_decrypts_one_sum_per_key() -> None:
    part = bound(CKKS(), D)
    out = he_round(part, inputs_for(CLIENTS, D))
    assert out.aggregate is not None
    ctx = Context(0, 1, (NS, 1, 0), client=0, inbox=Message({"sum": out.aggregate}))
    shared = Message(scalars={"contributors": 5})
    with pytest.raises(MessageError, match="decrypts one sum per key"):
        part.client_stage("decrypt", shared, out.view.states[0], ctx)


def test_a_designated_key_holder_outside_the_cohort_aborts_the_round() -> None:
    out = he_round(bound(CKKS(key_holder=9), D), inputs_for(CLIENTS, D))
    assert out.aborted is not None and "the key holder, client 9, is not in the cohort" in (
        out.aborted
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"poly_modulus_degree": 4096}, "120 bits at poly_modulus_degree 4096 are not 128-bit"),
        ({"poly_modulus_degree": 5000}, "poly_modulus_degree must be one of"),
        ({"coeff_mod_bit_sizes": (60,)}, "at least two primes of 20 to 60 bits"),
        ({"scale_bits": 58}, "scale_bits must be in [20, 56]"),
        ({"flooding": 0.0}, "flooding must be a finite standard deviation > 0"),
        ({"min_clients": 0}, "min_clients must be >= 1"),
    ],
)
def test_settings_that_are_insecure_or_cannot_work_are_refused(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        CKKS(**params)
    assert message in str(err.value)


def test_without_tenseal_binding_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tenseal", None)
    with pytest.raises(ImportError, match=r"pip install 'potluck\[he\]'"):
        CKKS().bind(ParamSpec(("w",), ((3,),)))


# ---- whole runs --------------------------------------------------------------------------------

ENGINES = [e for e in available_engines() if e != "ray"]
COHORT = 8
BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "num_clients": 20, "partition": {"kind": "dirichlet"}},
    "model": {"name": "mlp"},
    "sampler": {"clients_per_round": COHORT},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "evaluation": {"federated_clients": 0},
}
HE = {"transforms": [{"name": "ckks"}], "aggregator": {"name": "ckks_sum"}}


def config(engine: str = "inline", rounds: int = 1, **extra: Any) -> ExperimentConfig:
    run = {"engine": engine, "threads": 1}
    return ExperimentConfig.from_dict({**BASE, "rounds": rounds, "run": run, **extra})


@pytest.mark.parametrize("engine", ENGINES)
def test_he_fedavg_equals_fedavg_within_the_error_on_every_engine(engine: str) -> None:
    plain = run_experiment(config(engine).build())
    he = run_experiment(config(engine, algorithm={"name": "he_fedavg"}).build())
    exp = config(engine).build()
    w0 = exp.algorithm.client_program(exp.task, exp.federation, seed=exp.seed).initial_weights()
    mean = (plain.weights - w0).double().numpy()  # server SGD at lr 1: the weighted mean
    assert 1e-3 < float(np.abs(mean).max()) < 1.0  # nothing clipped
    part = CKKS()
    sizes = np.sort(exp.federation.num_examples_all())  # the lightest cohort there can be
    lightest = {i: (np.zeros(1), float(s)) for i, s in enumerate(sizes[:COHORT])}
    allowed = error_bound(part, lightest, list(lightest), mean)
    error = (he.weights - plain.weights).abs().double().numpy()
    assert bool((error <= allowed + 1e-6).all())
    assert float(error.max()) > 0  # it really went through CKKS
    first = he.history[0]
    assert first["updates"] == COHORT and first["transforms.0.ckks/contributors"] == COHORT


def cohorts(exp: Any, rounds: int) -> list[set[int]]:
    """The sampler's cohort of each round, drawn as the round loop draws it."""
    sampler, n, state, out = exp.algorithm.sampler, exp.federation.num_clients, {}, []
    state = sampler.init(n)
    for rnd in range(1, rounds + 1):
        cohort, state = sampler.sample(n, state, Context(exp.seed, rnd, ("sampling", rnd)))
        out.append({int(c) for c in cohort})
    return out


def test_a_round_without_the_key_holder_aborts_and_the_run_goes_on(tmp_path: Path) -> None:
    cfg = config(rounds=4, algorithm={"name": "he_fedavg", "key_holder": 7})
    store = RunStore(tmp_path)
    result: RunResult = run_experiment(cfg.build(), store)
    present = [7 in c for c in cohorts(cfg.build(), 4)]
    assert any(present) and not all(present)  # (this seed's cohorts)
    history = result.history
    for rnd, (m, there) in enumerate(zip(history, present, strict=True)):
        assert m.get("aborted", 0.0) == (0.0 if there else 1.0)
        moved = rnd == 0 or m["test_loss"] != history[rnd - 1]["test_loss"]
        assert moved == there  # an aborted round leaves the model where it was
    stored = [n for s in store.client_states(result.run_id, list(range(20))) for n in s]
    assert not any(name.startswith("transforms.0.ckks/") for name in stored)


def test_the_overflow_check_stops_the_run_before_its_first_round() -> None:
    with pytest.raises(ValueError, match=r"8 clients can sum to 8 in a slot.*scale_bits to at"):
        run_experiment(config(algorithm={"name": "he_fedavg", "scale_bits": 56}).build())


def test_a_weight_above_max_weight_stops_the_run_naming_the_setting() -> None:
    algorithm = {"name": "he_fedavg", "max_weight": 10.0}
    with pytest.raises(ValueError, match=r"transforms.0.ckks: .* got \d+: raise max_weight"):
        run_experiment(config(algorithm=algorithm).build())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"aggregator": {"name": "my_lab.agg:Median"}},
            "aggregator (Median) needs individual updates, but transforms.0.ckks (CKKS) gives "
            "the server only their sum",
        ),
        ({"aggregator": {"name": "mean"}}, "needs the ciphertexts added homomorphically"),
        ({"transforms": [{"name": "clip", "max_norm": 1.0}]}, "needs updates encrypted with"),
        (
            {"transforms": [{"name": "ckks"}, {"name": "clip", "max_norm": 1.0}]},
            "needs to be the last update transform (one after it would see only its encoding), "
            "but transforms.1.clip (ClipNorm) comes after it",
        ),
        ({"terms": [{"name": "scaffold"}]}, "also uploads ['delta_c'], which it would not"),
        (
            {"transforms": [{"name": "secagg"}, {"name": "ckks"}]},
            "transforms.0.secagg (SecAgg) needs the updates summed modulo 2^bits",
        ),
    ],
)
def test_compositions_that_cannot_work_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_dict({**BASE, **HE, **extra}).algorithm_parts()
    assert message in str(err.value)


class _Remote(InlineEngine):
    remote = True


def test_a_remote_key_holder_that_sends_its_secret_key_is_refused() -> None:
    """A deployed site keeps its secret key (``deploy.secrets``); a remote key holder that
    sends it anyway is refused, and the round aborts without a key."""
    result = run_experiment(config(**HE).build(), engine=_Remote)
    assert [(m["aborted"], m["refused"]) for m in result.history] == [(1.0, 1.0)]


def test_the_parts_run_from_a_toml_file_with_the_cli(tmp_path: Path) -> None:
    exp = tmp_path / "he.toml"
    exp.write_text(
        "rounds = 2\n[data]\ndataset = 'digits'\nnum_clients = 4\n[model]\nname = 'mlp'\n"
        "[sampler]\nclients_per_round = 4\n"
        "[[transforms]]\nname = 'ckks'\nkey_holder = 3\ncoeff_mod_bit_sizes = [60, 60]\n"
        "[aggregator]\nname = 'ckks_sum'\n[run]\nthreads = 1\n"
    )
    result = CliRunner().invoke(app, ["run", str(exp), "--store", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "round 2" in result.output and "done run" in result.output
    (info,) = RunStore(tmp_path / "runs").list_runs()
    written = ExperimentConfig.from_dict(info.config)
    (transform,) = written.algorithm_parts().transforms
    assert transform == CKKS(key_holder=3)


def test_tenseal_is_refused_with_the_reason_after_protocs_compiler_was_loaded() -> None:
    code = (
        "import grpc_tools.protoc\n"
        "from potluck.secagg import ckks\n"
        "try:\n"
        "    ckks.tenseal()\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # not an abort (134)
    assert "TenSEAL cannot load in a process that has loaded grpc_tools" in done.stdout
