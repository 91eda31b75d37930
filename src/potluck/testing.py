"""Helpers for testing parts: a run interrupted after a round and resumed as ``potluck
resume`` does, to check that a part (a user's too) keeps all it needs in its state, a
run's metrics without the wall-clock ones, to compare two runs, and a fake accelerator
(``FakeAccelerator``, ``FAKE``) to check that a part which says it runs on the updates'
device (``Need.ON_DEVICE``) does so without a GPU, and ``full_float32`` to compare a CUDA
run with a CPU one at float32 tolerance (TF32 off).

Example:
    >>> import tempfile
    >>> import torch
    >>> from potluck.config import ExperimentConfig
    >>> cfg = ExperimentConfig.from_dict({"rounds": 3, "data": {"dataset": "digits",
    ...     "num_clients": 4}, "model": {"name": "logreg"}, "sampler": {"clients_per_round": 2}})
    >>> resumed = interrupted_and_resumed(cfg, tempfile.mkdtemp(), after=1)
    >>> torch.equal(resumed.weights, run_experiment(cfg.build()).weights)
    True
"""

from __future__ import annotations

from pathlib import Path

from potluck.config import ExperimentConfig
from potluck.core.device import full_float32
from potluck.core.fake_device import FAKE, FakeAccelerator
from potluck.orchestrator import TIMING_METRICS, RunResult, resume_experiment, run_experiment
from potluck.store.sqlite import RunStore

__all__ = [
    "FAKE",
    "FakeAccelerator",
    "Interrupted",
    "full_float32",
    "interrupted_and_resumed",
    "learning",
]


class Interrupted(Exception):
    """What stops the run after its round (as a crash would, before the next one)."""


def interrupted_and_resumed(config: ExperimentConfig, root: str | Path, after: int) -> RunResult:
    """Run ``config`` into a new store at ``root``, interrupt it once round ``after`` is
    committed, rebuild the experiment from the config the store kept (as the CLI does) and
    resume it to the end; the resumed run's result."""

    def stop(rnd: int, _metrics: object) -> None:
        if rnd == after:
            raise Interrupted

    store = RunStore(root)
    try:
        run_experiment(config.build(), store, on_round=stop, progress=False)
    except Interrupted:
        pass
    else:
        raise ValueError(f"the run ended before round {after}: nothing to resume")
    (info,) = store.list_runs()
    stored = ExperimentConfig.from_dict(info.config)
    return resume_experiment(stored.build(), store, info.run_id, progress=False)


def learning(result: RunResult) -> list[dict[str, float]]:
    """Each round's metrics but the timings (``TIMING_METRICS``): equal for equal runs."""
    return [{k: v for k, v in m.items() if k not in TIMING_METRICS} for m in result.history]
