"""``potluck attack``: privacy attacks by an honest-but-curious server against a run.

TARGET is an experiment TOML file (it is run and stored, the attack's results go into its
run directory) or a stored run (id, id prefix or name; rebuilt from its stored config).

Example (shell):
    potluck attack invert exp.toml --round 1 --client 3 --method ig
    potluck attack invert RUN --round 5 --method dlg          # replays rounds 1-5 in memory
    potluck attack membership RUN --shadows 8
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from potluck.attacks.capture import CapturedUpdate
    from potluck.orchestrator import Experiment, RunResult
    from potluck.store.sqlite import RunStore

attack_app = typer.Typer(
    help="Privacy attacks by an honest-but-curious server: gradient inversion of a client's "
    "update, membership inference against the final global model.",
    no_args_is_help=True,
)

TargetArg = Annotated[
    str, typer.Argument(help="an experiment TOML file (run and stored), or a stored run")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a field of a TOML experiment (repeatable)"),
]
StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="run store directory (default: run.store)")
]
SeedOpt = Annotated[int, typer.Option(help="the attack's own seed (dummy data, shadows)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


class MethodArg(StrEnum):
    dlg = "dlg"
    idlg = "idlg"
    ig = "ig"


class _Target:
    """The experiment under attack and where its run is stored."""

    def __init__(self, target: str, overrides: list[str] | None, store: Path | None) -> None:
        from potluck import cli

        self.file = Path(target).is_file()
        if self.file:
            cfg = cli._load_config(Path(target), overrides)
            if store is not None:
                run = cfg.run.model_copy(update={"store": str(store)})
                cfg = cfg.model_copy(update={"run": run})
            self.store: RunStore = cli._store(cfg.run.store)
            self.run_id = ""
        else:
            if overrides:
                cli._fail("--set applies to a TOML experiment, not to a stored run")
            self.store = cli._store(store or cli.default_store())
            self.run_id, info = cli._lookup(self.store, target)
            why = info.config.get("not_resumable") if info.config else "it has no stored config"
            if why:
                cli._fail(f"run {self.run_id} cannot be rebuilt from its stored config: {why}")
            cfg = cli._load_config_dict(info.config)
        self.experiment: Experiment = cli._build(cfg)

    @property
    def run_dir(self) -> Path:
        return self.store.get_run(self.run_id).run_dir

    def run(self, **capture: Any) -> tuple[RunResult, Any]:
        """Run the TOML experiment through the store, with a capture if asked."""
        from potluck import cli
        from potluck.attacks.capture import capture_updates

        exp = self.experiment
        with cli._refused(), cli._progress(exp.rounds, 0) as on_round:
            result, captured = capture_updates(exp, store=self.store, on_round=on_round, **capture)
        self.run_id = result.run_id or ""
        cli.console.print(f"run [bold]{self.run_id}[/] stored in {result.run_dir}")
        return result, captured


@attack_app.command("invert")
def invert_cmd(
    target: TargetArg,
    round_: Annotated[int, typer.Option("--round", help="the round of the update")],
    client: Annotated[
        int | None, typer.Option(help="the client (default: the round's first)")
    ] = None,
    method: Annotated[MethodArg, typer.Option(help="dlg, idlg or ig")] = MethodArg.ig,
    iterations: Annotated[int | None, typer.Option(help="optimiser iterations")] = None,
    batch: Annotated[
        int | None, typer.Option(help="examples to reconstruct (default: num_examples)")
    ] = None,
    tv: Annotated[float | None, typer.Option(help="ig: total-variation weight")] = None,
    restarts: Annotated[int, typer.Option(help="ig: restarts, the best kept")] = 1,
    seed: SeedOpt = 0,
    set_: SetOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reconstruct a client's training examples from its update of one round (DLG, iDLG or
    Inverting Gradients), scored by PSNR, SSIM and label accuracy against the true ones;
    results and pictures go into the run's directory and its report."""
    from potluck import cli
    from potluck.attacks import inversion
    from potluck.attacks.model import AttackModel
    from potluck.attacks.results import protection, refresh_report, save_inversion

    aim = _Target(target, set_, store)
    exp = aim.experiment
    if not 1 <= round_ <= exp.rounds:
        cli._fail(f"--round must lie in 1..{exp.rounds} (the experiment's rounds), got {round_}")
    with cli._refused():
        model = AttackModel.of(exp)
        if model.image_shape is None:
            cli._fail(f"inputs of shape {model.input_shape} are not images: nothing to picture")
        options: dict[str, Any] = {} if iterations is None else {"iterations": iterations}
        if method is MethodArg.ig:
            options.update({"restarts": restarts} | ({} if tv is None else {"tv": tv}))
        attack = inversion.METHODS[method.value](**options)
        clients = None if client is None else [client]
        if aim.file:
            _, capture = aim.run(clients=clients, rounds=[round_])
        else:
            with cli._damage_reported():
                _, capture = _replay(exp, clients, round_)
        update = _chosen(capture, client, round_)
        rec = inversion.invert(update, model, attack, batch=batch, seed=seed)
        data = exp.federation.client(update.client)
        x, y = _tensor(data.x_train), _tensor(data.y_train)
        if len(rec.x) > len(x):
            cli._fail(f"--batch {len(rec.x)} exceeds client {update.client}'s {len(x)} examples")
        evaluation = inversion.evaluate_reconstruction(model, rec, x, y)
    info = {
        "client": update.client,
        "round": round_,
        "protection": protection(exp.algorithm),
        "withheld_counts": update.withheld,
        "seed": seed,
    }
    path = save_inversion(aim.run_dir, model, rec, x, y, evaluation, info)
    report = refresh_report(aim.store, aim.run_id)
    if as_json:
        print(json.dumps(json.loads(path.read_text()), indent=2))
        return
    cli.console.print(
        f"{method.value} on client {update.client}'s update of round {round_} "
        f"({len(rec.x)} examples, protection: {info['protection']}): PSNR "
        f"{cli._fmt(evaluation['psnr'])} dB, SSIM {cli._fmt(evaluation['ssim'])}, label "
        f"accuracy {cli._fmt(evaluation['label_accuracy'])}",
        highlight=False,
    )
    cli.console.print(f"saved {path} (report: {report})")


def _replay(exp: Experiment, clients: list[int] | None, rnd: int) -> tuple[RunResult, Any]:
    from potluck import cli
    from potluck.attacks.capture import capture_updates

    cli.console.print(f"replaying rounds 1-{rnd} of the stored run (in memory)")
    with cli._progress(rnd, 0) as on_round:
        return capture_updates(exp, clients=clients, rounds=[rnd], through=rnd, on_round=on_round)


def _chosen(capture: Any, client: int | None, rnd: int) -> CapturedUpdate:
    from potluck import cli

    if client is None:
        if not capture.updates:
            cli._fail(f"round {rnd} has no accepted update to invert")
        return min(capture.updates, key=lambda u: u.client)
    try:
        return capture.get(client, rnd)
    except LookupError as exc:
        cli._fail(str(exc))


def _tensor(a: Any) -> Any:
    import torch

    return torch.from_numpy(a)


@attack_app.command("membership")
def membership_cmd(
    target: TargetArg,
    shadows: Annotated[
        int, typer.Option(help="shadow models for LiRA (0: the loss threshold only)")
    ] = 8,
    max_examples: Annotated[
        int, typer.Option(help="at most this many members, and as many non-members")
    ] = 5000,
    seed: SeedOpt = 0,
    set_: SetOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Membership inference against the run's final global model: the loss threshold (Yeom
    et al.) and online and offline LiRA (Carlini et al.) with shadow runs of the same
    experiment; AUC, advantage and TPR at 1% and 0.1% FPR go into the run's directory and
    its report."""
    from rich.table import Table

    from potluck import cli
    from potluck.attacks.membership import attack_membership, summary_rows
    from potluck.attacks.results import refresh_report, save_membership

    aim = _Target(target, set_, store)
    exp = aim.experiment
    if aim.file:
        result, _ = aim.run()
        weights, at_round = result.weights, len(result.history)
        epsilon = result.final.get("epsilon")
    else:
        with cli._damage_reported():
            point = aim.store.latest_checkpoint(aim.run_id)
            rounds = aim.store.rounds(aim.run_id)
        if point is None:
            cli._fail(f"run {aim.run_id} has no checkpoint: no global model to attack")
        at_round, weights = point[0], point[1].tensors["global"]
        epsilon = next((r.metrics.get("epsilon") for r in rounds if r.round == at_round), None)
    cli.console.print(
        f"attacking the global model of round {at_round}; {shadows} shadow runs", highlight=False
    )

    def shadow_done(k: int, total: int) -> None:
        cli.console.print(f"shadow {k}/{total} trained", highlight=False)

    with cli._refused():
        report = attack_membership(
            exp, weights, shadows=shadows, max_examples=max_examples, seed=seed,
            on_shadow=shadow_done,
        )  # fmt: skip
    info = {"round": at_round, "epsilon": epsilon, "seed": seed, "max_examples": max_examples}
    path = save_membership(aim.run_dir, report, info)
    html = refresh_report(aim.store, aim.run_id)
    if as_json:
        print(json.dumps(json.loads(path.read_text()), indent=2))
        return
    table = Table("method", "AUC", "advantage", "TPR at 1% FPR", "TPR at 0.1% FPR")
    for method, row in summary_rows(report):
        cells = (row["auc"], row["advantage"], row["tpr_at_1%_fpr"], row["tpr_at_0.1%_fpr"])
        table.add_row(method, *(cli._fmt(v) for v in cells))
    cli.console.print(table)
    cli.console.print(f"saved {path} (report: {html})")
