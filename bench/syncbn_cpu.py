"""Sync batch norm on the CPU: forward+backward of a 64x64x56x56 float32 batch
(NCHW) split across 1, 2 and 4 ranks, fastreg against PyTorch on gloo.

    python bench/syncbn_cpu.py [--repeats 15] [--out bench/results/syncbn-cpu.md]

Each configuration is a set of processes (torch.distributed over gloo through a
FileStore, or mpiexec with mpi4py); rank r holds samples [64 r / R, 64 (r+1) / R).
A step is a barrier, then forward and backward on every rank, then a barrier;
rank 0 times it (the slowest rank sets it) and reports the median over the
repeats after 3 warm-up steps, the peers taking turns step by step. Threads per rank: 2 // R (at least 1), for
Numba and torch alike.

Peers:
- fastreg: ``sync_batch_norm`` + ``sync_batch_norm_backward`` (weight, bias,
  running statistics), into reused outputs (``out=``) and into fresh ones;
- torch: ``nn.SyncBatchNorm`` refuses CPU tensors and its statistics kernels
  (``torch.batch_norm_stats`` etc.) exist only for GPUs, so the peer is the
  same algorithm in torch's CPU ops: ``batch_norm_update_stats`` per rank, an allgather of
  (mean, invstd, count) as nn.SyncBatchNorm sends it, the merged statistics,
  ``F.batch_norm`` with them; backward: the two local sums from the fused
  ``native_batch_norm_backward`` (about the global statistics), all-reduced,
  then dx = a*dy + b*x + c per channel with two ``addcmul`` passes (fresh
  outputs, as torch allocates them);
- 1 rank also runs single-process ``fastreg.batch_norm`` and torch's
  ``F.batch_norm`` with autograd, for what the split costs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

N, C, H, W = 64, 64, 56, 56
HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


# --------------------------------------------------------------------------- one rank

def _torch_sync_bn_step(torch, dist, x, dy, w, b, rm, rv, sent):
    """The algorithm of torch.nn.SyncBatchNorm, in torch's fused CPU ops where they exist."""
    eps, momentum = 1e-5, 0.1
    R = dist.get_world_size()
    n_local = x.numel() // x.shape[1]
    if n_local:
        # torch's CPU batch-norm statistics kernel: (mean, biased var); 3.5x faster here
        # than torch.var_mean over (0, 2, 3)
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    else:
        var = mean = torch.zeros(x.shape[1])
    combined = torch.cat([mean, torch.rsqrt(var + eps), torch.full((1,), float(n_local))])
    gathered = [torch.empty_like(combined) for _ in range(R)]
    dist.all_gather(gathered, combined)  # nn.SyncBatchNorm's list form on gloo
    sent.append(combined.nbytes)
    g = torch.stack(gathered)
    means, invstds, counts = g[:, :C], g[:, C:2 * C], g[:, 2 * C:]
    n = counts.sum()
    mean_g = (means * counts).sum(0) / n
    var_g = ((1.0 / invstds**2 - eps + (means - mean_g) ** 2) * counts).sum(0) / n
    with torch.no_grad():
        rm.mul_(1 - momentum).add_(mean_g, alpha=momentum)
        rv.mul_(1 - momentum).add_(var_g * (n / (n - 1)), alpha=momentum)
    y = torch.nn.functional.batch_norm(x, mean_g, var_g, w, b, training=False, eps=eps)
    invstd_g = torch.rsqrt(var_g + eps)
    # backward: the local sums by the fused CPU kernel (grad_weight = sum(dy * xhat),
    # grad_bias = sum(dy) about the global statistics), all-reduced
    _, gw, gb = torch.ops.aten.native_batch_norm_backward(
        dy, x, w, None, None, mean_g, invstd_g, True, eps, [False, True, True])
    sums = torch.stack([gb, gw])
    grad_w_local, grad_b_local = gw.clone(), gb.clone()
    dist.all_reduce(sums)
    sent.append(sums.nbytes)
    # dx = a * dy + (b * x + c) per channel, in two fused passes
    a = invstd_g * w
    k = a * invstd_g * sums[1] / n
    c = mean_g * k - a * sums[0] / n
    dx = torch.addcmul(c[:, None, None], x, -k[:, None, None])
    dx.addcmul_(dy, a[:, None, None])
    return y, dx, grad_w_local, grad_b_local


def rank_main(args):
    threads = max(1, 2 // args.world)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    import numpy as np
    import torch
    torch.set_num_threads(threads)

    import fastreg
    from fastreg.distributed import CountingComm, MPIComm, TorchComm, sync_batch_norm, \
        sync_batch_norm_backward

    if args.mode == "mpi":
        comm = MPIComm()
        rank, world = comm.rank, comm.size

        def barrier():
            comm.comm.Barrier()
    else:
        import torch.distributed as dist
        rank, world = args.rank, args.world
        dist.init_process_group("gloo", store=dist.FileStore(args.store, world), rank=rank,
                                world_size=world)
        comm = TorchComm()

        def barrier():
            dist.barrier()

    lo, hi = N * rank // world, N * (rank + 1) // world
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((hi - lo, C, H, W), dtype=np.float32) * 2 + 0.5
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    counting = CountingComm(comm)
    outs = (np.empty_like(x), np.empty(C), np.empty(C))
    gouts = (np.empty_like(x), np.empty_like(w), np.empty_like(b))

    def fastreg_step(reuse):
        y, mean, rstd, n = sync_batch_norm(x, w, b, rm, rv, comm=counting,
                                           out=outs if reuse else None)
        return sync_batch_norm_backward(dy, x, mean, rstd, n, w, b, comm=counting,
                                        out=gouts if reuse else None)

    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    wt, bt = torch.from_numpy(w.copy()), torch.from_numpy(b.copy())
    rmt, rvt = torch.zeros(C), torch.ones(C)
    torch_sent = []

    peers = {"fastreg out=": lambda: fastreg_step(True),
             "fastreg fresh": lambda: fastreg_step(False)}
    if args.mode == "gloo":
        import torch.distributed as dist
        peers["torch ops + gloo"] = lambda: _torch_sync_bn_step(torch, dist, xt, dyt, wt, bt,
                                                                rmt, rvt, torch_sent)
    if world == 1 and args.mode == "gloo":
        def fastreg_single():
            y, m, r = fastreg.batch_norm(x, w, b, rm, rv, out=outs[:1] + (None, None))
            return fastreg.batch_norm_backward(dy, x, m, r, w, b, out=gouts)

        xg = xt.clone().requires_grad_(True)
        wg, bg = wt.clone().requires_grad_(True), bt.clone().requires_grad_(True)

        def torch_single():
            xg.grad = wg.grad = bg.grad = None
            y = torch.nn.functional.batch_norm(xg, rmt, rvt, wg, bg, training=True)
            y.backward(dyt)

        peers["fastreg batch_norm (1 process)"] = fastreg_single
        peers["torch F.batch_norm + autograd (1 process)"] = torch_single

    # agreement of the two sync implementations (dx of this rank's slice)
    check = {}
    if "torch ops + gloo" in peers:
        dx_f = fastreg_step(False)[0]
        dx_t = peers["torch ops + gloo"]()[1].numpy()
        check["max |dx fastreg - dx torch|"] = float(np.max(np.abs(dx_f - dx_t), initial=0))

    times = {name: [] for name in peers}
    for i in range(3 + args.repeats):  # round robin, so that load on the machine hits every peer
        for name, step in peers.items():
            barrier()
            t0 = time.perf_counter()
            step()
            barrier()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    counting.reset()
    fastreg_step(True)
    torch_sent.clear()
    if "torch ops + gloo" in peers:
        peers["torch ops + gloo"]()
    if rank == 0:
        result = dict(world=world, mode=args.mode, threads=threads, slice=hi - lo,
                      times=times, fastreg_calls=counting.calls, torch_payloads=torch_sent,
                      check=check)
        pathlib.Path(args.json).write_text(json.dumps(result))
    if args.mode == "gloo":
        import torch.distributed as dist
        dist.destroy_process_group()


# --------------------------------------------------------------------------- driver

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("NUMBA_NUM_THREADS", None)
    # as fastreg's bench: without it torch's allocator spends much of a call on page faults
    env["THP_MEM_ALLOC_ENABLE"] = "1"
    return env


def run_config(mode, world, repeats, tmp):
    out = pathlib.Path(tmp) / f"{mode}-{world}.json"
    load = os.getloadavg()[0]
    me = [sys.executable, str(pathlib.Path(__file__).resolve()), "--rank-of", mode,
          "--world", str(world), "--json", str(out), "--repeats", str(repeats)]
    if mode == "mpi":
        launcher = pathlib.Path(sys.executable).parent / "mpiexec"
        launcher = str(launcher) if launcher.exists() else shutil.which("mpiexec")
        proc = subprocess.run([launcher, "-n", str(world), *me], env=_env(),
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            raise RuntimeError(proc.stdout + proc.stderr)
    else:
        store = pathlib.Path(tmp) / f"store-{world}"
        procs = [subprocess.Popen([*me, "--rank", str(r), "--store", str(store)], env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        for p in procs:
            text, _ = p.communicate(timeout=1800)
            if p.returncode:
                raise RuntimeError(text)
    result = json.loads(out.read_text())
    result["load"] = load
    return result


def report(results, repeats):
    import numpy as np
    import torch

    import fastreg
    lines = [
        "# Sync batch norm on the CPU: forward + backward, 64x64x56x56 float32 (NCHW)",
        "",
        f"    fastreg {fastreg.__version__} | numpy {np.__version__} | torch {torch.__version__}"
        f" | python {platform.python_version()}",
        f"    cpu: {os.cpu_count()} logical cores, {platform.processor() or platform.machine()}"
        " | shared with other jobs while measured",
        "    each rank holds its slice of the 64 samples; threads per rank = 2 // ranks (>= 1);"
        " THP_MEM_ALLOC_ENABLE=1 for torch",
        f"    median of {repeats} steps after 3 warm-up steps, peers in turn; a step = barrier, "
        "fwd + bwd on every rank, barrier (timed on rank 0)",
        "",
        "The machine has 2 cores and was shared with other jobs: absolute times are noisy,",
        "compare ratios within one configuration (same ranks and transport, peers measured",
        "in turn). 4 ranks oversubscribe it (4 processes on 2 cores), so their times measure",
        "contention more than scaling.",
        "",
        "torch's own `nn.SyncBatchNorm` refuses CPU tensors in torch "
        f"{torch.__version__} (\"SyncBatchNorm expected input tensor to be on GPU or XPU or "
        "privateuseone\"), and the kernels behind it (`torch.batch_norm_stats`, "
        "`batch_norm_gather_stats_with_counts`, `batch_norm_backward_reduce/elemt`) have no "
        "CPU implementation. The torch peer is therefore the same algorithm written with "
        "torch's CPU ops over the same gloo transport (see bench/syncbn_cpu.py).",
        "",
        f"Load average of the machine (1 min) when each configuration started: "
        + ", ".join(f"{r['mode']} x {r['world']}: {r['load']:.1f}" for r in results) + ".",
        "",
        "| ranks | transport | peer | ms per step (median) | min | x torch ops + gloo |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for res in results:
        med = {k: statistics.median(v) * 1e3 for k, v in res["times"].items()}
        low = {k: min(v) * 1e3 for k, v in res["times"].items()}
        ref = med.get("torch ops + gloo")
        for name, ms in med.items():
            transport = "-" if "1 process" in name else (
                "MPICH (mpi4py)" if res["mode"] == "mpi" else "gloo")
            ratio = f"{ref / ms:.2f}" if ref and transport != "-" else ""
            lines.append(f"| {res['world']} | {transport} | {name} | {ms:.1f} | {low[name]:.1f} "
                         f"| {ratio} |")
    lines += [
        "",
        "Reading: the total work is the same at every rank count (the batch is split, not",
        "replicated) and the machine has 2 cores, so more ranks cannot run faster than 1 rank",
        "with 2 threads; what the rows show is the overhead of the split and of the",
        "transport. At 1 rank the split costs against single-process `batch_norm`: the",
        "forward reads x twice (statistics, then y, with the exchange between) and the",
        "backward reads dy and x twice (sums, then dx), 5 passes over the activations instead",
        "of 3, plus the collectives.",
    ]
    lines += ["", "## Bytes on the wire per step (per rank)", ""]
    for res in results:
        if res["world"] == 2 and res["mode"] == "gloo":
            calls = res["fastreg_calls"]
            payload = sum(p for _, p, _ in calls)
            lines.append(f"- fastreg: {', '.join(f'{op} {p} B (result {r} B)' for op, p, r in calls)}"
                         f"; payload {payload} B = {payload // (8 * C)} float64 x {C} channels"
                         " (5 values per channel)")
            tp = res["torch_payloads"]
            lines.append(f"- torch (nn.SyncBatchNorm's messages): "
                         f"{' + '.join(str(p) for p in tp)} = {sum(tp)} B "
                         f"(allgather of 2C+1 float32, allreduce of 2C float32)")
            lines.append("- measured by wrapping the communicator (`fastreg.distributed."
                         "CountingComm`) and by summing the torch peer's tensors; an allgather "
                         "returns R times its payload to every rank, and a ring allreduce moves "
                         "about twice its payload over the links.")
            if res["check"]:
                lines.append(f"- agreement on 2 ranks: {res['check']}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(HERE / "results" / "syncbn-cpu.md"))
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--modes", default="gloo,mpi")
    ap.add_argument("--rank-of", dest="mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return rank_main(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in map(int, args.ranks.split(",")):
            for mode in args.modes.split(","):
                print(f"{mode} x {world} ...", file=sys.stderr, flush=True)
                results.append(run_config(mode, world, args.repeats, tmp))
    text = report(results, args.repeats)
    pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
