"""The dropout family's bench plug-in: every case builds, verifies and counts bytes."""

import dataclasses

import pytest

from fastreg import _bench, _bench_dropout


def _small(spec):
    shape = (3, 40) if spec.op != "drop_connect" or spec.layout == "per batch" else (3, 24)
    return dataclasses.replace(spec, shape=shape,
                               out_features=spec.out_features and 5,
                               n_samples=spec.n_samples and 4)


@pytest.mark.parametrize("dtype", _bench_dropout.DTYPES)
@pytest.mark.parametrize("spec", _bench_dropout.SPECS, ids=lambda s: s.name("all"))
def test_every_dropout_bench_case_builds_verifies_and_runs(spec, dtype):
    spec = dataclasses.replace(_small(spec), dtype=dtype)
    cases = _bench.build(spec, _bench.import_torch())
    assert tuple(cases) == spec.directions
    for direction, case in cases.items():
        assert case.nbytes > 0 and case.name.startswith(f"{spec.op}_{direction}|")
        if case.verify is not None:
            check = case.verify()
            assert check["ok"], (case.name, check)
        for peer, run in case.runs.items():
            run()
    if spec.op == "dropout":
        x = 3 * 40 * (4 if dtype == "float32" else 8)
        bits = 4 * ((120 + 31) // 32) if spec.layout == "mask=bits" else 0
        assert cases["fwd"].nbytes == 2 * x + bits and cases["bwd"].nbytes == 2 * x + bits


def test_dropout_bench_names_are_unique_and_registered():
    names = [s.name(d) for s in _bench_dropout.SPECS for d in s.directions]
    assert len(names) == len(set(names))
    assert "dropout" in _bench.FAMILIES
    assert {s.op for s in _bench.select_specs("dropout*")} == {"dropout",
                                                               "dropout_add_layer_norm"}
    summary = _bench_dropout.summary([])
    assert any("mask memory per element" in line for line in summary)
