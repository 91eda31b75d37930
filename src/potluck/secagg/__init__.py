"""Secure aggregation: SecAgg+ (Bell et al. 2020) and SecAgg (Bonawitz et al. 2017) in the
five-part structure, the ``SecAgg`` transform and the ``SecureSum`` aggregator (``parts``);
the protocol's stages (``protocol``), its cryptography (``crypto``), Shamir sharing
(``shamir``), the communication graph (``graph``) and the fixed-point encoding
(``encoding``); distributed DP on it, the distributed Skellam mechanism's
``DistributedSkellam`` transform (``distributed_dp``, its encoding ``ddp_encoding``, the
rotation ``rotation``)."""

from potluck.secagg.distributed_dp import DistributedSkellam
from potluck.secagg.parts import SecAgg, SecureSum

__all__ = ["DistributedSkellam", "SecAgg", "SecureSum"]
