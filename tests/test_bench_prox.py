"""The prox family's bench plug-in: every quick case builds, runs each peer and
verifies against the reference (torch peers too, when torch is installed)."""

import pytest

from fastreg import _bench, _bench_prox

QUICK = [s for s in _bench.select_specs(quick=True) if _bench.family_of(s) is _bench_prox]


def test_prox_family_is_registered():
    assert "prox" in _bench.FAMILIES
    assert len(QUICK) == len(_bench_prox.SPECS)
    assert {"sgd_step", "adamw_step", "prox_l1", "cross_entropy"} <= {s.op for s in QUICK}


@pytest.mark.parametrize("spec", QUICK, ids=[f"{s.op}-{s.layout}" for s in QUICK])
def test_prox_bench_case_runs_and_verifies(spec):
    torch = _bench.import_torch()
    cases = _bench.build(spec, torch)
    assert list(cases) == list(spec.directions)
    for case in cases.values():
        assert case.nbytes > 0 and case.first_call_s is not None
        assert "fastreg" in case.runs and "numpy" in case.runs
        assert ("fastreg fresh" in case.runs) == (case.direction != "step")
        if torch is not None:
            assert "torch" in case.runs
        for run in case.runs.values():
            run()
        check = case.verify()
        assert check["ok"], f"{case.name}: {check}"
        if case.check_torch is not None:
            assert case.check_torch()["ok"], case.name
