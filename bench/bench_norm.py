"""pytest-benchmark suite for the norm ops (layer, RMS, batch, group, instance norm).

    python -m pytest bench/ --benchmark-only [--benchmark-json=bench/results/cpu.json]
    FASTREG_BENCH_QUICK=1 FASTREG_BENCH_OPS=layer_norm python -m pytest bench/ --benchmark-only
    python bench/report.py bench/results/cpu.json        # the markdown table

The cases, peers and recorded ``extra_info`` are described in bench/_suite.py.
"""

import _suite

_suite.define("norm", globals())
