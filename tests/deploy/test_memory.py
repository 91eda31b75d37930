"""``reuse_freed_memory``: freed buffers are reused instead of faulted in again."""

import json
import subprocess
import sys

PROGRAM = """
import json, resource, sys, threading
from potluck.deploy.memory import reuse_freed_memory
tuned = reuse_freed_memory() if sys.argv[1] == "tuned" else None
faults = []
def one_round():  # a new thread each round, like gRPC's handlers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [bytearray(7 << 20) for _ in range(3)]  # three 7 MiB messages, touched
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(5):
    t = threading.Thread(target=one_round)
    t.start()
    t.join()
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _faults(mode: str) -> tuple[bool | None, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    return result["tuned"], result["faults"]


def test_freed_buffers_are_reused_without_page_faults() -> None:
    _, default = _faults("default")
    tuned, reused = _faults("tuned")
    assert tuned is True
    pages = 3 * (7 << 20) // 4096
    assert min(default[1:]) > pages // 2  # glibc maps and unmaps them every round
    assert max(reused[1:]) < pages // 20  # kept and reused after the first round
