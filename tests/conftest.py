"""Shared fixtures: a per-run random seed (printed, settable) and output poisoning."""

import os

import numpy as np
import pytest

SEED = int(os.environ.get("FASTREG_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


def pytest_report_header(config):
    return f"fastreg test seed: FASTREG_TEST_SEED={SEED}"


@pytest.fixture
def rng(request):
    """Fresh random data every run; the test id keeps tests independent of each other."""
    return np.random.default_rng([SEED, *request.node.nodeid.encode()])


def poisoned(a):
    """An output buffer like ``a`` filled with NaN, so unwritten elements show up."""
    out = np.empty_like(a)
    out[...] = np.nan
    return out
