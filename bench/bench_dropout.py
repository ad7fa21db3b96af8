"""pytest-benchmark suite for the dropout family (dropout, Gaussian noise and dropout,
DropConnect, moment matching, fused dropout + add + LayerNorm).

    python -m pytest bench/bench_dropout.py --benchmark-only [--benchmark-json=...]
    FASTREG_BENCH_QUICK=1 FASTREG_BENCH_OPS=dropout python -m pytest bench/ --benchmark-only

The cases and their byte counts are in fastreg/_bench_dropout.py; the peers and
the recorded ``extra_info`` are described in bench/_suite.py.
"""

import _suite

_suite.define("dropout", globals())
