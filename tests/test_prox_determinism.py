"""Prox family: bitwise determinism across calls, thread counts and Numba's on-disk cache.

The first subprocess compiles every prox kernel into an empty NUMBA_CACHE_DIR
at 2 threads, the second loads them at 1 thread: it must compile nothing (no
new cache files) and return bitwise-identical results (cached parallel
functions have had bugs).
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from _assert import assert_bitwise

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _run_prox_ops  # noqa: E402


def test_repeated_calls_are_bitwise_identical():
    first, second = _run_prox_ops.run(), _run_prox_ops.run()
    for k in first:
        for i, (a, b) in enumerate(zip(first[k], second[k])):
            assert_bitwise(a, b, case=f"{k}[{i}] repeated")


def _run(tmp_path, name, threads, cache_dir):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), NUMBA_CACHE_DIR=str(cache_dir),
               FASTREG_NUMBA_CACHE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run([sys.executable, str(HERE / "_run_prox_ops.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    print(f"{name} (NUMBA_NUM_THREADS={threads}): {proc.stdout.strip()}")
    return dict(np.load(out))


def _cache_files(cache_dir):
    return sorted(p.relative_to(cache_dir) for p in pathlib.Path(cache_dir).rglob("*")
                  if p.is_file())


@pytest.mark.slow
def test_prox_results_identical_at_1_and_2_threads_and_from_cache(tmp_path):
    cache = tmp_path / "numba-cache"
    cold = _run(tmp_path, "cold-2-threads", 2, cache)
    files = _cache_files(cache)
    assert any("prox" in str(f) and str(f).endswith(".nbi") for f in files), \
        "prox kernels were not cached"
    warm = _run(tmp_path, "cached-1-thread", 1, cache)
    assert _cache_files(cache) == files, "the second process compiled kernels again"
    assert cold.keys() == warm.keys()
    for k in cold:
        assert_bitwise(warm[k], cold[k], case=f"{k}: 1 thread from cache vs 2 threads cold")
