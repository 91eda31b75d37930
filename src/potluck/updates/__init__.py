"""Update transforms: a chain applied to each update, ``encode`` on the client and
``decode`` on the server (modelled on optax's composable transformations), and downlink
transforms of the broadcast."""

from potluck.updates.base import Cast, ClipNorm, KeepLocal, Transform
from potluck.updates.quantize import QSGD, CastUpdate

__all__ = ["QSGD", "Cast", "CastUpdate", "ClipNorm", "KeepLocal", "Transform"]
