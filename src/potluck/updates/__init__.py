"""Update transforms: a chain applied to each update, ``encode`` on the client and
``decode`` on the server (modelled on optax's composable transformations), and downlink
transforms of the broadcast."""

from potluck.updates.base import Cast, ClipNorm, KeepLocal, Transform
from potluck.updates.delta import DeltaDownlink
from potluck.updates.lowrank import PowerSGD
from potluck.updates.quantize import QSGD, CastUpdate, QuantizeDownlink
from potluck.updates.sign import SignEF
from potluck.updates.sketch import FetchSGD
from potluck.updates.sparsify import RandomK, TopK

__all__ = [
    "QSGD",
    "Cast",
    "CastUpdate",
    "ClipNorm",
    "DeltaDownlink",
    "FetchSGD",
    "KeepLocal",
    "PowerSGD",
    "QuantizeDownlink",
    "RandomK",
    "SignEF",
    "TopK",
    "Transform",
]
