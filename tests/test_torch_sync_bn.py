"""fastreg.torch.SyncBatchNorm: ranks as threads and as gloo processes, single-process rules.

The per-rank checks are in tests/_torch_sync_bn_ranks.py: every rank's output,
running statistics and input gradient equal PyTorch's batch norm on the whole
batch (float64 within 1e-12), its weight and bias gradients are its own sums
(PyTorch's SyncBatchNorm convention, which DistributedDataParallel averages),
and a step sends 5 float64 per channel. PyTorch's own nn.SyncBatchNorm
refuses CPU tensors, so the comparison is with the math, not with it.
"""

import copy
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")

import fastreg.torch as ft  # noqa: E402
import fastreg.torch.distributed as ftd  # noqa: E402
from fastreg.torch import _bridge  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _torch_sync_bn_ranks as ranks  # noqa: E402
from _sync_bn_cases import ThreadGroup  # noqa: E402
from conftest import SEED  # noqa: E402

nn = torch.nn


@pytest.fixture
def comm_is_the_group(monkeypatch):
    """SyncBatchNormFunction's process group is then a fastreg communicator itself
    (ranks as threads), instead of a torch.distributed group."""
    monkeypatch.setattr(ftd, "TorchComm", lambda group: group)


@pytest.fixture(scope="module")
def warm_cache():
    """Load (or compile) every kernel the ranks use in this process first: ranks
    started together would otherwise write Numba's cache concurrently (numba#4807)."""
    real = ftd.TorchComm
    ftd.TorchComm = lambda group: group
    try:
        ThreadGroup(1).run(lambda comm: ranks.run_all(comm, SEED, "function"))
    finally:
        ftd.TorchComm = real


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sync_batch_norm_equals_the_whole_batch_ranks_as_threads(world, warm_cache,
                                                                 comm_is_the_group):
    ThreadGroup(world).run(lambda comm: ranks.run_all(comm, SEED + world, "function"))


def test_the_rank_checks_can_fail(warm_cache, comm_is_the_group, monkeypatch):
    """The harness catches parameter gradients summed over ranks (not PyTorch's convention)."""
    real = ftd.sync_batch_norm_backward
    monkeypatch.setattr(ftd, "sync_batch_norm_backward",
                        lambda *a, **k: real(*a, **dict(k, reduce_param_grads=True)))
    with pytest.raises(AssertionError, match="this rank's sum"):
        ThreadGroup(2).run(lambda comm: ranks.run_all(comm, SEED, "function", ranks.CASES[:1]))


def test_sync_batch_norm_function_gradcheck(warm_cache, comm_is_the_group, rng):
    comm = ThreadGroup(1).comm(0)
    x = torch.from_numpy(rng.standard_normal((3, 2, 4))).requires_grad_()
    w = torch.from_numpy(rng.uniform(0.5, 1.5, 2)).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(2)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: ftd.SyncBatchNormFunction.apply(*a, None, None, 0.1, 1e-5, comm, None),
        (x, w, b))


def test_sync_batch_norm_gloo_2_ranks(warm_cache, tmp_path):
    env = dict(os.environ, NUMBA_NUM_THREADS="1")  # the ranks share the cores
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(HERE / "_torch_sync_bn_ranks.py"), str(SEED),
                               str(r), "2", str(store)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs, codes = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
        codes.append(p.returncode)
    text = "\n".join(outputs)
    assert codes == [0, 0], text
    for r in range(2):
        assert f"rank {r}/2: {len(ranks.CASES)} cases, DDP, single-rank groups, fallback ok" \
            in text, text


# --------------------------------------------------------------------------- one process

def _tensor(rng, shape, dtype=torch.float64):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=None), dict(affine=False),
                                    dict(track_running_stats=False)])
def test_without_a_process_group_it_is_batch_norm(kwargs, rng):
    """torch.distributed not initialized: plain batch norm, as PyTorch's SyncBatchNorm."""
    assert not torch.distributed.is_initialized()
    ref = nn.BatchNorm2d(3, **kwargs).double()
    ours = ft.SyncBatchNorm(3, **kwargs).double()
    ours.load_state_dict(ref.state_dict())
    for mode in ("train", "train", "eval"):
        ref.train(mode == "train"), ours.train(mode == "train")
        x = _tensor(rng, (4, 3, 5, 2))
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = _tensor(rng, x.shape)
        yr, yo = ref(xr), ours(xo)
        yr.backward(g), yo.backward(g)
        assert torch.allclose(yo, yr, rtol=1e-10, atol=1e-10), mode
        assert torch.allclose(xo.grad, xr.grad, rtol=1e-9, atol=1e-9), mode
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-10, atol=1e-12)


def test_interface_and_state_dict_as_torchs(rng):
    ref = nn.SyncBatchNorm(4, eps=1e-3, momentum=0.2, bias=False)
    ours = ft.SyncBatchNorm(4, eps=1e-3, momentum=0.2, bias=False)
    assert repr(ours) == repr(ref) and list(ours.state_dict()) == list(ref.state_dict())
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(ours, nn.SyncBatchNorm)  # DDP refuses those on the CPU
    with torch.no_grad():
        for t in ours.state_dict().values():
            t.add_(2) if t.is_floating_point() else t.add_(5)
    ref.load_state_dict(ours.state_dict(), strict=True)
    again = ft.SyncBatchNorm(4, eps=1e-3, momentum=0.2, bias=False)
    again.load_state_dict(ref.state_dict(), strict=True)
    for a, b in zip(again.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
    assert "activation='relu'" in repr(ft.SyncBatchNorm(2, activation="relu"))
    for bad, match in (((3,), "expected at least 2D input"), ((2, 0, 3), "non-zero")):
        with pytest.raises(ValueError, match=match):
            ours(torch.zeros(bad))


def test_convert_sync_batchnorm_as_torchs(rng):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.BatchNorm1d(4, momentum=None)))
    ft.convert(model, fuse_relu=True)  # fastreg layers, the ReLU fused into the first
    model.eval()
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    out = ft.SyncBatchNorm.convert_sync_batchnorm(model, process_group="group")
    assert out is model
    assert type(model[1]) is ft.SyncBatchNorm and type(model[3][0]) is ft.SyncBatchNorm
    assert model[1].activation == "relu" and model[3][0].activation is None
    assert model[3][0].momentum is None and model[1].process_group == "group"
    assert not model[1].training
    assert [id(p) for p in model.parameters()] == params
    assert [id(b) for b in model.buffers()] == buffers
    single = ft.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(single) is ft.SyncBatchNorm
    x = _tensor(rng, (3, 3, 2, 2), torch.float32)
    ref = copy.deepcopy(model)
    ref[1], ref[3][0] = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), nn.BatchNorm1d(4)
    ref[1][0].load_state_dict(model[1].state_dict())
    ref[3][0].load_state_dict(model[3][0].state_dict())
    ref.eval()
    with torch.no_grad():
        got = model[1](model[0](x))
        assert torch.allclose(got, ref[1](ref[0](x)), atol=1e-5)


def test_convert_swaps_torchs_sync_batch_norm():
    model = nn.Sequential(nn.SyncBatchNorm(3, process_group="g"))
    ft.convert(model)
    assert type(model[0]) is ft.SyncBatchNorm and model[0].process_group == "g"
    assert model[0].activation is None


def test_empty_local_batch_is_not_a_fallback_when_synchronizing(monkeypatch):
    """A rank holding no samples must still join the collectives."""
    layer = ft.SyncBatchNorm(3)
    assert layer._sync_reason(torch.zeros(0, 3, 4, 4)) is None
    assert "bfloat16" in layer.to(torch.bfloat16)._sync_reason(
        torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16))
    assert _bridge.EMPTY not in (layer._sync_reason(torch.zeros(0, 3)) or "")


def test_rank_splits_cover_the_batch():
    for N, R, pattern in ((7, 2, "uneven"), (6, 3, "first_empty"), (50, 2, "uneven")):
        n = ranks.sizes(N, R, pattern)
        assert sum(n) == N and len(n) == R and min(n) >= 0
        if pattern == "first_empty":
            assert n[0] == 0
    assert np.all(np.diff(ranks.sizes(60, 3, "uneven")) > 0)
