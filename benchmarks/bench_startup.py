"""Start-up time of every command: how long ``--help`` (and ``models list``) takes to answer.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 5] [--json FILE]

Each command runs ``--repeat`` times in a fresh interpreter; reported: the median wall time per
command. Run it in another checkout (``cd OTHER && python .../bench_startup.py``) to compare two
versions on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (
    ("cdfsl_core.finetune", "--help"),
    ("cdfsl_core.episodes", "--help"),
    ("cdfsl_core.compare", "--help"),
    ("cdfsl_core.models", "list"),
    ("cdfsl_core.data", "list"),
    ("analysis.run_diagnostics", "--help"),
    ("analysis.cka", "--help"),
    ("analysis.demo", "--help"),
    ("cdfsl_core.sweep", "--help"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report = {}
    for command in COMMANDS:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", *command], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        report[" ".join(command)] = round(statistics.median(times), 3)
        print(f"{' '.join(command):35s} {report[' '.join(command)]:6.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seconds_median": report, "repeat": args.repeat}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
