"""Attack results in a run's directory: JSON (and PNG pictures of reconstructions next to
the originals) under ``<run dir>/attacks/``, which the run's HTML report shows
(``report.attacks``), and the report written again to include them.

Example:
    >>> import tempfile, torch
    >>> from potluck.core.task import Task
    >>> from potluck.attacks.inversion import Reconstruction
    >>> model = AttackModel(Task(lambda: torch.nn.Linear(4, 2)), (4,), 2, (0.0, 1.0))
    >>> rec = Reconstruction("dlg", torch.zeros(1, 4), torch.tensor([1]), 0.0, 10)
    >>> info = {"client": 3, "round": 2, "protection": "none"}
    >>> path = save_inversion(Path(tempfile.mkdtemp()), model, rec, torch.ones(1, 4),
    ...                       torch.tensor([1]), {"psnr": 0.0}, info)
    >>> path.name, sorted(p.name for p in path.parent.iterdir())[0]
    ('inversion-r2-c3-dlg.json', 'inversion-r2-c3-dlg-original.png')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from potluck.attacks.model import AttackModel
from potluck.core.files import atomic_write
from potluck.report.attacks import ATTACKS_DIR
from potluck.report.png import image_row, png_bytes

if TYPE_CHECKING:
    from potluck.algorithms.base import Algorithm
    from potluck.attacks.inversion import Reconstruction
    from potluck.attacks.membership import MembershipReport
    from potluck.store.sqlite import RunStore

__all__ = ["protection", "refresh_report", "save_inversion", "save_membership"]

SCALE_TO = 64  # pictures are upscaled to about this many pixels a side


def protection(algorithm: Algorithm) -> str:
    """What stands between a client's update and the server: its transforms, or "none".
    Central DP's noise is added to the sum on the server, so it does not count here.

    Example:
        >>> from potluck.algorithms import fedsgd
        >>> from potluck.updates.base import ClipNorm
        >>> protection(fedsgd()), protection(fedsgd(transforms=(ClipNorm(1.0),)))
        ('none', 'ClipNorm(max_norm=1.0, per_layer=False)')
    """
    return ", ".join(repr(t) for t in algorithm.transforms) or "none"


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    atomic_write(path, text.encode())


def _picture(model: AttackModel, x: torch.Tensor, path: Path) -> str:
    images = model.images(x.detach().float()).numpy()
    scale = max(1, SCALE_TO // max(images.shape[2:]))
    atomic_write(path, png_bytes(image_row(images, model.bounds, scale=scale)))
    return path.name


def save_inversion(
    run_dir: Path,
    model: AttackModel,
    reconstruction: Reconstruction,
    x: torch.Tensor,
    y: torch.Tensor,
    evaluation: Mapping[str, Any],
    info: Mapping[str, Any],
) -> Path:
    """Write ``inversion-r<round>-c<client>-<method>.json`` (``info``, the evaluation, the
    labels) and, for image inputs, PNGs of the client's examples (paired with the
    reconstructions, in their order) and of the reconstructions; the JSON's path."""
    folder = Path(run_dir) / ATTACKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"inversion-r{info['round']}-c{info['client']}-{reconstruction.method}"
    matched = torch.as_tensor(evaluation.get("matched", range(len(reconstruction.x))))
    images = {}
    if model.image_shape is not None:
        images = {
            "original": _picture(model, x[matched], folder / f"{stem}-original.png"),
            "reconstruction": _picture(
                model, reconstruction.x, folder / f"{stem}-reconstruction.png"
            ),
        }
    data = {
        "attack": "inversion",
        "method": reconstruction.method,
        **info,
        "batch": len(reconstruction.x),
        "iterations": reconstruction.iterations,
        "loss": reconstruction.loss,
        **evaluation,
        "labels": reconstruction.labels.tolist(),
        "true_labels": y[matched].tolist(),
        "images": images,
    }
    path = folder / f"{stem}.json"
    _write_json(path, data)
    return path


def save_membership(run_dir: Path, report: MembershipReport, info: Mapping[str, Any]) -> Path:
    """Write ``membership.json``: the report (``MembershipReport.to_json``) and ``info``."""
    folder = Path(run_dir) / ATTACKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "membership.json"
    _write_json(path, {**report.to_json(), **info})
    return path


def refresh_report(store: RunStore, run_id: str) -> Path:
    """Write the run's ``report.html`` again (as at the end of the run, now with its
    attack results); its path."""
    from potluck.report.plots import write_report

    info = store.get_run(run_id)
    named = info.name and info.name != run_id
    title = f"potluck run {run_id}" + (f" ({info.name})" if named else "")
    paths = write_report(
        info.run_dir,
        store.rounds(run_id),
        title=title,
        summary=info.summary,
        config=info.config,
        clients=store.client_metrics(run_id),
    )
    return paths["html"]
