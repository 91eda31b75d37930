"""Privacy attacks an honest-but-curious server can run against potluck runs.

``capture`` keeps chosen clients' decoded updates during a run; ``inversion`` reconstructs
their examples (DLG, iDLG, Inverting Gradients); ``membership`` tests whether examples were
trained on by the final global model (loss threshold, LiRA with shadow models); ``metrics``
scores both; ``results`` stores them in the run's directory for its report; ``cli`` is
``potluck attack``. Importing this package is cheap: names load on first use.

Example:
    >>> from potluck import attacks
    >>> attacks.DLG().iterations, attacks.psnr.__module__
    (300, 'potluck.attacks.metrics')
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "Capture": "potluck.attacks.capture",
    "CapturedUpdate": "potluck.attacks.capture",
    "capture_updates": "potluck.attacks.capture",
    "AttackModel": "potluck.attacks.model",
    "DLG": "potluck.attacks.inversion",
    "IDLG": "potluck.attacks.inversion",
    "InvertingGradients": "potluck.attacks.inversion",
    "Reconstruction": "potluck.attacks.inversion",
    "analytic_labels": "potluck.attacks.inversion",
    "evaluate_reconstruction": "potluck.attacks.inversion",
    "invert": "potluck.attacks.inversion",
    "target_gradient": "potluck.attacks.inversion",
    "MembershipReport": "potluck.attacks.membership",
    "attack_membership": "potluck.attacks.membership",
    "lira_offline": "potluck.attacks.membership",
    "lira_online": "potluck.attacks.membership",
    "loss_threshold": "potluck.attacks.membership",
    "auc": "potluck.attacks.metrics",
    "psnr": "potluck.attacks.metrics",
    "roc_curve": "potluck.attacks.metrics",
    "ssim": "potluck.attacks.metrics",
    "tpr_at_fpr": "potluck.attacks.metrics",
}

if TYPE_CHECKING:
    from potluck.attacks.capture import Capture, CapturedUpdate, capture_updates
    from potluck.attacks.inversion import (
        DLG,
        IDLG,
        InvertingGradients,
        Reconstruction,
        analytic_labels,
        evaluate_reconstruction,
        invert,
        target_gradient,
    )
    from potluck.attacks.membership import (
        MembershipReport,
        attack_membership,
        lira_offline,
        lira_online,
        loss_threshold,
    )
    from potluck.attacks.metrics import auc, psnr, roc_curve, ssim, tpr_at_fpr
    from potluck.attacks.model import AttackModel


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'potluck.attacks' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "DLG",
    "IDLG",
    "AttackModel",
    "Capture",
    "CapturedUpdate",
    "InvertingGradients",
    "MembershipReport",
    "Reconstruction",
    "analytic_labels",
    "attack_membership",
    "auc",
    "capture_updates",
    "evaluate_reconstruction",
    "invert",
    "lira_offline",
    "lira_online",
    "loss_threshold",
    "psnr",
    "roc_curve",
    "ssim",
    "target_gradient",
    "tpr_at_fpr",
]
