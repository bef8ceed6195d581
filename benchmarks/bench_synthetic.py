"""Rendering speed of the embedded world, on one core: images per second per domain.

    .venv/bin/python benchmarks/bench_synthetic.py [--images 2000]

BLAS and OpenMP pools are limited to one thread before numpy loads, so the figure is per core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

from cdfsl_core.data.synthetic import DOMAIN_COMBOS, DOMAINS, render  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, 1 thread")
    print(f"{'domain':<22}{'images/s':>10}")
    for domain in DOMAINS:
        n_classes = len(DOMAIN_COMBOS[domain])
        render(domain, 0, 0)  # warm-up
        start = time.perf_counter()
        for i in range(args.images):
            render(domain, i % n_classes, i)
        rate = args.images / (time.perf_counter() - start)
        print(f"{domain:<22}{rate:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
