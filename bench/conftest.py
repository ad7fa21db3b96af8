"""Fixtures and hooks for the pytest-benchmark suites in bench/.

Collection: pyproject.toml's ``python_files = ["test_*.py", "bench_*.py"]``
makes pytest collect ``bench_*.py`` (the file naming of EXAMPLES.md §4.5)
wherever it is pointed; ``testpaths = ["tests"]`` keeps a plain ``pytest``
out of bench/, and ``addopts = --benchmark-skip`` would skip these anyway.
``--benchmark-only`` overrides ``--benchmark-skip``, so

    python -m pytest bench/ --benchmark-only [--benchmark-json=bench/results/cpu.json]

runs them. (python_files is an ini option: a conftest cannot set it before
collection starts in every invocation, so it lives in pyproject.toml.)

Environment: ``FASTREG_BENCH_QUICK=1`` for the --quick shapes,
``FASTREG_BENCH_OPS=layer_norm,rms_*`` to select ops (as ``--ops``).
"""

import os

# Before anything imports torch or starts an OpenMP pool (see fastreg/_bench.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from fastreg import _bench  # noqa: E402

_COPY = {}


def copy_bandwidth():
    """The machine's copy ceiling, measured once per session (on the largest x benched)."""
    if not _COPY:
        specs = _bench.select_specs(os.environ.get("FASTREG_BENCH_OPS", "*"),
                                    os.environ.get("FASTREG_BENCH_QUICK") == "1")
        _COPY.update(_bench.copy_bandwidth(max((s.x_bytes for s in specs), default=0)))
    return _COPY


@pytest.fixture(scope="session")
def copy_gbs():
    return copy_bandwidth()["ceiling_gbs"]


@pytest.fixture(scope="session")
def torch_module():
    return _bench.import_torch()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions, threads, THP and the copy ceiling go into the JSON (bench/report.py reads them)."""
    machine_info["fastreg"] = _bench.machine_info(_bench.import_torch())
    machine_info["fastreg"]["copy"] = copy_bandwidth()


def _stable(machine_info):
    """machine_info without what varies run to run (the measured copy ceiling)."""
    info = dict(machine_info)
    info["fastreg"] = {k: v for k, v in info.get("fastreg", {}).items() if k != "copy"}
    return info


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info,
                                          compared_benchmark):
    """--benchmark-compare: warn (do not fail) when the machines differ, ignoring the
    copy ceiling, which is a measurement, not a property of the machine."""
    if _stable(machine_info) != _stable(compared_benchmark["machine_info"]):
        benchmarksession.logger.warning(
            "Benchmark machine_info differs from the compared run (copy ceiling ignored).")
