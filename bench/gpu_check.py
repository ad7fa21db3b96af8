"""The GPU check: one command for a machine with an NVIDIA GPU.

    python bench/gpu_check.py [--quick] [--ops PATTERN] [--repeat N] [--skip-tests] [--out DIR]

1. runs the GPU tests (``pytest -m gpu``: on a GPU they run the kernels on
   the device, beside the host emulation) and records the summary;
2. measures the device-to-device copy ceiling (bytes read + written by
   cudaMemcpyAsync and by a copy kernel, the larger of the two);
3. times every GPU op with CUDA events, fastreg beside torch.nn.functional
   (and Liger-Kernel when importable) in this one process, at sizes well past
   the 50 MB L2 (each sample enqueues several calls back to back, so Python's
   launch overhead hides behind the GPU as in a training loop; medians after a
   warm-up);
4. runs the PyTorch adapter's test files and the digits example on the GPU
   (``examples/torch_convert_digits.py --device cuda``: accuracy and step
   time, PyTorch's layers against ``fastreg.torch.convert``'s), and the 1-rank
   NCCL smoke run of ``fastreg.distributed`` (``bench/syncbn_gpu_smoke.py``);
5. writes ``bench/results/gpu-<device>.json`` and ``.md``: ms, GB/s over the
   minimal bytes (each input read once, each output written once), % of the
   copy ceiling, and fastreg's speed-up over each peer (peer ms / fastreg ms),
   with the issue's targets beside them.

The case table, byte counts and report formatting are plain Python (tested in
CI by tests/test_gpu_check.py); everything that needs CuPy or torch is
imported inside the functions that time. Ops are rows of ``OPS``, each an
``OpBench`` subclass: layer and RMS norm (rows), batch norm (NCHW and NHWC,
training with running statistics, fused forward/backward against ATen's
native ops), group norm (NCHW and NHWC, G = 32), instance norm, the prox
family's optimizer steps and label-smoothed cross-entropy, and the dropout
family's dropout (1-bit and 0-byte masks) and fused dropout + add + LayerNorm.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6, "batch_norm": 1e-5, "group_norm": 1e-5,
       "instance_norm": 1e-5}

# The targets (H100, GB/s over the minimal bytes), by (op, direction, dtype).
TARGETS = {
    ("layer_norm", "fwd", "float32"): 2850, ("layer_norm", "bwd", "float32"): 2400,
    ("rms_norm", "fwd", "float32"): 2850, ("rms_norm", "bwd", "float32"): 2400,
    ("layer_norm", "fwd", "bfloat16"): 2700, ("rms_norm", "fwd", "bfloat16"): 2700,
    ("layer_norm", "bwd", "bfloat16"): 2200, ("rms_norm", "bwd", "bfloat16"): 2200,
    ("group_norm", "fwd", "float32", "nhwc"): 2400, ("group_norm", "fwd", "bfloat16", "nhwc"): 2400,
    ("group_norm", "fwd", "float32", "nchw"): 2400, ("group_norm", "bwd", "float32", "nchw"): 2200,
}
# Targets stated as speed-ups over torch (peer ms / fastreg ms), by (op, direction, dtype, layout).
RATIO_TARGETS = {
    ("batch_norm", "fwd", "float32", "nchw"): 2.0, ("batch_norm", "fwd", "bfloat16", "nchw"): 4.0,
    ("batch_norm", "bwd", "float32", "nchw"): 2.5, ("batch_norm", "bwd", "bfloat16", "nchw"): 2.5,
    ("batch_norm", "fwd", "float32", "nhwc"): 1.2, ("batch_norm", "fwd", "bfloat16", "nhwc"): 1.2,
    ("batch_norm", "bwd", "float32", "nhwc"): 1.2, ("batch_norm", "bwd", "bfloat16", "nhwc"): 1.2,
}


def target_of(case):
    """(GB/s target or None, speed-up over torch target or None) of a case."""
    gbs = TARGETS.get((case.op, case.direction, case.dtype, case.layout)) or \
        TARGETS.get((case.op, case.direction, case.dtype))
    return gbs, RATIO_TARGETS.get((case.op, case.direction, case.dtype, case.layout))


# =========================================================================== cases

@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    direction: str          # "fwd" or "bwd"
    shape: tuple
    dtype: str              # "float32", "bfloat16", "float16", "float64"
    layout: str = ""        # "nchw" or "nhwc" for the norms over channels

    @property
    def name(self):
        layout = f" {self.layout}" if self.layout else ""
        return (f"{self.op}_{self.direction}{layout} {'x'.join(map(str, self.shape))} "
                f"{self.dtype}")


ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def stat_size(dtype):
    return 8 if dtype == "float64" else 4


def row_norm_bytes(op, direction, M, D, dtype, *, weight=True, bias=True):
    """Minimal bytes of layer/RMS norm over (M, D) rows: forward reads x, weight,
    bias and writes y and the statistics (mean and rstd, RMS: rstd); backward
    reads dy, x, weight and the statistics and writes dx, dweight, dbias."""
    s, a = ITEMSIZE[dtype], stat_size(dtype)
    bias = bias and op == "layer_norm"
    nstats = 2 if op == "layer_norm" else 1
    params = (int(weight) + int(bias)) * D * s
    if direction == "fwd":
        return 2 * M * D * s + params + nstats * M * a
    return 3 * M * D * s + int(weight) * D * s + nstats * M * a + params


class OpBench:
    """One op's benchmark: its cases, bytes, and the callables of each peer."""

    name = ""

    def cases(self, quick):
        raise NotImplementedError

    def nbytes(self, case):
        raise NotImplementedError

    def prepare(self, case, torch, cupy):
        """Inputs on the device; returns {peer: zero-argument callable}."""
        raise NotImplementedError


class RowNorm(OpBench):
    SHAPES = ((32768, 1024), (8192, 4096), (4096, 8192))
    QUICK_SHAPES = ((8192, 1024),)
    DTYPES = ("float32", "bfloat16", "float16")

    def __init__(self, name):
        self.name = name

    def cases(self, quick):
        return [Case(self.name, d, shape, dt) for shape in
                (self.QUICK_SHAPES if quick else self.SHAPES)
                for dt in self.DTYPES for d in ("fwd", "bwd")]

    def nbytes(self, case):
        return row_norm_bytes(case.op, case.direction, *case.shape, case.dtype)

    def prepare(self, case, torch, cupy):
        import fastreg
        M, D = case.shape
        tdt = getattr(torch, case.dtype)
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, D, device="cuda", dtype=tdt, generator=g)
        w = torch.randn(D, device="cuda", dtype=tdt, generator=g)
        b = torch.randn(D, device="cuda", dtype=tdt, generator=g)
        dy = torch.randn(M, D, device="cuda", dtype=tdt, generator=g)
        cx, cw, cb, cdy = (cupy.from_dlpack(t) for t in (x, w, b, dy))
        eps, F, ln = EPS[case.op], torch.nn.functional, case.op == "layer_norm"
        peers = {}
        if case.direction == "fwd":
            if ln:
                peers["fastreg"] = lambda: fastreg.layer_norm(cx, cw, cb, eps)
                peers["torch"] = lambda: F.layer_norm(x, (D,), w, b, eps)
            else:
                peers["fastreg"] = lambda: fastreg.rms_norm(cx, cw, eps)
                peers["torch"] = lambda: F.rms_norm(x, (D,), w, eps)
        else:
            if ln:
                _, mean, rstd = fastreg.layer_norm(cx, cw, cb, eps)
                peers["fastreg"] = lambda: fastreg.layer_norm_backward(cdy, cx, mean, rstd, cw, cb)
                _, tm, tr = torch.ops.aten.native_layer_norm(x, [D], w, b, eps)
                peers["torch"] = lambda: torch.ops.aten.native_layer_norm_backward(
                    dy, x, [D], tm, tr, w, b, [True, True, True])
            else:
                _, rstd = fastreg.rms_norm(cx, cw, eps)
                peers["fastreg"] = lambda: fastreg.rms_norm_backward(cdy, cx, rstd, cw)
                peers["torch"] = _autograd_bwd(torch, lambda xx, ww: F.rms_norm(xx, (D,), ww, eps),
                                               x, w, dy)
        liger = _liger(case, torch, x, w, b, dy, eps)
        if liger is not None:
            peers["liger"] = liger
        return peers


def _autograd_bwd(torch, f, x, w, dy):
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = f(xr, wr)
    return lambda: torch.autograd.grad(y, (xr, wr), dy, retain_graph=True)


def _liger(case, torch, x, w, b, dy, eps):
    """Liger-Kernel's op for the case, or None where it is not installed."""
    try:
        if case.op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction as Fn
            f = (lambda xx, ww: Fn.apply(xx, ww, b, eps))
        else:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction as Fn
            f = (lambda xx, ww: Fn.apply(xx, ww, eps))
    except ImportError:
        return None
    if case.direction == "fwd":
        return lambda: f(x, w)
    return _autograd_bwd(torch, f, x, w, dy)


def channel_norm_bytes(op, direction, shape, dtype, *, groups=None, running=True):
    """Minimal bytes of batch norm (statistics per channel), group norm (per (n, g))
    and instance norm (per (n, c)) over an (N, C, H, W) batch, weight and bias given.
    Forward reads x, weight, bias (batch norm: and the running statistics, which it
    also writes, float32) and writes y, mean, rstd; backward reads dy, x, mean, rstd,
    weight and writes dx, dweight, dbias."""
    s, a = ITEMSIZE[dtype], stat_size(dtype)
    N, C = shape[0], shape[1]
    numel = 1
    for d in shape:
        numel *= d
    nstats = {"batch_norm": C, "group_norm": N * (groups or 1), "instance_norm": N * C}[op]
    if direction == "fwd":
        run = 4 * C * 4 if op == "batch_norm" and running else 0
        return 2 * numel * s + 2 * C * s + 2 * nstats * a + run
    return 3 * numel * s + 3 * C * s + 2 * nstats * a


class ChannelNorm(OpBench):
    """Batch, group and instance norm at the issue's shapes, NCHW and NHWC
    (torch: channels_last memory; fastreg: the same memory through DLPack)."""

    SHAPES = {"batch_norm": ((256, 64, 56, 56),), "group_norm": ((32, 256, 56, 56),),
              "instance_norm": ((32, 256, 56, 56),)}
    QUICK_SHAPES = {"batch_norm": ((64, 64, 56, 56),), "group_norm": ((8, 256, 56, 56),),
                    "instance_norm": ((8, 256, 56, 56),)}
    DTYPES = ("float32", "bfloat16")
    GROUPS = 32

    def __init__(self, name):
        self.name = name

    def cases(self, quick):
        shapes = (self.QUICK_SHAPES if quick else self.SHAPES)[self.name]
        return [Case(self.name, d, shape, dt, layout) for shape in shapes
                for layout in ("nchw", "nhwc") for dt in self.DTYPES for d in ("fwd", "bwd")]

    def groups(self, case):
        return {"batch_norm": None, "group_norm": self.GROUPS,
                "instance_norm": case.shape[1]}[self.name]

    def nbytes(self, case):
        return channel_norm_bytes(case.op, case.direction, case.shape, case.dtype,
                                  groups=self.groups(case))

    def prepare(self, case, torch, cupy):
        import fastreg
        N, C, H, W = case.shape
        tdt = getattr(torch, case.dtype)
        fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(N, C, H, W, device="cuda", dtype=tdt, generator=g).to(memory_format=fmt)
        dy = torch.randn(N, C, H, W, device="cuda", dtype=tdt, generator=g).to(memory_format=fmt)
        w = torch.randn(C, device="cuda", dtype=tdt, generator=g)
        b = torch.randn(C, device="cuda", dtype=tdt, generator=g)
        cx, cdy, cw, cb = (cupy.from_dlpack(t) for t in (x, dy, w, b))
        eps, F, peers = EPS[case.op], torch.nn.functional, {}
        if self.name == "batch_norm":
            rm, rv = (torch.zeros(C, device="cuda"), torch.ones(C, device="cuda"))
            crm, crv = cupy.zeros(C, cupy.float32), cupy.ones(C, cupy.float32)
            if case.direction == "fwd":
                peers["fastreg"] = lambda: fastreg.batch_norm(cx, cw, cb, crm, crv, eps=eps)
                peers["torch"] = lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, eps)
            else:
                _, mean, rstd = fastreg.batch_norm(cx, cw, cb, eps=eps)
                peers["fastreg"] = lambda: fastreg.batch_norm_backward(cdy, cx, mean, rstd, cw, cb)
                _, sm, si = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, eps)
                peers["torch"] = lambda: torch.ops.aten.native_batch_norm_backward(
                    dy, x, w, rm, rv, sm, si, True, eps, [True, True, True])
            return peers
        G = self.groups(case)
        if case.direction == "fwd":
            if self.name == "group_norm":
                peers["fastreg"] = lambda: fastreg.group_norm(cx, G, cw, cb, eps)
                peers["torch"] = lambda: F.group_norm(x, G, w, b, eps)
            else:
                peers["fastreg"] = lambda: fastreg.instance_norm(cx, cw, cb, eps=eps)
                peers["torch"] = lambda: F.instance_norm(x, weight=w, bias=b, eps=eps)
        elif self.name == "group_norm":
            _, mean, rstd = fastreg.group_norm(cx, G, cw, cb, eps)
            peers["fastreg"] = lambda: fastreg.group_norm_backward(cdy, cx, mean, rstd, G, cw, cb)
            _, tm, tr = torch.ops.aten.native_group_norm(x, w, b, N, C, H * W, G, eps)
            peers["torch"] = lambda: torch.ops.aten.native_group_norm_backward(
                dy, x, tm, tr, w, N, C, H * W, G, [True, True, True])
        else:  # torch's instance norm is batch norm over (1, N*C, H, W): its own autograd
            _, mean, rstd = fastreg.instance_norm(cx, cw, cb, eps=eps)
            peers["fastreg"] = lambda: fastreg.instance_norm_backward(cdy, cx, mean, rstd, cw, cb)
            peers["torch"] = _autograd_bwd(
                torch, lambda xx, ww: F.instance_norm(xx, weight=ww, bias=b, eps=eps), x, w, dy)
        if self.name == "group_norm" and case.layout == "nchw":
            liger = _liger_group_norm(case, torch, x, w, b, dy, G, eps)
            if liger is not None:
                peers["liger"] = liger
        return peers


def _liger_group_norm(case, torch, x, w, b, dy, G, eps):
    """Liger-Kernel's group norm for the case, or None where it is not installed."""
    try:
        from liger_kernel.ops.group_norm import LigerGroupNormFunction as Fn
    except ImportError:
        return None
    C = x.shape[1]
    f = (lambda xx, ww: Fn.apply(xx, ww, b, C, G, eps))
    if case.direction == "fwd":
        return lambda: f(x, w)
    return _autograd_bwd(torch, f, x, w, dy)


OPS = {"layer_norm": RowNorm("layer_norm"), "rms_norm": RowNorm("rms_norm"),
       "batch_norm": ChannelNorm("batch_norm"), "group_norm": ChannelNorm("group_norm"),
       "instance_norm": ChannelNorm("instance_norm")}


# --------------------------------------------------------------------------- prox family
# Issue 5's GPU targets (H100, GB/s over the minimal bytes): SGD with momentum,
# decoupled decay and L1 (PyTorch's eager composite: 426 GB/s); AdamW with L1 at
# least level with PyTorch's fused AdamW without L1 (2572 GB/s); the fused
# label-smoothed cross-entropy at 2x Liger-Kernel's (1161 GB/s float32, 878 bfloat16).
TARGETS.update({
    ("sgd_step", "step", "float32"): 2700,
    ("adamw_step", "step", "float32"): 2572,
    ("cross_entropy", "fwd_bwd", "float32"): 2 * 1161,
    ("cross_entropy", "fwd_bwd", "bfloat16"): 2 * 878,
})
PROX_LR, PROX_L1, PROX_MOMENTUM, PROX_WD, SMOOTHING = 1e-3, 1e-2, 0.9, 1e-2, 0.1


def prox_step_bytes(op, tensors, n, dtype):
    """Minimal bytes of one step over ``tensors`` tensors of n elements: SGD with
    momentum reads w, g, buffer and writes w, buffer; AdamW reads w, g, m, v and
    writes w, m, v."""
    return (5 if op == "sgd_step" else 7) * tensors * n * ITEMSIZE[dtype]


def cross_entropy_bytes(N, K, dtype):
    """The issue's count: logits read once and their gradient written once (the
    targets, 8 N bytes, and the loss are left out)."""
    return 2 * N * K * ITEMSIZE[dtype]


class ProxStep(OpBench):
    """sgd_step (momentum, decoupled weight decay, L1) or adamw_step (L1) over a
    list of T tensors of n elements, shape (T, n): fastreg's one launch per
    step beside PyTorch's foreach SGD / fused AdamW followed by softshrink on each
    tensor, and (AdamW) fused AdamW alone, the issue's bar."""

    SHAPES = ((1, 1 << 26), (256, 1 << 18))
    QUICK_SHAPES = ((1, 1 << 24),)
    DTYPES = ("float32",)

    def __init__(self, name):
        self.name = name

    def cases(self, quick):
        return [Case(self.name, "step", shape, dt) for shape in
                (self.QUICK_SHAPES if quick else self.SHAPES) for dt in self.DTYPES]

    def nbytes(self, case):
        return prox_step_bytes(case.op, *case.shape, case.dtype)

    def prepare(self, case, torch, cupy):
        import fastreg
        T, n = case.shape
        tdt = getattr(torch, case.dtype)
        g = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.randn(n, device="cuda", dtype=tdt, generator=g) for _ in range(T)]
        grads = [torch.randn(n, device="cuda", dtype=tdt, generator=g) * 1e-2 for _ in range(T)]
        cw = [cupy.from_dlpack(p.clone()) for p in params]
        cg = [cupy.from_dlpack(x) for x in grads]
        softshrink = torch._C._nn.softshrink
        step = [0]
        peers = {}
        if case.op == "sgd_step":
            bufs = [cupy.zeros_like(w) for w in cw]

            def ours():
                step[0] += 1
                fastreg.sgd_step(cw, cg, lr=PROX_LR, momentum=PROX_MOMENTUM,
                                 decoupled_weight_decay=PROX_WD, l1=PROX_L1,
                                 momentum_buffer=bufs, first_step=step[0] == 1)
            peers["fastreg"] = ours
            ps = _torch_params(torch, params, grads)
            opt = torch.optim.SGD(ps, lr=PROX_LR, momentum=PROX_MOMENTUM, weight_decay=PROX_WD,
                                  foreach=True)
            peers["torch"] = _then_softshrink(opt, ps, softshrink)
        else:
            m = [cupy.zeros_like(w) for w in cw]
            v = [cupy.zeros_like(w) for w in cw]

            def ours():
                step[0] += 1
                fastreg.adamw_step(cw, cg, m, v, step=step[0], lr=PROX_LR, weight_decay=PROX_WD,
                                   l1=PROX_L1)
            peers["fastreg"] = ours
            ps = _torch_params(torch, params, grads)
            opt = torch.optim.AdamW(ps, lr=PROX_LR, weight_decay=PROX_WD, fused=True)
            peers["torch"] = _then_softshrink(opt, ps, softshrink)
            ps2 = _torch_params(torch, params, grads)
            peers["torch_fused_no_l1"] = torch.optim.AdamW(ps2, lr=PROX_LR, weight_decay=PROX_WD,
                                                           fused=True).step
        return peers


def _torch_params(torch, params, grads):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p, gr in zip(ps, grads):
        p.grad = gr
    return ps


def _then_softshrink(opt, ps, softshrink):
    def run():
        opt.step()
        for p in ps:
            softshrink(p.data, PROX_LR * PROX_L1, out=p.data)
    return run


class CrossEntropy(OpBench):
    """cross_entropy_label_smoothing (loss and gradient in one pass, reduction
    "mean", smoothing 0.1) beside PyTorch's cross_entropy forward + backward and
    Liger-Kernel's fused cross-entropy (which writes the gradient over its input)."""

    name = "cross_entropy"
    SHAPES = ((8192, 32000),)
    QUICK_SHAPES = ((2048, 32000),)
    DTYPES = ("float32", "bfloat16")

    def cases(self, quick):
        return [Case(self.name, "fwd_bwd", shape, dt) for shape in
                (self.QUICK_SHAPES if quick else self.SHAPES) for dt in self.DTYPES]

    def nbytes(self, case):
        return cross_entropy_bytes(*case.shape, case.dtype)

    def prepare(self, case, torch, cupy):
        import fastreg
        N, K = case.shape
        tdt = getattr(torch, case.dtype)
        g = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(N, K, device="cuda", generator=g) * 3).to(tdt)
        t = torch.randint(0, K, (N,), device="cuda", generator=g)
        cx, ct = cupy.from_dlpack(x), cupy.from_dlpack(t)
        out = (cupy.empty((), cx.dtype), cupy.empty_like(cx))
        peers = {"fastreg": lambda: fastreg.cross_entropy_label_smoothing(
            cx, ct, smoothing=SMOOTHING, out=out)}
        F = torch.nn.functional
        xr = x.detach().clone().requires_grad_()
        peers["torch"] = lambda: torch.autograd.grad(
            F.cross_entropy(xr, t, label_smoothing=SMOOTHING), xr)
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
        except ImportError:
            return peers
        xl = x.detach().clone().requires_grad_()
        peers["liger"] = lambda: torch.autograd.grad(
            liger_cross_entropy(xl, t, label_smoothing=SMOOTHING), xl)
        return peers


OPS.update({"sgd_step": ProxStep("sgd_step"), "adamw_step": ProxStep("adamw_step"),
            "cross_entropy": CrossEntropy()})


# --------------------------------------------------------------------------- dropout family
# Issue 4's GPU targets: dropout forward with a 1-bit mask at 2700 GB/s or more
# (PyTorch: 2243 GB/s with its 1-byte mask); dropout + add + LayerNorm forward at
# 2.5x PyTorch's eager composite or more.
TARGETS[("dropout", "fwd", "float32")] = 2700
RATIO_TARGETS[("dropout_add_layer_norm", "fwd", "float32", "")] = 2.5
RATIO_TARGETS[("dropout_add_layer_norm", "fwd", "bfloat16", "")] = 2.5
DROPOUT_P = 0.1
# Bytes of mask kept per element: fastreg "bits" 1/8, "seed" 0; PyTorch's bool mask 1.
MASK_BYTES_PER_ELEMENT = {"fastreg": 0.125, "fastreg_seed": 0.0, "torch": 1.0}


def dropout_bytes(op, shape, dtype):
    """Minimal bytes of the forward, as fastreg moves them. dropout: read x, write y
    and the 1-bit mask (n/8 bytes in whole 4-byte words); PyTorch's dropout moves n
    bytes more (its 1-byte mask), fastreg's "seed" mask n/8 bytes less. The fused op
    reads x, residual, weight, bias and writes y, the residual sum, mean and rstd
    ("seed" mask: nothing more)."""
    s = ITEMSIZE[dtype]
    n = 1
    for d in shape:
        n *= d
    if op == "dropout":
        return 2 * n * s + 4 * ((n + 31) // 32)
    M, D = shape
    return 4 * M * D * s + 2 * D * s + 2 * M * stat_size(dtype)


class Dropout(OpBench):
    """dropout forward (fastreg's 1-bit mask; its 0-byte "seed" mask as a second
    peer) beside torch.native_dropout (what F.dropout runs in training, with its
    1-byte mask); dropout + add + LayerNorm forward (fastreg's fused kernel, mask
    "seed") beside PyTorch's eager F.layer_norm(F.dropout(x) + residual)."""

    SHAPES = {"dropout": ((1 << 26,),), "dropout_add_layer_norm": ((32768, 1024), (8192, 4096))}
    QUICK_SHAPES = {"dropout": ((1 << 24,),), "dropout_add_layer_norm": ((16384, 1024),)}
    DTYPES = ("float32", "bfloat16")

    def __init__(self, name):
        self.name = name

    def cases(self, quick):
        return [Case(self.name, "fwd", shape, dt) for shape in
                (self.QUICK_SHAPES if quick else self.SHAPES)[self.name] for dt in self.DTYPES]

    def nbytes(self, case):
        return dropout_bytes(case.op, case.shape, case.dtype)

    def prepare(self, case, torch, cupy):
        import fastreg
        tdt = getattr(torch, case.dtype)
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(*case.shape, device="cuda", dtype=tdt, generator=g)
        cx = cupy.from_dlpack(x)
        gen = fastreg.random.Generator(0)
        F, peers = torch.nn.functional, {}
        if case.op == "dropout":
            y, bits = cupy.empty_like(cx), cupy.empty((cx.size + 31) // 32, cupy.uint32)
            peers["fastreg"] = lambda: fastreg.dropout(cx, DROPOUT_P, rng=gen, out=(y, bits))
            peers["fastreg_seed"] = lambda: fastreg.dropout(cx, DROPOUT_P, rng=gen, mask="seed",
                                                            out=(y, None))
            peers["torch"] = lambda: torch.native_dropout(x, DROPOUT_P, True)
            return peers
        M, D = case.shape
        r = torch.randn(M, D, device="cuda", dtype=tdt, generator=g)
        w = torch.randn(D, device="cuda", dtype=tdt, generator=g)
        b = torch.randn(D, device="cuda", dtype=tdt, generator=g)
        cr, cw, cb = (cupy.from_dlpack(t) for t in (r, w, b))
        sd = cupy.float32
        out = (cupy.empty_like(cx), cupy.empty_like(cx), cupy.empty(M, sd), cupy.empty(M, sd))
        peers["fastreg"] = lambda: fastreg.dropout_add_layer_norm(cx, cr, cw, cb, DROPOUT_P,
                                                                  rng=gen, out=out)
        peers["torch"] = lambda: F.layer_norm(F.dropout(x, DROPOUT_P) + r, (D,), w, b, 1e-5)
        return peers


OPS.update({"dropout": Dropout("dropout"),
            "dropout_add_layer_norm": Dropout("dropout_add_layer_norm")})


def select_cases(pattern="*", quick=False):
    return [c for op in OPS.values() for c in op.cases(quick) if fnmatch.fnmatch(c.op, pattern)]


# =========================================================================== timing

def time_ms(fn, cupy, repeat=30, min_sample_ms=2.0):
    """Median ms per call: warm-up, then samples of `number` back-to-back calls
    between two CUDA events on the current stream."""
    fn()
    cupy.cuda.runtime.deviceSynchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(cupy.cuda.get_elapsed_time(start, end), 1e-3)
    number = max(1, min(100, int(min_sample_ms / one)))
    samples = []
    for _ in range(repeat):
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, end) / number)
    return statistics.median(samples)


def copy_ceiling(cupy, nbytes=1 << 30, repeat=20):
    """GB/s of device-to-device copies (bytes read + written), the larger of
    cudaMemcpyAsync and CuPy's copy kernel."""
    n = nbytes // 4
    src = cupy.arange(n, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    memcpy = time_ms(lambda: cupy.cuda.runtime.memcpyAsync(
        dst.data.ptr, src.data.ptr, src.nbytes, cupy.cuda.runtime.memcpyDeviceToDevice,
        cupy.cuda.get_current_stream().ptr), cupy, repeat)
    kernel = time_ms(lambda: cupy.copyto(dst, src), cupy, repeat)
    moved = 2 * src.nbytes
    res = {"bytes_moved": moved, "memcpy_gbs": moved / memcpy / 1e6,
           "copy_kernel_gbs": moved / kernel / 1e6}
    res["ceiling_gbs"] = max(res["memcpy_gbs"], res["copy_kernel_gbs"])
    return res


def run_tests(extra=()):
    """pytest -m gpu; returns the exit code and the summary line."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-ra",
                           *extra], cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return {"exit_code": proc.returncode, "summary": lines[-1] if lines else "",
            "skips": [ln for ln in lines if ln.startswith("SKIPPED")]}


TORCH_ADAPTER_TESTS = ("tests/test_torch_adapter.py", "tests/test_torch_dropout.py",
                       "tests/test_torch_optim.py", "tests/test_torch_sync_bn.py")


def run_torch_adapter():
    """The PyTorch adapter on the GPU: its test files (their CUDA cases run where a
    GPU is) and the digits example with ``--device cuda``; returns the pytest
    summary and the example's result lines."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", *TORCH_ADAPTER_TESTS],
                          cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    example = subprocess.run([sys.executable, "examples/torch_convert_digits.py", "--device",
                              "cuda"], cwd=ROOT, capture_output=True, text=True)
    out = [ln for ln in example.stdout.splitlines() if ln.strip()]
    return {"exit_code": proc.returncode, "summary": lines[-1] if lines else "",
            "example_exit_code": example.returncode,
            "example": out[-4:] if example.returncode == 0 else example.stderr.splitlines()[-5:]}


def run_syncbn_smoke():
    """The 1-rank NCCL smoke run of fastreg.distributed (bench/syncbn_gpu_smoke.py):
    its exit code and one line per check."""
    proc = subprocess.run([sys.executable, "bench/syncbn_gpu_smoke.py"], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return {"exit_code": proc.returncode,
            "lines": lines if proc.returncode == 0 or lines else proc.stderr.splitlines()[-5:]}


def measure(case, op, torch, cupy, repeat, ceiling):
    gbs, ratio = target_of(case)
    row = {"case": case.name, "op": case.op, "direction": case.direction,
           "shape": list(case.shape), "dtype": case.dtype, "layout": case.layout,
           "bytes": op.nbytes(case), "target_gbs": gbs, "target_vs_torch": ratio, "peers": {}}
    try:
        peers = op.prepare(case, torch, cupy)
    except Exception as e:  # noqa: BLE001 - a failed case is reported, not fatal
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    for name, fn in peers.items():
        try:
            ms = time_ms(fn, cupy, repeat)
            row["peers"][name] = {"ms": ms, "gbs": row["bytes"] / ms / 1e6,
                                  "pct_copy": 100 * row["bytes"] / ms / 1e6 / ceiling}
        except Exception as e:  # noqa: BLE001
            row["peers"][name] = {"error": f"{type(e).__name__}: {e}"}
    return row


# =========================================================================== report

def device_slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def speedups(row):
    """fastreg's speed-up over each peer: peer ms / fastreg ms."""
    mine = row["peers"].get("fastreg", {}).get("ms")
    return {p: v["ms"] / mine for p, v in row["peers"].items()
            if p != "fastreg" and mine and "ms" in v}


def target_cell(row):
    if row.get("target_gbs"):
        return str(row["target_gbs"])
    if row.get("target_vs_torch"):
        return f"x{row['target_vs_torch']:g} torch"
    return "-"


def format_markdown(result):
    info, rows = result["info"], result["rows"]
    peers = sorted({p for r in rows for p in r["peers"]} - {"fastreg"})
    out = [f"# GPU check: {info['device']}", "",
           f"fastreg {info['fastreg']} | CuPy {info['cupy']} | CUDA runtime {info['cuda']} | "
           f"torch {info.get('torch', '-')} | Liger-Kernel {info.get('liger', 'not installed')}",
           f"copy ceiling {info['copy']['ceiling_gbs']:.0f} GB/s (bytes read + written; "
           f"cudaMemcpyAsync {info['copy']['memcpy_gbs']:.0f}, copy kernel "
           f"{info['copy']['copy_kernel_gbs']:.0f})",
           f"GPU tests: {info['tests']['summary'] or 'not run'}",
           *([f"PyTorch adapter tests: {info['torch_adapter']['summary']}",
              "digits example, fastreg.torch.convert on CUDA: "
              + " / ".join(info["torch_adapter"]["example"])]
             if info.get("torch_adapter") else []),
           *([f"sync batch norm, 1-rank NCCL smoke run (exit {smoke['exit_code']}): "
              + " / ".join(smoke["lines"])] if (smoke := info.get("syncbn_smoke")) else []),
           "",
           "| case | MB | fastreg ms | GB/s | % copy | target | "
           + " | ".join(f"{p} ms | {p} GB/s | x {p}" for p in peers) + " |",
           "|---|---:|---:|---:|---:|---:|" + "---:|---:|---:|" * len(peers)]
    for r in rows:
        f = r["peers"].get("fastreg", {})
        if "error" in r or "ms" not in f:
            out.append(f"| {r['case']} | {r['bytes'] / 1e6:.1f} | "
                       f"{r.get('error') or f.get('error', 'failed')} |")
            continue
        cells = [r["case"], f"{r['bytes'] / 1e6:.1f}", f"{f['ms']:.4f}", f"{f['gbs']:.0f}",
                 f"{f['pct_copy']:.0f}", target_cell(r)]
        sp = speedups(r)
        for p in peers:
            v = r["peers"].get(p, {})
            cells += ([f"{v['ms']:.4f}", f"{v['gbs']:.0f}", f"{sp[p]:.2f}"] if "ms" in v
                      else ["-", "-", "-"])
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "GB/s counts the minimal bytes (each input read once, each output written "
            "once); x peer = peer ms / fastreg ms (> 1: fastreg faster)."]
    if any(r.get("op") == "dropout" for r in rows):
        out += ["", "Dropout mask kept per element: " + ", ".join(
            f"{peer} {b:g} B" for peer, b in MASK_BYTES_PER_ELEMENT.items())
            + " (fastreg_seed: the mask regenerated in the backward)."]
    return "\n".join(out) + "\n"


# =========================================================================== main

def machine_info(cupy, torch):
    import fastreg
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info = {"device": name, "sms": props["multiProcessorCount"],
            "l2_mb": props["l2CacheSize"] / 2**20, "fastreg": fastreg.__version__,
            "cupy": cupy.__version__, "cuda": cupy.cuda.runtime.runtimeGetVersion(),
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import importlib.metadata
        info["liger"] = importlib.metadata.version("liger-kernel")
    except Exception:  # noqa: BLE001 - not installed
        pass
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one small shape per op")
    p.add_argument("--ops", default="*", help="fnmatch pattern of op names")
    p.add_argument("--repeat", type=int, default=30, help="samples per peer")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    p.add_argument("--skip-torch-adapter", action="store_true",
                   help="do not run the PyTorch adapter's tests and digits example on the GPU")
    p.add_argument("--skip-syncbn", action="store_true",
                   help="do not run the 1-rank NCCL smoke run of fastreg.distributed")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    import cupy
    import torch
    tests = {"exit_code": None, "summary": "", "skips": []} if args.skip_tests else run_tests()
    print(f"GPU tests: {tests['summary']}", flush=True)
    info = machine_info(cupy, torch)
    info["tests"] = tests
    if not args.skip_torch_adapter:
        info["torch_adapter"] = run_torch_adapter()
        print(f"PyTorch adapter tests: {info['torch_adapter']['summary']}", flush=True)
        print("\n".join(info["torch_adapter"]["example"]), flush=True)
    if not args.skip_syncbn:
        info["syncbn_smoke"] = run_syncbn_smoke()
        print("\n".join(info["syncbn_smoke"]["lines"]), flush=True)
    info["copy"] = copy_ceiling(cupy)
    print(f"{info['device']}: copy ceiling {info['copy']['ceiling_gbs']:.0f} GB/s", flush=True)
    rows = []
    for case in select_cases(args.ops, args.quick):
        t0 = time.perf_counter()
        rows.append(measure(case, OPS[case.op], torch, cupy, args.repeat,
                            info["copy"]["ceiling_gbs"]))
        f = rows[-1]["peers"].get("fastreg", {})
        print(f"{case.name}: fastreg {f.get('gbs', float('nan')):.0f} GB/s, "
              f"x {speedups(rows[-1])} ({time.perf_counter() - t0:.1f} s)", flush=True)
        torch.cuda.empty_cache()
        cupy.get_default_memory_pool().free_all_blocks()
    result = {"info": info, "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-{device_slug(info['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(format_markdown(result))
    print(f"wrote {stem}.json and .md")
    return 0 if tests["exit_code"] in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
