"""pytest-benchmark suite for the prox family (proximal operators, optimizer steps,
label-smoothed cross-entropy, data scaling).

    python -m pytest bench/bench_prox.py --benchmark-only [--benchmark-json=bench/results/cpu-prox.json]
    FASTREG_BENCH_QUICK=1 FASTREG_BENCH_OPS='*_step' python -m pytest bench/bench_prox.py --benchmark-only

The cases, peers and recorded ``extra_info`` are described in bench/_suite.py
and fastreg/_bench_prox.py.
"""

import _suite

_suite.define("prox", globals())
