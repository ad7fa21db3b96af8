"""Call each public function of one family (tests/api_table.py) many times on small
arrays and print, as JSON, the resident memory each loop added (bytes).

Used by test_resources.py in a subprocess (NUMBA_NUM_THREADS=1: the loop
measures the library, not the thread pool's launches on a shared machine).

Usage: python _run_resources.py FAMILY [--calls N] [--warmup N] [--backend NAME]
"""

import argparse
import gc
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from api_table import ALL, build, runs_on  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    """Resident set size of this process in bytes (/proc/self/statm, field 2)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def growth(step, calls, warmup):
    """Bytes of RSS added by ``calls`` calls of step(), after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    gc.collect()
    before = rss()
    for _ in range(calls):
        step()
    gc.collect()
    return rss() - before


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("family")
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args()
    report = {}
    if args.family == "leak":   # the measurement's own check: 1 KiB kept per call
        kept = []
        report["leak"] = growth(lambda: kept.append(np.ones(256, np.float32)), args.calls,
                                args.warmup)
    for api in ALL:
        if api.family != args.family or not runs_on(api, args.backend):
            continue
        kw = build(api, np.float32)
        kw.pop("out", None)   # fresh outputs every call: anything kept piles up
        backend = args.backend if api.backend_kw else None
        report[api.name] = growth(lambda: api.call(kw, backend), args.calls, args.warmup)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
