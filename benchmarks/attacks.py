"""Privacy attacks with and without DP (issue 14): reconstruction quality of DLG, iDLG and
Inverting Gradients from a client's update, and membership-inference advantage against the
final global model.

**Inversion** (``--part inversion``). Clients holding one image each (the first 4 training
images of Fashion-MNIST and of digits), FedSGD, the 784-64-10 (64-64-10) MLP at its
initial weights; the server captures round 1's decoded updates (``attacks.capture``) and
inverts each: DLG (300 L-BFGS iterations), iDLG (300), Inverting Gradients (1,000 Adam
iterations, TV 1e-3). Protections: none; the update clipped to norm 1, which is what the
server sees under central DP (its noise is added to the sum); local DP (``local_dp``, clip 1)
with noise multiplier 0.01, 0.1 and 1. Reported per cell: mean and median PSNR, how many of
the 4 images exceed 30 dB ("recovered"), SSIM and label accuracy; and the PSNR of the
dataset's mean image (an attacker's guess without the update). A picture of the originals
and the IG reconstructions per protection: ``benchmarks/plots/attacks_inversion_<data>.png``.

**Membership** (``--part membership``). Fashion-MNIST, 200 users of 10 training images (the
first 2,000), held-out users from the first 2,000 test images; Poisson sampling q = 0.25
(50 users a round), 30 rounds, 10 local epochs of batch-10 SGD (lr 0.05), the MLP; no DP
(FedAvg with the same sampler), and DP-FedAvg (clip 1) with the noise calibrated to epsilon
8 and 1 at delta 1e-5 (``privacy.target_epsilon``). Attacks: loss threshold, and online and
offline LiRA with 4 shadow runs each (user-level in/out: every user in 2); 2,000 members
against 2,000 non-members. Reported: AUC, advantage, TPR at 1% and 0.1% FPR (the latter is
below the resolution of 2,000 non-members: 2 false positives), test accuracy.

Run from the repository root (about 3 + 5 minutes on 2 cores, one torch thread):
    .venv/bin/python benchmarks/attacks.py
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from _common import REPO, header, write_result

from potluck import Evaluation, Experiment, Task
from potluck.algorithms import dp_fedavg, fedavg, fedsgd
from potluck.attacks.capture import capture_updates
from potluck.attacks.inversion import (
    DLG,
    IDLG,
    InvertingGradients,
    evaluate_reconstruction,
    invert,
)
from potluck.attacks.membership import attack_membership
from potluck.attacks.metrics import psnr
from potluck.attacks.model import AttackModel, feature_box
from potluck.data import Federation
from potluck.data.sources import load_source
from potluck.models.zoo import build_model
from potluck.orchestrator import run_experiment
from potluck.privacy.ledger import PrivacyBudget
from potluck.privacy.local import LocalGaussian
from potluck.report.png import image_row, png_bytes
from potluck.sampling.poisson import PoissonSampler
from potluck.updates.base import ClipNorm

IMAGES = 4
RECOVERED_DB = 30.0  # "recovered": as in tests/attacks/test_inversion.py
PROTECTIONS: list[tuple[str, tuple[Any, ...]]] = [
    ("none", ()),
    ("clip 1 (central DP: the server sees this)", (ClipNorm(1.0),)),
    ("local DP, clip 1, z = 0.01", (LocalGaussian(1.0, 0.01),)),
    ("local DP, clip 1, z = 0.1", (LocalGaussian(1.0, 0.1),)),
    ("local DP, clip 1, z = 1", (LocalGaussian(1.0, 1.0),)),
]
METHODS = [DLG(iterations=300), IDLG(iterations=300), InvertingGradients(iterations=1000, tv=1e-3)]


def _clients(source: Any, count: int, each: int, test: int) -> Federation:
    x, y = source.train.features(np.arange(count * each)), source.train.y[: count * each]
    tx, ty = source.test.features(np.arange(test)), source.test.y[:test]
    split = [(x[i * each : (i + 1) * each], y[i * each : (i + 1) * each]) for i in range(count)]
    return Federation.from_client_data(split, test=(tx, ty), num_classes=source.num_classes)


def _mlp_task(source: Any) -> Task:
    shape, classes = source.input_shape, source.num_classes
    return Task(lambda: build_model("mlp", input_shape=shape, num_classes=classes), name="mlp")


def inversion(dataset: str) -> tuple[list[dict[str, Any]], list[float]]:
    source = load_source(dataset)
    fed = _clients(source, IMAGES, 1, 100)
    task = _mlp_task(source)
    rows, pictures = [], []
    truth = [torch.from_numpy(np.ascontiguousarray(fed.client(c).x_train)) for c in range(IMAGES)]
    labels = [torch.from_numpy(fed.client(c).y_train) for c in range(IMAGES)]
    model = AttackModel(task, source.input_shape, source.num_classes, feature_box(source))
    for name, transforms in PROTECTIONS:
        algo = fedsgd(clients_per_round=IMAGES, lr=0.1, transforms=transforms)
        exp = Experiment(task, fed, algo, 1, evaluation=Evaluation(centralized=False))
        _, capture = capture_updates(exp, rounds=[1])
        for method in METHODS:
            scores, t0 = [], time.perf_counter()
            for c in range(IMAGES):
                rec = invert(capture.get(c, 1), model, method)
                scores.append(evaluate_reconstruction(model, rec, truth[c], labels[c]))
                if method.name == "ig":
                    pictures.append(rec.x)
            row = {
                "dataset": dataset,
                "protection": name,
                "method": method.name,
                "psnr": float(np.mean([s["psnr"] for s in scores])),
                "psnr_median": float(np.median([s["psnr"] for s in scores])),
                "recovered": sum(s["psnr"] > RECOVERED_DB for s in scores),
                "psnr_per_image": [s["psnr"] for s in scores],
                "ssim": float(np.mean([s["ssim"] for s in scores])),
                "label_accuracy": float(np.mean([s["label_accuracy"] for s in scores])),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(row, flush=True)
    _picture(model, torch.cat(truth), pictures, dataset)
    all_x = torch.from_numpy(source.train.features(np.arange(min(len(source.train), 10000))))
    mean = model.images(all_x.mean(0, keepdim=True).double())
    baseline = [psnr(mean, model.images(t.double()), model.data_range) for t in truth]
    return rows, baseline


def _picture(model: AttackModel, truth: torch.Tensor, ig: list[torch.Tensor], name: str) -> None:
    """Originals on top, then one row of IG reconstructions per protection."""
    scale = max(1, 56 // max(model.image_shape[1:]))  # type: ignore[index]
    rows = [image_row(model.images(truth).numpy(), model.bounds, scale)]
    for k in range(len(PROTECTIONS)):
        batch = torch.cat(ig[k * IMAGES : (k + 1) * IMAGES])
        rows.append(image_row(model.images(batch).numpy(), model.bounds, scale))
    gap = np.full((4, rows[0].shape[1]), 255, np.uint8)
    stacked = np.concatenate([part for r in rows for part in (r, gap)][:-1])
    out = REPO / "benchmarks" / "plots" / f"attacks_inversion_{name}.png"
    out.write_bytes(png_bytes(stacked))
    print(out)


USERS, EACH, RATE, ROUNDS, EPOCHS, SHADOWS = 200, 10, 0.25, 30, 10, 4


def membership(epsilons: list[float | None]) -> list[dict[str, Any]]:
    source = load_source("fashion_mnist")
    fed = _clients(source, USERS, EACH, USERS * EACH)
    task = _mlp_task(source)
    local = {"epochs": EPOCHS, "batch_size": EACH, "lr": 0.05}
    rows = []
    for eps in epsilons:
        if eps is None:
            algo, budget = replace(fedavg(**local), sampler=PoissonSampler(RATE)), None
        else:
            algo = dp_fedavg(rate=RATE, clip=1.0, **local)
            budget = PrivacyBudget(delta=1e-5, target_epsilon=eps)
        exp = Experiment(task, fed, algo, ROUNDS, privacy=budget, engine="vectorized",
                         evaluation=Evaluation(every=ROUNDS))  # fmt: skip
        t0 = time.perf_counter()
        target = run_experiment(exp)
        report = attack_membership(exp, target.weights, shadows=SHADOWS, max_examples=None)
        z = getattr(exp.algorithm.aggregator, "noise_multiplier", None)
        row = {
            "target_epsilon": eps,
            "epsilon_spent": target.final.get("epsilon"),
            "noise_multiplier": z,
            "test_accuracy": target.final["test_accuracy"],
            **report.target,
            "methods": report.summary(),
            "members": int(report.is_member.sum()),
            "nonmembers": int((~report.is_member).sum()),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("inversion", "membership", "all"), default="all")
    parser.add_argument("--epsilons", default="inf,8,1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = header("attacks")
    if args.part in ("inversion", "all"):
        result["inversion"], result["mean_image_psnr"] = [], {}
        for dataset in ("digits", "fashion_mnist"):
            rows, baseline = inversion(dataset)
            result["inversion"] += rows
            result["mean_image_psnr"][dataset] = baseline
    if args.part in ("membership", "all"):
        epsilons = [None if e == "inf" else float(e) for e in args.epsilons.split(",")]
        result["membership"] = membership(epsilons)
    result["settings"] = {
        **vars(args),
        "images": IMAGES,
        "membership": {"users": USERS, "examples_each": EACH, "rate": RATE, "rounds": ROUNDS,
                       "epochs": EPOCHS, "shadows": SHADOWS},
    }  # fmt: skip
    name = "attacks" if args.part == "all" else f"attacks_{args.part}"
    print(write_result(name, result))


if __name__ == "__main__":
    main()
