"""``Algorithm``: the five parts of DESIGN.md, composed and checked when built.

A sampler (plus a stragglers model), local training (a base optimizer and a chain of
gradient terms), update transforms (and downlink transforms of the broadcast), an aggregator
and a server optimizer. Each part has a *namespace* (``"terms.0.fedprox"``) under which its
server state is checkpointed and its client state stored. A new method replaces one part
and reuses the rest; an impossible combination is refused here, naming both parts.

Named algorithms (``fedavg``, ``fedprox``, ...) are presets: registered functions of their
own parameters that return the parts they set (``PRESETS``), used by the Python functions
of the same names and by the ``[algorithm]`` section of a config.

Example:
    >>> from potluck.algorithms import fedavg
    >>> algo = fedavg(clients_per_round=10, epochs=5, batch_size=10, lr=0.1)
    >>> algo.name, algo.local.epochs, algo.server.lr, [ns for ns, _ in algo.parts()][:3]
    ('fedavg', 5, 1.0, ['sampler', 'stragglers', 'local'])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from potluck.aggregate.mean import WeightedMean
from potluck.client.sgd import LocalSGD
from potluck.core import registry
from potluck.core.parts import (
    Aggregator,
    Downlink,
    GradientTerm,
    LocalOptimizer,
    PoisoningAttack,
    Sampler,
    ServerOptimizer,
    Transform,
    composition_problems,
)
from potluck.optim.sgd import ServerSGD
from potluck.sampling.stragglers import Stragglers
from potluck.sampling.uniform import UniformSampler

if TYPE_CHECKING:
    from potluck.client.program import ClientProgram
    from potluck.core.task import Task
    from potluck.data.federation import Federation
    from potluck.monitor.drift import DriftScenario, SummaryOptions

# slot -> (registry kind, protocol, config section); lists are the chains
SLOTS: dict[str, tuple[str, Any, str]] = {
    "sampler": ("sampler", Sampler, "sampler"),
    "stragglers": ("stragglers", None, "stragglers"),
    "local": ("optimizer", LocalOptimizer, "client"),
    "terms": ("term", GradientTerm, "terms"),
    "transforms": ("transform", Transform, "transforms"),
    "downlink": ("downlink", Downlink, "downlink"),
    "aggregator": ("aggregator", Aggregator, "aggregator"),
    "server": ("server", ServerOptimizer, "server"),
}
CHAINS = ("terms", "transforms", "downlink")


@dataclass(frozen=True)
class Algorithm:
    """The parts of a federated algorithm; refused when built if they cannot work together."""

    name: str = "fedavg"
    sampler: Sampler = field(default_factory=UniformSampler)
    local: LocalOptimizer = field(default_factory=LocalSGD)
    terms: tuple[GradientTerm, ...] = ()
    transforms: tuple[Transform, ...] = ()
    downlink: tuple[Downlink, ...] = ()
    aggregator: Aggregator = field(default_factory=WeightedMean)
    server: ServerOptimizer = field(default_factory=ServerSGD)
    stragglers: Stragglers = field(default_factory=Stragglers)

    def __post_init__(self) -> None:
        for chain in CHAINS:
            value = getattr(self, chain)
            if not isinstance(value, tuple):
                object.__setattr__(self, chain, tuple(value))
        problems = [p for ns, part in self.parts() if (p := _protocol_problem(ns, part))]
        problems += composition_problems(self.parts())
        if problems:
            raise ValueError(f"algorithm {self.name!r} cannot run: " + "; ".join(problems))

    def parts(self) -> list[tuple[str, Any]]:
        """Every part with its namespace, in the order a round uses them.

        Example:
            >>> from potluck.algorithms import scaffold
            >>> [ns for ns, _ in scaffold(clients_per_round=2).parts()][3]
            'terms.0.scaffold'
        """
        out: list[tuple[str, Any]] = []
        for slot, (kind, _, _) in SLOTS.items():
            value = getattr(self, slot)
            if slot in CHAINS:
                out += [(f"{slot}.{i}.{_short(kind, p)}", p) for i, p in enumerate(value)]
            else:
                out.append((slot, value))
        return out

    def client_program(
        self,
        task: Task,
        federation: Federation,
        *,
        seed: int,
        finetune_epochs: int = 0,
        attack: PoisoningAttack | None = None,
        attackers: Sequence[int] | None = None,
        summaries: SummaryOptions | None = None,
        drift: DriftScenario | None = None,
    ) -> ClientProgram:
        """What every client of a run executes: the same on every engine and on a deployed
        site (which passes a federation holding only its own data). ``finetune_epochs > 0``
        also fine-tunes the global model locally before evaluating it; ``attack`` makes its
        ``attackers`` (by default the attack's own draw) poison their data and updates;
        ``summaries`` is what a client shares of its data (``monitor.drift``), ``drift``
        the drift injected into its data.

        Example:
            >>> import torch
            >>> from potluck.algorithms import fedavg
            >>> from potluck.core.task import Task
            >>> from potluck.data import Federation
            >>> fed = Federation.from_client_data([(torch.randn(8, 2), torch.arange(8) % 2)])
            >>> algo = fedavg(clients_per_round=1)
            >>> program = algo.client_program(Task(lambda: torch.nn.Linear(2, 2)), fed, seed=0)
            >>> program.spec.size
            6
        """
        from potluck.client.program import ClientProgram

        return ClientProgram(
            task,
            federation,
            self,
            seed=seed,
            finetune_epochs=finetune_epochs,
            attack=attack,
            attackers=attackers,
            summaries=summaries,
            drift=drift,
        )

    def to_config(self) -> dict[str, Any]:
        """The config sections of this algorithm (``algorithm``, ``sampler``, ``client``,
        ``terms``, ...); ``from_config`` rebuilds an equal algorithm. ``NotNameable`` if a
        part has no name (a class defined in ``__main__`` or inside a function).

        Example:
            >>> from potluck.algorithms import fedprox
            >>> cfg = fedprox(mu=0.5, clients_per_round=3).to_config()
            >>> cfg["algorithm"], cfg["terms"]
            ({'name': 'fedprox'}, [{'name': 'fedprox', 'mu': 0.5}])
            >>> from_config(cfg) == fedprox(mu=0.5, clients_per_round=3)
            True
        """
        out: dict[str, Any] = {"algorithm": _label_config(self.name)}
        for slot, (kind, _, section) in SLOTS.items():
            value = getattr(self, slot)
            if slot in CHAINS:
                out[section] = [registry.part_config(kind, p) for p in value]
            else:
                out[section] = registry.part_config(kind, value)
        return out


def _short(kind: str, part: Any) -> str:
    try:
        name = registry.name_of(kind, type(part))
    except registry.NotNameable:
        return type(part).__name__
    return name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def _protocol_problem(ns: str, part: Any) -> str | None:
    slot = ns.split(".", 1)[0]
    protocol = SLOTS[slot][1]
    if protocol is None or isinstance(part, protocol):
        return None
    missing = [
        name for name in dir(protocol) if not name.startswith("_") and not hasattr(part, name)
    ]
    return f"{ns} ({type(part).__name__}) is not a {protocol.__name__}: it lacks {missing}"


def _label_config(name: str) -> dict[str, Any]:
    return (
        {"name": name} if name in registry.names("algorithm") else {"name": "fedavg", "label": name}
    )


# ---- presets: the named algorithms --------------------------------------------------------

Preset = Callable[..., dict[str, Any]]
PRESETS: dict[str, Preset] = {}


def preset(name: str) -> Callable[[Preset], Preset]:
    """Register a named algorithm: a function of its own parameters returning the parts it
    sets (slot -> part, or a tuple for ``terms`` / ``transforms`` / ``downlink``)."""

    def add(fn: Preset) -> Preset:
        registry.register("algorithm", name)(fn)
        PRESETS[name] = fn
        return fn

    return add


def from_config(
    sections: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> Algorithm:
    """The algorithm of config ``sections``: ``algorithm`` names a preset (``name``, its own
    parameters, an optional ``label``); then each section given overrides the preset's part
    in that slot: with the same part (or no ``name``), its parameters update the preset's;
    with another name it replaces it. A chain given (``terms``, ...) replaces the preset's.
    ``defaults``: sections to start from (the default experiment's), below the preset.

    Example:
        >>> algo = from_config({"algorithm": {"name": "fedprox", "mu": 0.1},
        ...                     "stragglers": {"fraction": 0.5}})
        >>> algo.terms, algo.stragglers
        ((FedProx(mu=0.1),), Stragglers(fraction=0.5, mode='partial'))
    """
    head = dict(sections.get("algorithm") or {"name": "fedavg"})
    name = head.pop("name", "fedavg")
    label = head.pop("label", None)
    fn = registry.lookup("algorithm", name, "algorithm")
    slots: dict[str, Any] = {}
    for slot, (kind, _, section) in SLOTS.items():
        if defaults and section in defaults:
            slots[slot] = _section_part(slot, kind, defaults[section], None, section)
    set_by_preset = registry.construct(fn, head, "algorithm", label=f"algorithm {name!r}")
    replaced = [SLOTS[s][2] for s in set_by_preset if s in CHAINS and SLOTS[s][2] in sections]
    if head and replaced:
        raise registry.RegistryError(
            f"algorithm: parameters {sorted(head)} of {name!r} set its "
            f"{', '.join(replaced)}, which the config replaces: set them there instead"
        )
    slots.update(set_by_preset)
    for slot, (kind, _, section) in SLOTS.items():
        if section in sections:
            slots[slot] = _section_part(slot, kind, sections[section], slots.get(slot), section)
    return Algorithm(name=label or name, **slots)


def _section_part(slot: str, kind: str, given: Any, base: Any, where: str) -> Any:
    if slot in CHAINS:
        if not isinstance(given, list):
            raise registry.RegistryError(f"{where}: expected a list of tables, got {given!r}")
        return tuple(
            registry.build_part(kind, item, f"{where}[{i}]") for i, item in enumerate(given)
        )
    if not isinstance(given, Mapping):
        raise registry.RegistryError(f"{where}: expected a table, got {given!r}")
    section = dict(given)
    if base is not None:
        base_config = registry.part_config(kind, base)
        if section.get("name", base_config["name"]) == base_config["name"]:
            section = {**base_config, **section}
    section.setdefault("name", _default_name(kind))
    return registry.build_part(kind, section, where)


def _default_name(kind: str) -> str:
    defaults = {
        "sampler": UniformSampler,
        "stragglers": Stragglers,
        "optimizer": LocalSGD,
        "aggregator": WeightedMean,
        "server": ServerSGD,
    }
    return registry.name_of(kind, defaults[kind])
