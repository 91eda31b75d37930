"""protobuf's own classes for ``potluck.proto`` (upb): the reference ``codec`` is tested against.

``protoc`` runs in a child process and only its descriptor set is loaded here: grpcio-tools'
compiler module carries its own copy of protobuf's C++ runtime, and once it is loaded in a
process, loading TenSEAL (which carries another) aborts that process (seen with grpcio-tools
1.85), which would end the whole test session.
"""

import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

import potluck

SRC = Path(potluck.__file__).resolve().parent.parent
PROTO = "potluck/deploy/potluck.proto"


def _messages() -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "potluck.desc"
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{SRC}"]
        subprocess.run([*cmd, f"--descriptor_set_out={out}", PROTO], check=True)
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    classes = message_factory.GetMessages(list(files), pool=descriptor_pool.DescriptorPool())
    return SimpleNamespace(**{name.rsplit(".", 1)[-1]: cls for name, cls in classes.items()})


pb: Any = _messages()
