"""Resources: 10,000 calls of every public function (tests/api_table.py) grow neither
the process's resident memory (CPU) nor CuPy's memory pool (GPU) beyond a small bound.

Each call gets fresh outputs (no ``out=``), so that a reference kept by the
library (a cache keyed by the inputs, a cycle through a mask, a saved
temporary) would pile up: at ~1 KiB per call that is 10 MiB over the loop,
beyond the bound. The measurement itself is checked on a loop that does leak.
The CPU loops run in a subprocess per family (tests/_run_resources.py) with one
Numba thread, so that they measure the library rather than thread launches on
a shared machine.
"""

import gc
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from _cuda_targets import GPU
from api_table import ALL, build, on_device, runs_on

HERE = pathlib.Path(__file__).resolve().parent
CALLS = 10_000
BOUND = 4 * 2**20          # bytes of resident memory a loop of CALLS calls may add


def _run(family, calls=CALLS):
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "_run_resources.py"), family,
                           "--calls", str(calls)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_measurement_sees_a_leak_of_1_kib_per_call():
    grown = _run("leak")["leak"]
    assert grown > BOUND, f"a leak of {CALLS} KiB showed as {grown} bytes"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["norm", "dropout", "random", "prox"])
def test_10000_calls_of_each_function_do_not_grow_resident_memory(family):
    report = _run(family)
    expected = {api.name for api in ALL if api.family == family}
    assert set(report) == expected
    over = {name: f"{grown / 2**20:.1f} MiB" for name, grown in report.items()
            if grown >= BOUND}
    assert not over, f"{CALLS} calls grew RSS by more than {BOUND / 2**20:.0f} MiB: {over}"


@pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA device")
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("api", [pytest.param(a, id=a.name) for a in ALL
                                 if a.backend_kw and runs_on(a, "cuda")])
def test_10000_gpu_calls_do_not_grow_the_memory_pool(api):
    import cupy

    kw = build(api, np.float32)
    kw.pop("out", None)
    kw = on_device(kw)
    pool = cupy.get_default_memory_pool()

    def step():
        api.call(kw, "cuda")

    for _ in range(300):
        step()
    cupy.cuda.Device().synchronize()
    gc.collect()
    used, total = pool.used_bytes(), pool.total_bytes()
    for _ in range(CALLS):
        step()
    cupy.cuda.Device().synchronize()
    gc.collect()
    assert pool.used_bytes() - used <= 2**20, \
        f"{api.name}: pool in use grew by {pool.used_bytes() - used} bytes"
    assert pool.total_bytes() - total <= BOUND, \
        f"{api.name}: pool held grew by {pool.total_bytes() - total} bytes"
