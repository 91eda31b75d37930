"""The progress bar of a run, the same from the CLI and from ``run_experiment``: round,
cohort, train loss, test accuracy, and the privacy spent or the virtual time where a run has
them. Where no terminal is attached the bar is not drawn; the CLI then prints one line a
round instead (``lines=True``), the Python API nothing.

Example:
    >>> fmt(0.123456), fmt(12.0), fmt(None), duration(93784.5)
    ('0.1235', '12', '', '1d 02:03:04')
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

LINE_KEYS = (
    "cohort_size", "train_loss", "test_accuracy", "fed_accuracy", "epsilon", "virtual_time_s",
    "round_seconds",
)  # fmt: skip


def fmt(value: Any) -> str:
    """A metric for people: four significant digits, integers as integers, ``nan`` kept."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def duration(seconds: float) -> str:
    """Seconds as ``1d 02:03:04`` or ``02:03:04.5``.

    Example:
        >>> duration(4.25)
        '00:00:04.2'
    """
    days, rest = divmod(float(seconds), 86_400.0)
    h, rest = divmod(rest, 3600.0)
    m, sec = divmod(rest, 60.0)
    if days:
        return f"{int(days)}d {int(h):02d}:{int(m):02d}:{int(sec):02d}"
    return f"{int(h):02d}:{int(m):02d}:{sec:04.1f}"


class RoundProgress:
    """A rich progress bar fed by the round callback (``with RoundProgress(...) as on_round``),
    from round ``done`` of ``rounds``; without a terminal, one line a round if ``lines``."""

    def __init__(
        self, rounds: int, done: int, console: Console | None = None, *, lines: bool = False
    ) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.bar = Progress(
            TextColumn("round {task.completed:>3.0f}/{task.total:.0f}"),
            BarColumn(),
            TextColumn("cohort {task.fields[cohort]}"),
            TextColumn("train loss {task.fields[loss]}"),
            TextColumn("test acc {task.fields[acc]}"),
            TextColumn("{task.fields[privacy]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not sys.stderr.isatty() and not self.console.is_terminal,
        )
        self.task = self.bar.add_task(
            "rounds", total=rounds, completed=done, cohort="-", loss="-", acc="-", privacy=""
        )
        self.lines = lines and self.bar.disable

    def __enter__(self) -> Any:
        self.bar.__enter__()
        return self.update

    def update(self, rnd: int, metrics: Mapping[str, Any]) -> None:
        """Show round ``rnd``'s metrics."""
        acc = metrics.get("test_accuracy", metrics.get("fed_accuracy"))
        fields: dict[str, Any] = {
            "cohort": fmt(int(metrics["cohort_size"])),
            "loss": fmt(metrics["train_loss"]),
        }
        if acc is not None:
            fields["acc"] = fmt(acc)
        extra = []
        if "epsilon" in metrics:  # a private run: the privacy spent so far
            extra.append(f"epsilon {fmt(metrics['epsilon'])}")
        if "virtual_time_s" in metrics:  # on a virtual clock: its time
            extra.append(f"virtual {duration(metrics['virtual_time_s'])}")
        fields["privacy"] = "  ".join(extra)
        self.bar.update(self.task, completed=rnd, **fields)
        if self.lines:
            shown = [k for k in LINE_KEYS if k in metrics]
            line = " ".join(f"{k}={fmt(metrics[k])}" for k in shown)
            self.console.print(f"round {rnd} {line}", highlight=False, soft_wrap=True)

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)  # type: ignore[arg-type]
