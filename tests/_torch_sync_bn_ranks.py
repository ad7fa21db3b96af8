"""fastreg.torch.SyncBatchNorm on several ranks against batch norm of the whole batch.

Every rank builds the same whole batch from a seed, keeps its slice (uneven;
some cases give a rank no samples) and runs the synchronized layer forward
and backward. Checked against PyTorch's ``F.batch_norm`` on the whole batch
in float64 with autograd: this rank's slice of y and dx, the running
statistics and ``num_batches_tracked``; dweight and dbias are this rank's own
sums (PyTorch's SyncBatchNorm convention, checked against the formula), and
their sum over ranks is the whole batch's gradient. Each step must send
5 float64 per channel per rank.

Used in two ways:
- in-process by tests/test_torch_sync_bn.py, ranks as threads
  (``tests/_sync_bn_cases.ThreadGroup``), through ``SyncBatchNormFunction``;
- ``python _torch_sync_bn_ranks.py SEED RANK WORLD STORE``: a process of a gloo
  group, through the ``SyncBatchNorm`` module (PyTorch's rules for when to
  synchronize), plus DistributedDataParallel, singleton groups, eval mode and
  the fallback. A rank exits with status 1 and prints the failure if a check
  fails.
"""

import sys
import traceback

import numpy as np
import torch

import fastreg.torch as ft
import fastreg.torch.distributed as ftd
from fastreg.distributed import CountingComm

F = torch.nn.functional
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}  # relative to the largest expected value
TOL_GRAD = {torch.float64: 1e-12, torch.float32: 1e-4}


def sizes(N, R, pattern):
    """Samples per rank: 'uneven' (rank r gets about (r+1)/sum of them) or
    'first_empty' (rank 0 gets none)."""
    if pattern == "first_empty" and R > 1:
        return [0] + sizes(N, R - 1, "uneven")
    weights = np.arange(1, R + 1, dtype=float)
    cuts = np.floor(np.cumsum(weights) / weights.sum() * N).astype(int)
    return list(np.diff(np.concatenate([[0], cuts])))


# name, whole-batch shape, memory format, dtype, split, options
CASES = [
    ("nchw-f64", (7, 5, 6, 9), "contiguous", torch.float64, "uneven", {}),
    ("nchw-f64-empty-rank-relu", (6, 4, 5, 5), "contiguous", torch.float64, "first_empty",
     {"activation": "relu"}),
    ("channels-last-f64-cumulative", (9, 5, 4, 6), "channels_last", torch.float64,
     "first_empty", {"momentum": None}),
    ("2d-f64-no-affine", (50, 7), "contiguous", torch.float64, "uneven", {"affine": False}),
    ("ncl-f64-no-bias", (6, 3, 11), "contiguous", torch.float64, "uneven", {"bias": False}),
    ("nchw-f32", (8, 6, 7, 11), "contiguous", torch.float32, "uneven", {}),
    ("channels-last-f32-relu", (7, 5, 6, 8), "channels_last", torch.float32, "uneven",
     {"activation": "relu"}),
]


def _close(name, got, want, tol, case):
    got, want = got.detach().double(), want.detach().double()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    if not err <= tol * scale:
        raise AssertionError(f"{case}: {name} differs from the whole batch's by {err:.3g} "
                             f"(allowed {tol * scale:.3g})")


def _layout(t, fmt):
    return t.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else t


def run_case(comm, seed, case, mode):
    """One case on this rank. ``comm`` (a fastreg communicator adapter) gives rank
    and size and carries the test's own traffic. ``mode``: "function" (ranks as
    threads: the comm is passed as SyncBatchNormFunction's process group, with
    ``fastreg.torch.distributed.TorchComm`` set to the identity) or "module"
    (a gloo process: the SyncBatchNorm module on the default group)."""
    name, shape, fmt, dtype, pattern, opt = case
    rank, R = comm.rank, comm.size
    activation = opt.get("activation")
    momentum = opt.get("momentum", 0.1)
    affine, bias = opt.get("affine", True), opt.get("bias", True)
    rng = np.random.default_rng([seed, *name.encode()])
    C = shape[1]
    x = torch.from_numpy(rng.standard_normal(shape) * 2 + 0.5).to(dtype)
    dy = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    w = torch.from_numpy(rng.standard_normal(C)).to(dtype) if affine else None
    b = torch.from_numpy(rng.standard_normal(C)).to(dtype) if affine and bias else None
    rm0 = torch.from_numpy(rng.standard_normal(C)).to(dtype)
    rv0 = torch.from_numpy(rng.uniform(0.5, 2.0, C)).to(dtype)
    factor = 1.0 if momentum is None else momentum  # a fresh module: num_batches_tracked 1

    # the whole batch on one process, in float64 with PyTorch's autograd
    def leaf(t):
        return None if t is None else t.to(torch.float64, copy=True).requires_grad_()
    xw, ww, bw = leaf(x), leaf(w), leaf(b)
    rm1, rv1 = rm0.to(torch.float64, copy=True), rv0.to(torch.float64, copy=True)
    y1 = F.batch_norm(xw, rm1, rv1, ww, bw, True, factor, 1e-5)
    if activation == "relu":
        y1 = F.relu(y1)
    y1.backward(dy.double())
    mean = xw.detach().mean(dim=[d for d in range(len(shape)) if d != 1])
    var = xw.detach().var(dim=[d for d in range(len(shape)) if d != 1], unbiased=False)
    bshape = (1, C) + (1,) * (len(shape) - 2)
    xhat = (xw.detach() - mean.view(bshape)) / torch.sqrt(var.view(bshape) + 1e-5)
    dz = dy.double() * (y1.detach() > 0) if activation == "relu" else dy.double()

    # this rank's slice
    n = sizes(shape[0], R, pattern)
    lo, hi = sum(n[:rank]), sum(n[:rank + 1])
    xs = _layout(x[lo:hi].clone(), fmt).requires_grad_()
    counting = CountingComm(comm)
    if mode == "function":
        ws = None if w is None else w.clone().requires_grad_()
        bs = None if b is None else b.clone().requires_grad_()
        rm, rv = rm0.clone(), rv0.clone()
        y = ftd.SyncBatchNormFunction.apply(xs, ws, bs, rm, rv, factor, 1e-5, counting,
                                            activation)
        module = None
    else:
        module = ft.SyncBatchNorm(C, momentum=momentum, affine=affine, bias=bias, dtype=dtype,
                                  activation=activation)
        with torch.no_grad():
            if affine:
                module.weight.copy_(w)
                if bias:
                    module.bias.copy_(b)
            module.running_mean.copy_(rm0)
            module.running_var.copy_(rv0)
        real = ftd.TorchComm
        ftd.TorchComm = lambda group: counting
        try:
            y = module(xs)
        finally:
            ftd.TorchComm = real
        ws, bs, rm, rv = module.weight, module.bias, module.running_mean, module.running_var
    sent_forward = counting.payload_bytes
    y.backward(_layout(dy[lo:hi].clone(), fmt))

    tag = f"{name} ({mode}) rank {rank}/{R} slice {lo}:{hi}"
    t, tg = TOL[dtype], TOL_GRAD[dtype]
    _close("y", y, y1[lo:hi], t, tag)
    if fmt == "channels_last" and hi > lo:
        assert y.is_contiguous(memory_format=torch.channels_last), f"{tag}: layout lost"
    _close("running_mean", rm, rm1, t, tag)
    _close("running_var", rv, rv1, t, tag)
    _close("dx", xs.grad, xw.grad[lo:hi], tg, tag)
    sums = np.zeros((2, C))
    if ws is not None:  # this rank's own sums, and their sum over ranks is the whole batch's
        _close("dweight (this rank's sum)", ws.grad, (dz * xhat)[lo:hi].sum(
            dim=[d for d in range(len(shape)) if d != 1]), tg, tag)
        sums[0] = ws.grad.double().numpy()
    if bs is not None:
        _close("dbias (this rank's sum)", bs.grad, dz[lo:hi].sum(
            dim=[d for d in range(len(shape)) if d != 1]), tg, tag)
        sums[1] = bs.grad.double().numpy()
    comm.allreduce_sum(sums)  # the test's traffic, not counted
    if ww is not None:
        _close("dweight summed over ranks", torch.from_numpy(sums[0]), ww.grad, tg, tag)
    if bw is not None:
        _close("dbias summed over ranks", torch.from_numpy(sums[1]), bw.grad, tg, tag)
    ops = [op for op, _, _ in counting.calls]
    assert ops == ["allgather", "allreduce_sum"], f"{tag}: collectives {ops}"
    assert sent_forward == 3 * C * 8 and counting.payload_bytes == 5 * C * 8, \
        f"{tag}: payload {counting.calls}"
    if module is not None:
        assert int(module.num_batches_tracked) == 1
        module.eval()  # running statistics normalize, nothing is communicated
        ftd.TorchComm = None  # any communication would fail
        try:
            with torch.no_grad():
                ye = module(_layout(x[lo:hi].clone(), fmt))
        finally:
            ftd.TorchComm = real
        expected = F.batch_norm(x[lo:hi].double(), rm1, rv1, None if w is None else w.double(),
                                None if b is None else b.double(), False, 0.0, 1e-5)
        _close("eval y", ye, F.relu(expected) if activation == "relu" else expected, t, tag)


def run_all(comm, seed, mode, cases=CASES):
    for case in cases:
        run_case(comm, seed, case, mode)


# --------------------------------------------------------------------------- gloo only

def check_ddp(seed, rank, world):
    """DistributedDataParallel over the converted model: with each rank's loss scaled
    by world / N, the averaged gradients are those of the whole batch's mean loss."""
    import copy
    torch.manual_seed(seed % 2**31)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 3)).double()
    reference = copy.deepcopy(model)
    model = ft.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is ft.SyncBatchNorm
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rng = np.random.default_rng([seed, 7])
    N = 10
    x = torch.from_numpy(rng.standard_normal((N, 3, 5, 5)))
    target = torch.from_numpy(rng.standard_normal((N, 3)))
    n = sizes(N, world, "uneven")
    lo, hi = sum(n[:rank]), sum(n[:rank + 1])
    for step in range(2):
        ddp.zero_grad()
        reference.zero_grad()
        loss = ((ddp(x[lo:hi]) - target[lo:hi]) ** 2).sum() * (world / N)
        loss.backward()
        (((reference(x) - target) ** 2).sum() / N).backward()
        tag = f"DDP rank {rank} step {step}"
        for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
            _close(f"grad {pname}", p.grad, q.grad, 1e-12, tag)
        for (bname, bb), q in zip(model.named_buffers(), reference.buffers()):
            _close(bname, bb, q, 1e-12, tag)
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad


def check_single_rank_groups(seed, rank, world):
    """A group of one process (and eval mode) is plain batch norm: no communication."""
    import torch.distributed as dist
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    layer = ft.SyncBatchNorm(3, process_group=groups[rank]).double()
    ref = torch.nn.BatchNorm2d(3).double()
    x = torch.from_numpy(np.random.default_rng([seed, rank]).standard_normal((4, 3, 2, 2)))
    real = ftd.TorchComm
    ftd.TorchComm = None
    try:
        _close("single-rank group y", layer(x), ref(x), 1e-12, f"rank {rank}")
    finally:
        ftd.TorchComm = real
    _close("single-rank group running_var", layer.running_var, ref.running_var, 1e-12, "")


def check_fallback(rank):
    """What fastreg does not run (bfloat16 on the CPU) runs PyTorch's SyncBatchNorm,
    which refuses CPU input: the same error as PyTorch's own layer."""
    import warnings
    x = torch.randn(4, 3, 2, 2, dtype=torch.bfloat16)
    errors = []
    for layer in (ft.SyncBatchNorm(3, dtype=torch.bfloat16),
                  torch.nn.SyncBatchNorm(3, dtype=torch.bfloat16)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            try:
                layer(x)
                errors.append(None)
            except ValueError as error:
                errors.append(str(error))
        if isinstance(layer, ft.SyncBatchNorm):
            assert any(issubclass(w.category, ft.FallbackWarning) for w in record), record
            assert int(layer.num_batches_tracked) == 1, "the counter moved twice"
    assert errors[0] == errors[1] and errors[0] is not None, errors


def _main(argv):
    import torch.distributed as dist
    from fastreg.distributed import TorchComm
    seed, rank, world, store = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world)
    try:
        run_all(TorchComm(), seed, "module")
        check_ddp(seed, rank, world)
        check_single_rank_groups(seed, rank, world)
        check_fallback(rank)
    except BaseException:
        traceback.print_exc()
        print(f"rank {rank}: FAILED", flush=True)
        raise SystemExit(1)
    print(f"rank {rank}/{world}: {len(CASES)} cases, DDP, single-rank groups, fallback ok",
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv)
