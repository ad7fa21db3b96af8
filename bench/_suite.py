"""One pytest-benchmark suite per op family, on the case table of ``python -m fastreg bench``.

``define(family, namespace)`` adds to a bench module one test per op and
direction (``test_layer_norm_fwd``, ..., ``test_layer_norm_fwd_bwd``),
parametrized over the family's standard shapes and the peers: fastreg into
preallocated outputs (``out=``), fastreg into fresh outputs, the NumPy
reference, and PyTorch when it is importable. Each case is a group named
``<op>_<dir>|<shape>|<dtype>`` (the shape as stored), so the peers of a case
are compared side by side.

Each benchmark records in ``extra_info`` its minimal byte count (``bytes``),
``GB/s`` and ``% copy`` (of the copy ceiling measured in conftest.py), and
the case's op, direction, layout, shape and peer. The fastreg peer also
checks its result against the reference once per case, so a wrong kernel
fails its benchmark instead of posting a time.
"""

import functools
import os

import pytest

from fastreg import _bench

QUICK = os.environ.get("FASTREG_BENCH_QUICK") == "1"


@functools.lru_cache(maxsize=1)
def _cases(spec, torch):
    """The built cases of the last spec (inputs are large: one spec alive at a time)."""
    return _bench.build(spec, torch)


def _define(op, direction, specs):
    params = [pytest.param(spec, peer, id=f"{spec.name(direction)}|{peer}")
              for spec in specs if spec.op == op for peer in _bench.PEERS]

    @pytest.mark.parametrize("spec,peer", params)
    def bench(benchmark, spec, peer, copy_gbs, torch_module):
        case = _cases(spec, torch_module)[direction]
        if peer not in case.runs:
            pytest.skip("torch is not installed" if peer == "torch"
                        else f"{peer} does not run {case.name}")
        benchmark.group = case.name
        benchmark.extra_info.update(
            bytes=case.nbytes, peer=peer, op=op, direction=direction, layout=spec.layout,
            shape=list(spec.shape), dtype=spec.dtype)
        if peer == "fastreg" and case.verify is not None:
            check = case.verify()
            assert check["ok"], f"{case.name}: fastreg differs from the reference: {check}"
        fn = case.runs[peer]
        fn()                                    # warm-up outside the timing
        benchmark(fn)
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = case.nbytes / median / 1e9
        benchmark.extra_info["% copy"] = 100.0 * case.nbytes / median / 1e9 / copy_gbs

    bench.__name__ = f"test_{op}_{direction.replace('+', '_')}"
    bench.__qualname__ = bench.__name__
    bench.__doc__ = f"{op} {direction}: every shape, every peer."
    return bench


def define(family, namespace):
    """Put the family's benchmark tests into ``namespace`` (a module's globals())."""
    specs = [s for s in _bench.select_specs(os.environ.get("FASTREG_BENCH_OPS", "*"), QUICK)
             if _bench.family_of(s).FAMILY == family]
    tests = [_define(op, direction, specs)
             for op in dict.fromkeys(s.op for s in specs)
             for direction in next(s for s in specs if s.op == op).directions]
    namespace.update({t.__name__: t for t in tests})
