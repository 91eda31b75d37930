"""``reuse_freed_memory``: freed buffers are reused instead of faulted in again."""

import json
import os
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
for _ in range(int(sys.argv[2])):
    t = threading.Thread(target=one_round)
    t.start()
    t.join()
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _faults(mode: str, rounds: int) -> tuple[bool | None, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode, str(rounds)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    return result["tuned"], result["faults"]


def test_freed_buffers_are_reused_without_page_faults() -> None:
    arenas = len(os.sched_getaffinity(0))  # reuse_freed_memory's: one per core
    _, default = _faults("default", 5)
    tuned, reused = _faults("tuned", arenas + 4)
    assert tuned is True
    pages = 3 * (7 << 20) // 4096
    assert min(default[1:]) > pages // 2  # glibc maps and unmaps them every round
    # kept and reused: each of the arenas (one per core) faults the buffers in once at most
    assert sum(reused) < (arenas + 0.5) * pages
    assert sorted(reused)[3] < pages // 20  # at least 4 rounds fault nothing
