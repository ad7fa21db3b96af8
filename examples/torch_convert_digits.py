"""Train a small CNN on scikit-learn's digits twice: PyTorch's norm layers, then fastreg's.

    pip install 'fastreg[torch]' scikit-learn
    python examples/torch_convert_digits.py [--epochs 15] [--channels-last] [--fuse-relu]

The digits (1797 8x8 images, 10 classes) ship inside scikit-learn: nothing is
downloaded. Both runs start from the same initial weights and see the same
batches; the second one calls ``fastreg.torch.convert`` on the model first,
which swaps its BatchNorm2d, GroupNorm and LayerNorm layers for fastreg's
(same parameters, same state_dict). The script prints test accuracy and the
median training-step time of each run.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: huge pages for its CPU allocator

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import fastreg.torch  # noqa: E402

nn = torch.nn


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
        nn.Linear(64, 10))


def load(seed):
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def train(model, data, epochs, batch_size, seed, memory_format):
    (xtr, ytr), (xte, yte) = data
    xtr, xte = xtr.contiguous(memory_format=memory_format), xte.contiguous(
        memory_format=memory_format)
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=g).split(batch_size):
            if len(idx) < 2:  # batch norm needs two samples
                continue
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            optimizer.step()
            steps.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        accuracy = (model(xte).argmax(1) == yte).float().mean().item()
    return accuracy, statistics.median(steps[len(steps) // 10:]), loss.item()  # skip warm-up


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fuse-relu", action="store_true",
                        help="also fuse each BatchNorm2d -> ReLU pair (convert(fuse_relu=True))")
    args = parser.parse_args(argv)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    data = load(args.seed)
    torch.manual_seed(args.seed)
    initial = make_model()
    results = {}
    for name in ("torch", "fastreg"):
        model = copy.deepcopy(initial)
        if name == "fastreg":
            fastreg.torch.convert(model, fuse_relu=args.fuse_relu)
        results[name] = train(model, data, args.epochs, args.batch_size, args.seed, fmt)
    print(f"digits: {len(data[0][1])} train / {len(data[1][1])} test images, {args.epochs} "
          f"epochs, batch {args.batch_size}, {'channels_last' if args.channels_last else 'NCHW'}"
          f"{', fused ReLU' if args.fuse_relu else ''}, {torch.get_num_threads()} threads")
    for name, (accuracy, step, loss) in results.items():
        print(f"{name:8s} test accuracy {accuracy:.4f}   final loss {loss:.4f}   "
              f"median step {step * 1e3:.2f} ms")
    ratio = results["torch"][1] / results["fastreg"][1]
    print(f"step time torch / fastreg: {ratio:.2f}")
    return results


if __name__ == "__main__":
    main()
