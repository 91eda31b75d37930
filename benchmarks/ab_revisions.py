"""Two commits side by side: a benchmark of this repository run alternately on an older
commit and on the working tree, in one session, so that a change of the code shows as a
ratio and the machine's drift does not.

The older commit is checked out into a temporary ``git worktree``; each side runs its own
copy of the benchmark script against its own ``src/`` (``PYTHONPATH``), with this
repository's virtual environment, in the order old, new, old, new, ... (``--pairs`` pairs).
Each run's JSON result is read and the file is put back as it was, so committed results
are not overwritten. Two benchmarks are understood:

- ``inline_overhead``: per workload, the inline engine's per-client overhead over plain
  PyTorch and its time per client (BENCHMARKS.md section 1);
- ``compare_flower``: potluck's side only (``--skip-flower``) of W1 and W3 on the inline
  engine: the rounds after the first and end to end (section 8; Flower's side does not
  depend on potluck's commit, so the headline ratios move exactly as potluck's times do);
- ``same_results``: this tree's ``same_results.py`` (short NIID-Bench and FedProx-synthetic
  runs) against each side's ``src/``: the final accuracies, losses and weights, which must be
  equal (one pair is enough: the runs are deterministic).

Run from the repository root:
    .venv/bin/python benchmarks/ab_revisions.py --base fda3843 --benchmark inline_overhead
    .venv/bin/python benchmarks/ab_revisions.py --base fda3843 --benchmark compare_flower
    .venv/bin/python benchmarks/ab_revisions.py --base fda3843 --benchmark same_results --pairs 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import REPO, header, write_result

Metrics = dict[str, float]
COMMANDS: dict[str, list[str]] = {
    "inline_overhead": ["benchmarks/inline_overhead.py", "--output", "ab_inline_overhead_run"],
    "same_results": [str(REPO / "benchmarks" / "same_results.py"), "--out", "{out}"],
    "compare_flower": [
        "benchmarks/compare_flower.py",
        "--skip-flower",
        "--workloads",
        "w1,w3",
        "--engines",
        "inline",
        "--no-anatomy",
    ],
}
RESULT_FILES = {
    "inline_overhead": "ab_inline_overhead_run.json",
    "compare_flower": "compare_flower.json",
    "same_results": None,  # written where "{out}" says
}


def _inline_overhead(result: dict[str, Any]) -> Metrics:
    out: Metrics = {}
    for w in result["workloads"]:
        out[f"{w['name']}/overhead_us_per_client"] = w["overhead"]["us_per_client_median"]
        out[f"{w['name']}/engine_us_per_client"] = w["us_per_client"]["engine"]["median"]
    return out


def _compare_flower(result: dict[str, Any]) -> Metrics:
    out: Metrics = {}
    for name, w in result["workloads"].items():
        run = w["potluck"]["inline"]
        out[f"{name}/rounds_after_first_s"] = run["rounds_after_first_s"]
        out[f"{name}/end_to_end_s"] = run["end_to_end_s"]
        out[f"{name}/final_test_accuracy"] = run["final_test_accuracy"]
    return out


def _same_results(result: dict[str, Any]) -> Metrics:
    return {f"{run}/{k}": v for run, values in result.items() for k, v in values.items()}


EXTRACT: dict[str, Callable[[dict[str, Any]], Metrics]] = {
    "inline_overhead": _inline_overhead,
    "compare_flower": _compare_flower,
    "same_results": _same_results,
}


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """``commit`` checked out in a temporary worktree (removed afterwards)."""
    path = Path(tempfile.mkdtemp(prefix="potluck-ab-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)


def run_side(tree: Path, benchmark: str) -> Metrics:
    """One run of ``benchmark`` in ``tree``; its metrics. The result file is restored."""
    file = RESULT_FILES[benchmark]
    result = (tree / "benchmarks" / "results" / file) if file else tree / "ab-result.json"
    before = result.read_bytes() if result.exists() else None
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [arg.replace("{out}", str(result)) for arg in COMMANDS[benchmark]]
    try:
        subprocess.run([sys.executable, *command], cwd=tree, env=env, check=True)
        return EXTRACT[benchmark](json.loads(result.read_text()))
    finally:
        if before is None:
            result.unlink(missing_ok=True)
        else:
            result.write_bytes(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the older commit")
    parser.add_argument("--benchmark", choices=sorted(COMMANDS), required=True)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    payload = header(f"ab_{args.benchmark}")
    payload["settings"] = {
        "base": args.base,
        "pairs": args.pairs,
        "command": COMMANDS[args.benchmark],
    }
    runs: dict[str, list[Metrics]] = {"old": [], "new": []}
    with worktree(args.base) as old:
        for i in range(args.pairs):
            for side, tree in (("old", old), ("new", REPO)):
                print(f"pair {i + 1}/{args.pairs}: {side}", flush=True)
                runs[side].append(run_side(tree, args.benchmark))
    keys = sorted(runs["new"][0])
    payload["runs"] = runs
    payload["median"] = {
        key: {side: statistics.median(r[key] for r in runs[side]) for side in runs} for key in keys
    }
    payload["new_over_old"] = {
        key: m["new"] / m["old"] if isinstance(m["old"], float) and m["old"] else None
        for key, m in payload["median"].items()
    }
    payload["all_equal"] = all(a == b for a, b in zip(runs["old"], runs["new"], strict=True))
    for key, ratio in payload["new_over_old"].items():
        m = payload["median"][key]
        print(f"{key}: old {m['old']}, new {m['new']}, new/old {ratio}")
    print(f"every metric equal in every pair: {payload['all_equal']}")
    print(f"wrote {write_result(f'ab_{args.benchmark}', payload)}")


if __name__ == "__main__":
    main()
