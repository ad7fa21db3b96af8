"""pytest-benchmark suite for the norm ops: the bench command's case table, with
peers (fastreg into preallocated outputs, fastreg fresh, NumPy reference,
PyTorch) as parametrizations and one group per case.

    python -m pytest bench/ --benchmark-only [--benchmark-json=bench/results/cpu.json]
    python -m pytest bench/ --benchmark-only --benchmark-compare   # against the last saved run
    FASTREG_BENCH_QUICK=1 ...                                       # small shapes

Each benchmark records its minimal byte count and GB/s in extra_info;
bench/report.py turns the JSON into a markdown table.
"""

import os

import pytest

from fastreg._bench import build_cases

CASES = build_cases(quick=os.environ.get("FASTREG_BENCH_QUICK") == "1")
PAIRS = [(case, peer) for case in CASES for peer in case.runs]


@pytest.mark.parametrize("case,peer", PAIRS, ids=[f"{c.name}|{p}" for c, p in PAIRS])
def test_norm(benchmark, case, peer):
    benchmark.group = case.name
    benchmark.extra_info["bytes"] = case.nbytes
    benchmark.extra_info["peer"] = peer
    fn = case.runs[peer]
    fn()  # compile / warm up outside the timing
    benchmark(fn)
    benchmark.extra_info["GB/s"] = case.nbytes / benchmark.stats.stats.median / 1e9
