"""protobuf's own classes for ``potluck.proto`` (upb): the reference ``codec`` is tested against."""

from typing import Any

import grpc

pb: Any = grpc.protos("potluck/deploy/potluck.proto")
