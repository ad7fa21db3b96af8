"""Property-based tests (hypothesis): the CPU kernels against the NumPy reference on
random calls of every op family (strategies in tests/strategies.py), and the
CUDA kernels under the host emulation on the same strategies.

Profiles (tests/conftest.py): "ci" (the default) runs a few derandomized
examples per test; FASTREG_HYPOTHESIS_PROFILE=long runs 400 by hand.
"""

import numpy as np
import pytest
from hypothesis import given

from _cuda_targets import BF16, GPU, needs_emulator
from api_table import BY_NAME, runs_on
from strategies import (
    Call,
    batch_norm_calls,
    batch_norm_split_calls,
    check_against_reference,
    check_low_precision,
    dropout_calls,
    group_norm_calls,
    instance_norm_calls,
    norm_calls,
    prox_calls,
    random_calls,
    row_norm_calls,
)

CPU = [np.float32, np.float64]
LOW = [np.float16, BF16]


@given(call=row_norm_calls(CPU))
def test_layer_and_rms_norm_cpu_match_reference(call):
    check_against_reference(call, "cpu")


@given(call=batch_norm_calls(CPU))
def test_batch_norm_cpu_matches_reference(call):
    check_against_reference(call, "cpu")


@given(call=group_norm_calls(CPU))
def test_group_norm_cpu_matches_reference(call):
    check_against_reference(call, "cpu")


@given(call=instance_norm_calls(CPU))
def test_instance_norm_cpu_matches_reference(call):
    check_against_reference(call, "cpu")


@given(call=dropout_calls(CPU))
def test_dropout_family_cpu_matches_reference(call):
    check_against_reference(call, "cpu")


@given(call=prox_calls(CPU))
def test_prox_family_cpu_matches_reference(call):
    check_against_reference(call, "cpu")


@given(call=random_calls(CPU))
def test_random_family_cpu_matches_reference(call):
    check_against_reference(call, "cpu")


@given(call=batch_norm_split_calls(CPU))
def test_split_batch_norm_cpu_matches_reference(call):
    check_against_reference(call, "cpu")


def _emulated(call):
    return runs_on(BY_NAME[call.name], "cuda_emulator")


@needs_emulator
@pytest.mark.gpu
@given(call=row_norm_calls([np.float32]))
def test_row_norms_emulated_match_reference(call):
    check_against_reference(call, "cuda_emulator")


@needs_emulator
@pytest.mark.gpu
@given(call=group_norm_calls([np.float32]) | batch_norm_calls([np.float32]) |
       instance_norm_calls([np.float32]))
def test_channel_norms_emulated_match_reference(call):
    check_against_reference(call, "cuda_emulator")


@needs_emulator
@pytest.mark.gpu
@given(call=prox_calls([np.float32]) | dropout_calls([np.float32]) |
       random_calls([np.float32]) | batch_norm_split_calls([np.float32]))
def test_prox_dropout_random_and_split_batch_norm_emulated_match_reference(call):
    if not _emulated(call):     # the CUDA backends name what they do not run yet
        return
    check_against_reference(call, "cuda_emulator")


# --------------------------------------------------------------------------- on a GPU

needs_gpu = pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA device")


@needs_gpu
@pytest.mark.gpu
@given(call=norm_calls([np.float32, np.float64]) | prox_calls([np.float32]) |
       dropout_calls([np.float32]) | random_calls([np.float32]) |
       batch_norm_split_calls([np.float32]))
def test_every_family_on_the_gpu_matches_reference(call):
    if _emulated(call):
        check_against_reference(call, "cuda")


@needs_gpu
@pytest.mark.gpu
@given(call=norm_calls(LOW, backward=False) | prox_calls(LOW) | dropout_calls(LOW))
def test_16_bit_on_the_gpu_matches_reference(call):
    if _emulated(call):
        check_low_precision(call, "cuda")


# --------------------------------------------------------------------------- found by the above

@pytest.mark.parametrize("N,K,O", [(0, 1, 0), (3, 0, 2), (2, 3, 0), (0, 0, 0)])
def test_drop_connect_with_no_features_or_outputs(N, K, O):
    """reshape(-1, 0) is ambiguous in NumPy: the kernels crashed on 0 in/out features."""
    import fastreg
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((N, K)), rng.standard_normal((O, K))
    for per_example in (False, True):
        fwd = Call("drop_connect", fastreg.drop_connect,
                   dict(x=x, weight=w, bias=None, p=0.3, rng=5, per_example=per_example),
                   kind="grad", dtype=np.float64)
        check_against_reference(fwd, "cpu")
        _, mask = fwd.run("reference")[0]
        check_against_reference(Call("drop_connect_backward", fastreg.drop_connect_backward,
                                     dict(dy=rng.standard_normal((N, O)), x=x, weight=w,
                                          mask=mask), kind="grad", dtype=np.float64), "cpu")
    check_against_reference(Call("drop_connect_inference", fastreg.drop_connect_inference,
                                 dict(x=x, weight=w, bias=None, p=0.3, activation="relu",
                                      n_samples=3, rng=5), dtype=np.float64), "cpu")


@pytest.mark.parametrize("shape,axis", [((0, 0), 0), ((0, 0), 1), ((3, 0), 0), ((0, 2, 0), (0, 1))])
def test_scalers_with_no_features(shape, axis):
    """The reference standardize crashed fitting (0, 0) along axis 0."""
    import fastreg
    x = np.ones(shape, np.float32)
    check_against_reference(Call("standardize", fastreg.standardize, dict(x=x, axis=axis)), "cpu")
    check_against_reference(Call("min_max_scale", fastreg.min_max_scale, dict(x=x, axis=axis)),
                            "cpu")


# --------------------------------------------------------------------------- 16-bit, emulated


@needs_emulator
@pytest.mark.gpu
@given(call=norm_calls(LOW, backward=False))
def test_norm_forwards_in_16_bit_emulated_match_reference(call):
    check_low_precision(call, "cuda_emulator")


@needs_emulator
@pytest.mark.gpu
@given(call=prox_calls(LOW) | dropout_calls(LOW))
def test_prox_and_dropout_in_16_bit_emulated_match_reference(call):
    if not _emulated(call):
        return
    check_low_precision(call, "cuda_emulator")
