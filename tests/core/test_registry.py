"""Every registered part says its config back and is rebuilt equal from it; names and
parameters are validated with one message template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from potluck.aggregate import (
    Bulyan,
    CenteredClipping,
    CoordinateMedian,
    FLTrust,
    FoolsGold,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormBounding,
    TrimmedMean,
    WeightedMean,
)
from potluck.attacks.backdoor import Backdoor
from potluck.attacks.colluding import ALIE, IPM, FangKrum, FangTrimmedMean, MinMax, MinSum
from potluck.attacks.poisoning import GaussianNoise, LabelFlip, Scaling, SignFlip
from potluck.client import QFFL, Ditto, FedNova, FedPer, FedProx, LocalSGD, Scaffold
from potluck.core import registry
from potluck.optim import ServerAdagrad, ServerAdam, ServerSGD, ServerYogi
from potluck.privacy.adaptive import AdaptiveGaussianMean
from potluck.privacy.central import GaussianMean
from potluck.privacy.dp_sgd import DpSgd
from potluck.privacy.local import LocalGaussian
from potluck.privacy.secure_central import SecureCentralGaussian
from potluck.privacy.tree import TreeAggregatedMean
from potluck.sampling import (
    OortSampler,
    PoissonSampler,
    ShuffledSampler,
    Stragglers,
    UniformSampler,
)
from potluck.secagg import SecAgg, SecureSum
from potluck.secagg.distributed_dp import DistributedSkellam
from potluck.secagg.homomorphic import CKKS, CKKSSum
from potluck.updates import (
    QSGD,
    Cast,
    CastUpdate,
    ClipNorm,
    FetchSGD,
    KeepLocal,
    RandomK,
    SignEF,
    TopK,
)
from potluck.updates.delta import DeltaDownlink
from potluck.updates.lowrank import PowerSGD
from potluck.updates.quantize import QuantizeDownlink

# each registered part with parameters other than its defaults (and with its defaults)
EXAMPLES: dict[str, list[Any]] = {
    "sampler": [
        OortSampler(),
        OortSampler(clients_per_round=5, epsilon=0.5, min_epsilon=0.1, preferred_s=30.0),
        UniformSampler(clients_per_round=7),
        UniformSampler(fraction=0.3, min_clients=2),
        PoissonSampler(0.05),
        ShuffledSampler(),
        ShuffledSampler(25),
    ],
    "stragglers": [Stragglers(0.5, "drop"), Stragglers()],
    "optimizer": [LocalSGD(3, "full", 0.2, 0.9, 1e-4, 5), LocalSGD()],
    "term": [
        FedProx(0.3),
        Scaffold(),
        Scaffold(momentum=0.5),
        FedNova(0.9),
        QFFL(2.0),
        FedPer(("fc.",)),
        Ditto(0.4),
        DpSgd(),
        DpSgd(0.5, 1.3, noise="secure", delta=1e-6),
    ],
    "transform": [
        ClipNorm(2.5),
        KeepLocal(("1.",)),
        KeepLocal(),
        SecAgg(),
        SecAgg("all", 3, 0.5, 40, 64, 50.0, 0.1),
        SecAgg(6, 0.75),
        LocalGaussian(),
        LocalGaussian(0.3, 4.0, "secure"),
        DistributedSkellam(),
        DistributedSkellam(neighbours="all", quantization_bits=24, bits=64, clip=0.5),
        DistributedSkellam(noise_multiplier=1.3, min_survivors=7, colluders=2, noise="secure"),
        SecureCentralGaussian(),
        SecureCentralGaussian(0.5, 2.0, "secure"),
        CKKS(),
        CKKS(key_holder=3, clip_range=0.5, min_clients=3, scale_bits=40),
        QSGD(),
        QSGD(bits=4, block=256, norm="l2", rotate=True),
        QSGD(bits=3, block=0),
        CastUpdate(),
        CastUpdate("float16"),
        FetchSGD(),
        FetchSGD(rows=3, cols=500, top_k=0.05, momentum=0.0, lr=1.0),
        PowerSGD(),
        PowerSGD(rank=4, error_feedback=False, warm_start=False),
        TopK(),
        TopK(0.05, momentum=0.9),
        TopK(0.1, error_feedback=False),
        RandomK(),
        RandomK(0.2, error_feedback=False),
        SignEF(),
        SignEF(error_feedback=False),
    ],
    "downlink": [
        Cast("float16"),
        Cast(),
        QuantizeDownlink(),
        QuantizeDownlink(4, 64),
        DeltaDownlink(),
    ],
    "aggregator": [
        WeightedMean(),
        GaussianMean(),
        GaussianMean(0.5, 1.2, denominator=30.0, noise="secure"),
        AdaptiveGaussianMean(),
        AdaptiveGaussianMean(0.2, 1.1, 0.7, 0.1, count_noise=3.0, noise="secure"),
        SecureSum(),
        CKKSSum(),
        TreeAggregatedMean(),
        TreeAggregatedMean(0.5, 3.0, restart_every=30, denominator=100.0, noise="secure"),
        CoordinateMedian(),
        CoordinateMedian(byzantine=0.2),
        TrimmedMean(),
        TrimmedMean(trim=3),
        Krum(),
        Krum(byzantine=0.25),
        MultiKrum(),
        MultiKrum(byzantine=2, selected=5),
        Bulyan(),
        Bulyan(byzantine=0.2),
        GeometricMedian(),
        GeometricMedian(byzantine=3, iterations=4, smoothing=1e-4),
        CenteredClipping(),
        CenteredClipping(tau=0.5, iterations=3, byzantine=0.1),
        NormBounding(),
        NormBounding(bound=0.3, noise_std=0.01),
        FLTrust(),
        FLTrust(root_examples=40),
        FoolsGold(),
        FoolsGold(kappa=0.5, max_history_bytes=2**20),
    ],
    "attack": [
        LabelFlip(),
        LabelFlip(fraction=0.1, source=1, target=7),
        SignFlip(scale=3.0),
        Scaling(fraction=0.3, factor=5.0),
        GaussianNoise(std=0.5),
        ALIE(),
        ALIE(omniscient=True, z=1.5),
        IPM(epsilon=0.1),
        MinMax(direction="unit", gamma_init=5.0),
        MinSum(omniscient=False, tau=1e-4),
        FangKrum(threshold=1e-4),
        FangTrimmedMean(b=3.0),
        Backdoor(
            target=2, poison_fraction=0.3, size=4, value=1.0, boost=10.0, norm_bound=2.0, alpha=0.8
        ),
    ],
    "server": [
        ServerSGD(0.5, 0.9),
        ServerAdam(0.01, beta1=0.8, beta2=0.95, tau=1e-4),
        ServerYogi(0.02),
        ServerAdagrad(0.1, beta1=0.5, tau=0.01),
    ],
}
CASES = [(kind, part) for kind, parts in EXAMPLES.items() for part in parts]


@pytest.mark.parametrize(("kind", "part"), CASES, ids=[f"{k}-{p!r}" for k, p in CASES])
def test_python_config_python_gives_an_equal_part(kind: str, part: Any) -> None:
    section = registry.part_config(kind, part)
    assert registry.build_part(kind, section, kind) == part
    again = registry.part_config(kind, registry.build_part(kind, section, kind))
    assert again == section


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_every_registered_part_has_a_round_trip_case(kind: str) -> None:
    covered = {registry.name_of(kind, type(p)) for p in EXAMPLES[kind]}
    assert covered == set(registry.names(kind))


@dataclass(frozen=True)
class Local:
    size: int = 1


def test_user_parts_are_named_by_import_path() -> None:
    from my_lab.agg import Median

    assert registry.part_config("aggregator", Median()) == {"name": "my_lab.agg:Median"}
    assert registry.build_part("aggregator", {"name": "my_lab.agg:Median"}, "a") == Median()
    assert registry.import_path(Local) == "test_registry:Local"


def test_what_cannot_be_named_says_why() -> None:
    @dataclass(frozen=True)
    class Inside:
        pass

    with pytest.raises(registry.NotNameable, match="inside a function: move it to module"):
        registry.part_config("aggregator", Inside())
    with pytest.raises(registry.NotNameable, match="is not a dataclass"):
        registry.params(object())


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"name": "clipp"}, "t.name: unknown transform 'clipp' (did you mean 'clip'?)"),
        ({"name": "clip"}, "t: "),  # max_norm is required
        ({"name": "clip", "max_norm": "big"}, "t.max_norm: Input should be a valid number"),
        ({"name": "clip", "max_norm": -1.0}, "t: ClipNorm.max_norm must be > 0, got -1.0"),
        ({"name": "clip", "max_nrm": 1.0}, "t.max_nrm: unknown parameter of ClipNorm (did you"),
        ({"name": "nope.mod:Thing"}, "t.name: cannot import 'nope.mod'"),
        ({"name": "potluck.updates:Nothing"}, "has no attribute 'Nothing'"),
        ({"mu": 1.0}, "t.name: missing or not a string"),
    ],
)
def test_bad_sections_name_what_is_wrong(section: dict[str, Any], message: str) -> None:
    with pytest.raises(registry.RegistryError) as info:
        registry.build_part("transform", section, "t")
    assert message in str(info.value)


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register("aggregator", "mean")(Local)
