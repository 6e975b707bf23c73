"""Data-parallel calibration: the greedy search in one process against two (torchrun, Gloo).

Runs ``planner build --model MODEL --delta 0.9 --device cpu`` once per process count,
each process with ``--threads`` torch threads, and prints a markdown table: the wall
time of the whole command (start-up and loading included), the search time it reports,
their ratios to one process, and whether the plan's methods match one process's.
Run: ``python -m bench.distributed``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import table
from runtime import load_plan

ROOT = Path(__file__).resolve().parents[1]


def run(ranks: int, args: argparse.Namespace, output: Path) -> tuple[float, float]:
    """Wall seconds of the command and the search seconds it reports."""
    command = ["-m", "cli", "build", "--model", args.model, "--delta", str(args.delta), "--device", "cpu",
               "-o", str(output)]  # fmt: skip
    if ranks > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)  # fmt: skip
    wall = time.perf_counter() - start
    return wall, float(re.search(r"search time\s+([\d.]+) s", done.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--delta", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--ranks", default="1,2", help="process counts, comma-separated; the first is the baseline")
    args = parser.parse_args()
    counts = [int(x) for x in args.ranks.split(",")]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as folder:
        for ranks in counts:
            output = Path(folder) / f"plan-{ranks}.json"
            wall, search = run(ranks, args, output)
            methods = load_plan(output).methods
            reference = reference or (wall, search, methods)
            rows.append([
                str(ranks), f"{wall:.1f}", f"{search:.1f}", f"{reference[0] / wall:.2f}",
                f"{reference[1] / search:.2f}", "yes" if methods == reference[2] else "no",
            ])  # fmt: skip
    print(f"`planner build --model {args.model} --delta {args.delta}`: {os.cpu_count()} CPUs, "
          f"{args.threads} torch thread(s) per process, torch {torch.__version__}\n")
    headers = ["processes", "command (s)", "search (s)", "command speed-up", "search speed-up", "same methods"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
