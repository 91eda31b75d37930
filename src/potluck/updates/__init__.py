"""Update transforms: a chain applied to each update, ``encode`` on the client and
``decode`` on the server (modelled on optax's composable transformations)."""

from potluck.updates.base import Chain, ClipNorm, EncodeContext, Transform

__all__ = ["Chain", "ClipNorm", "EncodeContext", "Transform"]
