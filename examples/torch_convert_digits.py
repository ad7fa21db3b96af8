"""Train a small CNN on scikit-learn's digits twice: all PyTorch, then converted to fastreg.

    pip install 'fastreg[torch]' scikit-learn
    python examples/torch_convert_digits.py [--epochs 15] [--quick] [--device cuda]
                                            [--l1 0.05] [--channels-last] [--fuse-relu]

The digits (1797 8x8 images, 10 classes) ship inside scikit-learn: nothing is
downloaded. Both runs start from the same initial weights and see the same
batches. The first trains PyTorch's layers with ``torch.optim.AdamW``; the
second calls ``fastreg.torch.convert`` on the model first, which swaps its
BatchNorm2d, GroupNorm, LayerNorm and Dropout layers for fastreg's (same
parameters, same state_dict), and trains with ``fastreg.torch.optim.AdamW``
(the same update, fused; ``--l1`` adds its proximal L1 step, which PyTorch's
AdamW does not have). The script prints test accuracy, the median
training-step time of each run, and the share of weights at exactly zero.
fastreg's dropout draws other masks than PyTorch's, so the two runs differ
by the noise of training, not by their accuracy.

On the CPU the script sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set:
PyTorch and Numba each run an OpenMP thread pool, and by default OpenMP
threads spin after each parallel region, taking the cores the other pool
needs next (``fastreg.torch``'s docstring has a measurement). It must be set
before either library loads, as here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch and numba load OpenMP
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: huge pages for its CPU allocator

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import fastreg.torch  # noqa: E402
import fastreg.torch.optim  # noqa: E402,F401

nn = torch.nn


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(64, 10))


def load(seed):
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def train(model, optimizer, data, epochs, batch_size, seed, device, memory_format):
    (xtr, ytr), (xte, yte) = ((x.to(device).contiguous(memory_format=memory_format),
                               y.to(device)) for x, y in data)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the dropout masks of either run
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = []
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=g).split(batch_size):
            if len(idx) < 2:  # batch norm needs two samples
                continue
            idx = idx.to(device)
            sync()
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            optimizer.step()
            sync()
            steps.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        accuracy = (model(xte).argmax(1) == yte).float().mean().item()
    zeros = sum(int((p == 0).sum()) for p in model.parameters()) / sum(
        p.numel() for p in model.parameters())
    return accuracy, statistics.median(steps[len(steps) // 10:]), loss.item(), zeros


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="4 epochs (a smoke test)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--l1", type=float, default=0.0,
                        help="L1 strength of fastreg's AdamW (its prox step; PyTorch's has none)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fuse-relu", action="store_true",
                        help="also fuse each BatchNorm2d -> ReLU pair (convert(fuse_relu=True))")
    args = parser.parse_args(argv)
    epochs = 4 if args.quick else args.epochs
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    data = load(args.seed)
    torch.manual_seed(args.seed)
    initial = make_model()
    results = {}
    for name in ("torch", "fastreg"):
        model = copy.deepcopy(initial).to(device, memory_format=fmt)
        hyper = dict(lr=args.lr, weight_decay=args.weight_decay)
        if name == "fastreg":
            fastreg.torch.convert(model, fuse_relu=args.fuse_relu)
            optimizer = fastreg.torch.optim.AdamW(model.parameters(), l1=args.l1, **hyper)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), **hyper)
        results[name] = train(model, optimizer, data, epochs, args.batch_size, args.seed,
                              device, fmt)
    threads = f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY=" \
              f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}" if device.type == "cpu" else ""
    print(f"digits: {len(data[0][1])} train / {len(data[1][1])} test images, {epochs} "
          f"epochs, batch {args.batch_size}, {device}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}"
          f"{', fused ReLU' if args.fuse_relu else ''}, AdamW weight decay {args.weight_decay}"
          f"{f', fastreg l1 {args.l1}' if args.l1 else ''}, {threads}")
    for name, (accuracy, step, loss, zeros) in results.items():
        print(f"{name:8s} test accuracy {accuracy:.4f}   final loss {loss:.4f}   "
              f"median step {step * 1e3:.2f} ms   weights at 0: {zeros:.1%}")
    ratio = results["torch"][1] / results["fastreg"][1]
    print(f"step time torch / fastreg: {ratio:.2f}")
    return results


if __name__ == "__main__":
    main()
