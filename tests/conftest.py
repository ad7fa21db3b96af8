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


# --------------------------------------------------------------------------- hypothesis profiles
# "ci" (the default): few examples, derandomized, so a CI run is quick and
# repeatable; "long" for runs by hand: FASTREG_HYPOTHESIS_PROFILE=long pytest tests/test_prop*
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; the property tests import it themselves
    pass
else:
    _SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                              database=None, print_blob=True, suppress_health_check=_SLOW_OK)
    settings.register_profile("long", max_examples=400, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_OK)
    settings.load_profile(os.environ.get("FASTREG_HYPOTHESIS_PROFILE", "ci"))
