"""The dropout family against PyTorch (skipped without torch).

PyTorch draws its own masks, so the checks are of semantics: the scaling of
kept elements, p = 1 and inference, and the gradients of DropConnect and of
dropout + add + layer_norm computed by autograd through PyTorch's own ops
with fastreg's mask.
"""

import numpy as np
import pytest

import fastreg
from _assert import assert_close
from fastreg.reference.dropout import pack_bits

torch = pytest.importorskip("torch", reason="PyTorch cross-checks need torch")
F = torch.nn.functional


def _ulps(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_scales_kept_elements_as_torch(p, rng):
    x = rng.standard_normal(100_000).astype(np.float32)
    yt = F.dropout(torch.from_numpy(x), p, training=True).numpy()
    y, mask = fastreg.dropout(x, p, rng=int(rng.integers(2**63)))
    kt, k = yt != 0, mask.to_bool()
    # kept values are x / (1 - p) in both, to the last bit or one ulp of rounding order
    assert _ulps(yt[kt], x[kt] / np.float32(1 - p)).max() <= 1
    assert _ulps(y[k], x[k] / np.float32(1 - p)).max() <= 1
    # both keep a fraction near 1 - p
    assert abs(kt.mean() - k.mean()) < 0.02


def test_dropout_p_one_and_inference_match_torch(rng):
    x = rng.standard_normal((4, 7)).astype(np.float32)
    xt = torch.from_numpy(x)
    assert np.array_equal(F.dropout(xt, 1.0, training=True).numpy(),
                          fastreg.dropout(x, 1.0, rng=1)[0])
    assert np.array_equal(F.dropout(xt, 0.4, training=False).numpy(),
                          fastreg.dropout(x, 0.4, training=False)[0])


def test_dropout_backward_with_torch_mask_matches_torch_autograd(rng):
    """dropout_backward on a mask holding PyTorch's own kept set gives autograd's dx."""
    x = rng.standard_normal((33, 17)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt, keep_t = torch.native_dropout(xt, 0.25, True)
    yt.backward(torch.from_numpy(dy))
    keep = keep_t.numpy()
    assert keep.dtype == np.bool_ and keep.nbytes == x.size       # PyTorch: 1 byte per element
    mask = fastreg.DropoutMask("bits", x.shape, 0.25, 1 / 0.75, 0, 0, pack_bits(keep))
    assert mask.nbytes == 4 * ((x.size + 31) // 32)              # fastreg: 1 bit per element
    assert np.array_equal(mask.to_bool(), keep)
    dx = fastreg.dropout_backward(dy, mask)
    assert _ulps(dx, xt.grad.numpy()).max() <= 1


def _t(a, grad=True):
    return torch.tensor(a, requires_grad=grad)


@pytest.mark.parametrize("per_example", [False, True])
def test_drop_connect_matches_torch_autograd_with_the_same_mask(per_example, rng):
    x = rng.standard_normal((4, 3, 9))
    w, b = rng.standard_normal((5, 9)), rng.standard_normal(5)
    dy = rng.standard_normal((4, 3, 5))
    y, mask = fastreg.drop_connect(x, w, b, 0.35, rng=17, per_example=per_example)
    m = torch.tensor(mask.to_bool() * mask.scale)
    xt, wt, bt = _t(x), _t(w), _t(b)
    if per_example:
        yt = torch.einsum("sboi,sbi->sbo", m * wt, xt) + bt
    else:
        yt = F.linear(xt, m * wt, bt)
    yt.backward(torch.tensor(dy))
    assert_close(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12, case="y")
    grads = fastreg.drop_connect_backward(dy, x, w, mask)
    for name, g, t in zip(("dx", "dweight", "dbias"), grads, (xt, wt, bt)):
        assert_close(g, t.grad.numpy(), rtol=1e-11, atol=1e-11, case=name)


@pytest.mark.parametrize("mode", ["inverted", "weight_scaling"])
def test_dropout_add_layer_norm_matches_torch_composition(mode, rng):
    x, r = rng.standard_normal((5, 2, 24)), rng.standard_normal((5, 2, 24))
    w, b = rng.standard_normal(24), rng.standard_normal(24)
    cot_y, cot_s = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    y, s, mean, rstd, mask = fastreg.dropout_add_layer_norm(x, r, w, b, 0.2, rng=3, mode=mode)
    xt, rt, wt, bt = _t(x), _t(r), _t(w), _t(b)
    st = xt * torch.tensor(mask.to_bool() * mask.scale) + rt
    yt = F.layer_norm(st, (24,), wt, bt, 1e-5)
    (yt * torch.tensor(cot_y) + st * torch.tensor(cot_s)).sum().backward()
    assert_close(s, st.detach().numpy(), rtol=1e-14, atol=1e-14, case="residual_sum")
    assert_close(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10, case="y")
    grads = fastreg.dropout_add_layer_norm_backward(cot_y, s, mean, rstd, w, b, mask,
                                                    dresidual_sum=cot_s)
    for name, g, t in zip(("dx", "dresidual", "dweight", "dbias"), grads, (xt, rt, wt, bt)):
        assert_close(g, t.grad.numpy(), rtol=1e-9, atol=1e-9, case=name)


def test_gaussian_dropout_backward_matches_torch_autograd(rng):
    x, dy = rng.standard_normal((6, 11)), rng.standard_normal((6, 11))
    y, mask = fastreg.gaussian_dropout(x, 0.3, rng=5)
    xt = _t(x)
    yt = xt * torch.tensor(mask.to_factor())
    yt.backward(torch.tensor(dy))
    assert_close(y, yt.detach().numpy(), rtol=1e-14, atol=1e-14, case="y")
    assert_close(fastreg.gaussian_dropout_backward(dy, mask), xt.grad.numpy(), rtol=1e-14,
                 atol=1e-14, case="dx")
