"""Secure aggregation: SecAgg+ (Bell et al. 2020) and SecAgg (Bonawitz et al. 2017) in the
five-part structure, the ``SecAgg`` transform and the ``SecureSum`` aggregator (``parts``);
the protocol's stages (``protocol``), its cryptography (``crypto``), Shamir sharing
(``shamir``), the communication graph (``graph``) and the fixed-point encoding
(``encoding``)."""

from potluck.secagg.parts import SecAgg, SecureSum

__all__ = ["SecAgg", "SecureSum"]
