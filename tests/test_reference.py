"""The NumPy reference itself: gradients against central finite differences (float64).
The PyTorch cross-checks are in test_reference_torch.py."""

import copy

import numpy as np
import pytest

from _assert import assert_close
from cases import BATCH_NORM, GROUP_NORM, INSTANCE_NORM, LAYER_NORM, RMS_NORM

FD_CASES = [
    (LAYER_NORM, (3, 5), {}),
    (LAYER_NORM, (2, 3, 4), {"normalized_ndim": 2}),
    (RMS_NORM, (3, 6), {}),
    (BATCH_NORM, (4, 3, 5), {}),
    (BATCH_NORM, (6, 4), {"axis": -1}),
    (BATCH_NORM, (4, 3, 5), {"training": False}),
    (BATCH_NORM, (4, 3, 5), {"activation": "relu"}),
    (GROUP_NORM, (2, 6, 5), {"G": 3}),
    (GROUP_NORM, (2, 5, 4), {"G": 2, "axis": -1}),
    (INSTANCE_NORM, (2, 3, 6), {}),
    (INSTANCE_NORM, (2, 3, 6), {"use_input_stats": False}),
]


def _loss(op, d, cot, key, value):
    dd = copy.deepcopy(d)
    dd[key] = value
    y = op.forward(dd, "reference")[0]
    return float(np.sum(y * cot))


@pytest.mark.parametrize("op,shape,variant", FD_CASES,
                         ids=[f"{o.name}-{s}-{v}" for o, s, v in FD_CASES])
def test_reference_gradients_match_finite_differences(op, shape, variant, rng):
    while True:
        d = op.make(rng, shape, np.float64, variant)
        saved = op.forward(copy.deepcopy(d), "reference")
        # ReLU: differentiate away from the kink (redraw if an output is near 0)
        pre = op.forward({**d, "activation": None}, "reference")[0] if "activation" in d else None
        if pre is None or np.min(np.abs(pre)) > 1e-3:
            break
    cot = rng.standard_normal(shape)
    grads = op.backward(d, saved, cot, "reference")
    h = 1e-6
    for name, grad in zip(("x", "weight", "bias"), grads):
        if grad is None:
            continue
        base = d[name]
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += h
            minus[idx] -= h
            fd[idx] = (_loss(op, d, cot, name, plus) - _loss(op, d, cot, name, minus)) / (2 * h)
        assert_close(grad, fd, rtol=1e-5, atol=1e-6, case=f"{op.name} d{name} vs finite diff")
