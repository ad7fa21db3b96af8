"""Regularization gallery: one MLP on scikit-learn's digits, trained once per regularizer.

    pip install 'fastreg[test]'          # scikit-learn and matplotlib
    python examples/regularization_gallery.py [--out DIR] [--quick] [--variants a,b,...]

Writes ``DIR/gallery.png`` (train and validation loss per epoch, one panel
per variant) and ``DIR/gallery.md`` (the table below), and prints the table.

The setup, chosen so that the unregularized model overfits visibly
----------------------------------------------------------------
- Data: scikit-learn's digits (1797 8x8 images, 10 classes; it ships inside
  scikit-learn, nothing is downloaded), pixels scaled to [0, 1] (divided by
  16). One fixed permutation puts 300 images in the training set and the
  other 1497 in the validation set. 20% of the training labels are replaced
  by a random other class (label noise; the validation labels stay clean):
  digits is easy enough that a clean training set of this size hardly
  overfits, while with noisy labels fitting the training set perfectly means
  memorizing wrong answers, the situation regularizers exist for. "train acc"
  is measured against the training labels as given, noise included, so a
  training accuracy near 100% (and a large gap) means memorized noise.
- Model: a wide MLP 64 -> 256 -> 256 -> 10 with ReLU (85k weights for 300
  images), float32, the same initial weights in every variant (each Linear
  layer seeded by its position).
- Training: mini-batches of 20 (15 steps per epoch, the same batch order in
  every variant), 150 epochs, SGD with momentum 0.9 and lr 0.01 or Adam(W)
  with lr 1e-3. Penalties (L2, decay, L1, max-norm) apply to the weight
  matrices only, not to the biases or the norm layers' gains (two optimizers
  over disjoint ``names``, PyTorch's parameter groups).
- The strengths were picked by hand on this split (a few values each) so that
  each effect shows; they are not tuned optima.
- Curves: cross-entropy WITHOUT label smoothing, in inference mode (no
  dropout or noise), on the whole training and validation sets after every
  epoch, so every panel measures the same thing. The table reports the last
  epoch (for early stopping: the restored best epoch).
- Early stopping watches the validation loss (patience 10, restore best).
  Here the validation set both picks the epoch and scores it, as in most
  lectures; hold out a third set when the score must be unbiased.
- Adam + L2 and AdamW are shown with the same coefficient 1e-2, and AdamW
  once more with a coefficient large enough to act: Adam divides the L2
  gradient ``weight_decay * w`` by its running RMS, so L2 pulls hardest on
  weights whose data gradients are small, while AdamW shrinks every weight
  by the same factor ``1 - lr * decoupled_weight_decay`` per step (1e-5 at
  lr 1e-3 and 1e-2: next to nothing over 2250 steps).
- Threads: 1 for BLAS and Numba by default (``--threads``). The arrays are
  tiny (20 x 256), so a thread pool costs more than it gives, and the pools of
  OpenBLAS and Numba contend for the cores on a loaded machine.

Every random choice is seeded (``--seed``, default 0): data split, initial
weights, batch order and the Philox streams of the dropout, DropConnect and
noise layers. Two runs with the same seed and thread count give identical
numbers; only the wall times differ.

``--quick`` (for the test suite) trains 4 variants for 5 epochs on the same
data: seconds, not a result to read.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import time

import numpy as np

import fastreg
from fastreg import nn

IN, HIDDEN, CLASSES = 64, 256, 10
N_IMAGES, N_TRAIN, BATCH, EPOCHS = 1797, 300, 20, 150
LABEL_NOISE = 0.2
SGD_LR, MOMENTUM, ADAM_LR = 0.01, 0.9, 1e-3


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training run: the model's extra layers and the optimizer's penalties."""
    key: str                       # command-line name
    title: str                     # panel title and table row
    setting: str                   # the hyperparameters, for the table
    adam: bool = False             # Adam(W) instead of SGD with momentum
    weight_decay: float = 0.0      # coupled L2 (added to the gradient)
    decoupled_weight_decay: float = 0.0
    l1: float = 0.0                # L1 prox (soft-thresholding after each step)
    dropout: float = 0.0           # after each hidden ReLU
    dropout_mode: str = "inverted"
    drop_connect: float = 0.0      # on the hidden Linear layers' weights
    norm: str | None = None        # "batch" | "layer", before each hidden ReLU
    smoothing: float = 0.0         # label smoothing of the training loss
    input_noise: float = 0.0       # std of Gaussian noise added to the pixels
    max_norm: float = 0.0          # max L2 norm of each unit's incoming weights
    patience: int = 0              # early stopping on the validation loss


VARIANTS = [
    Variant("none", "none (SGD)", "SGD, momentum 0.9, lr 0.01"),
    Variant("l2", "L2 (SGD, coupled)", "weight_decay 1e-2", weight_decay=1e-2),
    Variant("adam", "Adam, no decay", "lr 1e-3", adam=True),
    Variant("adam-l2", "Adam + L2 (coupled)", "weight_decay 1e-2", adam=True, weight_decay=1e-2),
    Variant("adamw", "AdamW, same coefficient", "decoupled_weight_decay 1e-2", adam=True,
            decoupled_weight_decay=1e-2),
    Variant("adamw-3", "AdamW (decoupled)", "decoupled_weight_decay 3", adam=True,
            decoupled_weight_decay=3.0),
    Variant("l1", "L1 prox", "l1 1e-2", l1=1e-2),
    Variant("elastic-net", "elastic net", "l1 3e-3 + weight_decay 1e-2", l1=3e-3,
            weight_decay=1e-2),
    Variant("dropout", "dropout (inverted)", "p 0.5 after each hidden ReLU", dropout=0.5),
    Variant("dropout-ws", "dropout (weight scaling)", "p 0.5 after each hidden ReLU",
            dropout=0.5, dropout_mode="weight_scaling"),
    Variant("dropconnect", "DropConnect", "p 0.5 on both hidden layers' weights",
            drop_connect=0.5),
    Variant("batchnorm", "BatchNorm", "BatchNorm1d before each ReLU", norm="batch"),
    Variant("layernorm", "LayerNorm", "LayerNorm before each ReLU", norm="layer"),
    Variant("smoothing", "label smoothing", "smoothing 0.1 (uniform)", smoothing=0.1),
    Variant("noise", "input noise", "Gaussian, std 0.5 on the pixels", input_noise=0.5),
    Variant("max-norm", "max-norm", "each unit's incoming weights, norm <= 0.5", max_norm=0.5),
    Variant("early-stopping", "early stopping", "patience 10 on val loss, restore best",
            patience=10),
]
QUICK = ["none", "l1", "dropout", "early-stopping"]
QUICK_EPOCHS = 5


# --------------------------------------------------------------------------- data, model

def load_data(seed):
    """Pixels in [0, 1] as float32; a fixed split of N_TRAIN training images, LABEL_NOISE of
    whose labels are replaced by a random other class."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    train, val = order[:N_TRAIN], order[N_TRAIN:]
    ytr = y[train].copy()
    flip = np.random.default_rng([seed, 7]).random(N_TRAIN) < LABEL_NOISE
    shift = np.random.default_rng([seed, 8]).integers(1, CLASSES, int(flip.sum()))
    ytr[flip] = (ytr[flip] + shift) % CLASSES        # a random OTHER class
    return x[train], ytr, x[val], y[val]


def build_model(v, seed):
    """The MLP of variant ``v``; initial weights depend on the seed only."""
    def init(i):            # Linear layer i draws from its own stream: same weights everywhere
        return np.random.default_rng([seed, i])

    def philox(i):          # the random layers' streams
        return fastreg.random.Generator(seed * 1000 + i)

    layers = []
    if v.input_noise:
        layers.append(nn.GaussianNoise(v.input_noise, rng=philox(0)))
    for i, fan_in in enumerate((IN, HIDDEN)):
        if v.drop_connect:
            layers.append(nn.DropConnectLinear(fan_in, HIDDEN, v.drop_connect, rng=init(i),
                                               mask_rng=philox(10 + i)))
        else:
            layers.append(nn.Linear(fan_in, HIDDEN, rng=init(i)))
        if v.norm == "batch":
            layers.append(nn.BatchNorm1d(HIDDEN))
        elif v.norm == "layer":
            layers.append(nn.LayerNorm(HIDDEN))
        layers.append(nn.ReLU())
        if v.dropout:
            layers.append(nn.Dropout(v.dropout, mode=v.dropout_mode, rng=philox(20 + i)))
    layers.append(nn.Linear(HIDDEN, CLASSES, rng=init(2)))
    return nn.Sequential(*layers)


def weight_names(model):
    return [k for k, p in model.params.items() if k.endswith(".weight") and p.ndim == 2]


def optimizers(v, model):
    """Penalties on the weight matrices; biases and gains by the plain rule."""
    weights = weight_names(model)
    rest = [k for k in model.params if k not in weights]
    constraints = [nn.MaxNorm(model, v.max_norm, names=weights)] if v.max_norm else []
    if v.adam:
        decay = dict(weight_decay=v.weight_decay,
                     decoupled_weight_decay=v.decoupled_weight_decay)
        return [nn.AdamW(model, lr=ADAM_LR, l1=v.l1, names=weights, constraints=constraints,
                         **decay),
                nn.AdamW(model, lr=ADAM_LR, decoupled_weight_decay=0.0, names=rest)]
    return [nn.SGD(model, lr=SGD_LR, momentum=MOMENTUM, weight_decay=v.weight_decay,
                   decoupled_weight_decay=v.decoupled_weight_decay, l1=v.l1, names=weights,
                   constraints=constraints),
            nn.SGD(model, lr=SGD_LR, momentum=MOMENTUM, names=rest)]


# --------------------------------------------------------------------------- training

def evaluate(model, loss_fn, x, y):
    logits = model.forward(x, training=False)
    loss, _ = loss_fn(logits, y)
    return loss, float(np.mean(np.argmax(logits, axis=1) == y))


def train(v, data, epochs, seed):
    """Train variant ``v``; returns its curves and final numbers (no wall time)."""
    xtr, ytr, xva, yva = data
    model = build_model(v, seed)
    opts = optimizers(v, model)
    loss_fn = nn.CrossEntropyLoss(v.smoothing)
    eval_fn = nn.CrossEntropyLoss()
    stop = nn.EarlyStopping(patience=v.patience, mode="min") if v.patience else None
    order = np.random.default_rng([seed, 99])      # the same batches in every variant
    xb = np.empty((BATCH, IN), np.float32)
    yb = np.empty(BATCH, np.int64)
    curves = {"train_loss": [], "val_loss": [], "train_acc": [], "val_acc": []}
    epochs_run = 0
    for _ in range(epochs):
        perm = order.permutation(len(ytr))
        for s in range(0, len(ytr) - BATCH + 1, BATCH):   # whole batches: buffers reused
            idx = perm[s:s + BATCH]
            np.take(xtr, idx, axis=0, out=xb)
            np.take(ytr, idx, out=yb)
            _, dlogits = loss_fn(model.forward(xb, training=True), yb)
            model.backward(dlogits)
            for opt in opts:
                opt.step()
        epochs_run += 1
        tl, ta = evaluate(model, eval_fn, xtr, ytr)
        vl, va = evaluate(model, eval_fn, xva, yva)
        for k, val in zip(curves, (tl, vl, ta, va)):
            curves[k].append(val)
        if stop is not None and stop.step(vl, model):
            break
    best_epoch = None
    if stop is not None:
        stop.restore(model)            # also when the epoch budget ran out first
        best_epoch = stop.best_epoch
    tl, ta = evaluate(model, eval_fn, xtr, ytr)
    vl, va = evaluate(model, eval_fn, xva, yva)
    w = np.concatenate([model.params[k].ravel() for k in weight_names(model)])
    return dict(key=v.key, title=v.title, setting=v.setting, epochs=epochs_run,
                best_epoch=best_epoch, train_loss=tl, val_loss=vl, train_acc=ta, val_acc=va,
                gap=ta - va, weight_norm=float(np.sqrt(np.sum(w.astype(np.float64) ** 2))),
                sparsity=float(np.mean(w == 0)), curves=curves)


@contextlib.contextmanager
def thread_limit(threads):
    """BLAS and Numba thread counts for the run, restored afterwards."""
    import numba
    from threadpoolctl import threadpool_limits      # installed with scikit-learn
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(before)


def run(variants, epochs, seed=0, threads=1):
    """Train every variant; returns the result dicts (with ``seconds``) and the total time."""
    start = time.perf_counter()
    data = load_data(seed)
    results = []
    with thread_limit(threads):
        # one step of each variant first: Numba compilation (or its cache load) stays out
        # of the per-variant times
        small = tuple(a[:BATCH] for a in data[:2]) * 2
        for v in variants:
            train(v, small, 1, seed)
        for v in variants:
            t0 = time.perf_counter()
            r = train(v, data, epochs, seed)
            r["seconds"] = time.perf_counter() - t0
            results.append(r)
    return results, time.perf_counter() - start


# --------------------------------------------------------------------------- outputs

def table(results):
    head = ("| variant | setting | val acc | train acc | gap | val loss | weight norm "
            "| zeros | epochs | time (s) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [head]
    for r in results:
        epochs = str(r["epochs"])
        if r["best_epoch"] is not None:
            epochs += f" (best {r['best_epoch'] + 1})"
        rows.append(f"| {r['title']} | {r['setting']} | {100 * r['val_acc']:.1f}% | "
                    f"{100 * r['train_acc']:.1f}% | {100 * r['gap']:.1f} | "
                    f"{r['val_loss']:.3f} | {r['weight_norm']:.1f} | "
                    f"{100 * r['sparsity']:.1f}% | {epochs} | {r['seconds']:.1f} |")
    return "\n".join(rows)


def write_markdown(path, results, total, args, load):
    import platform
    import numba
    lines = [
        "# Regularization gallery",
        "",
        f"`python examples/regularization_gallery.py{' --quick' if args.quick else ''}` "
        f"(seed {args.seed}, {args.threads} thread{'s' if args.threads > 1 else ''}): "
        f"an MLP {IN}-{HIDDEN}-{HIDDEN}-{CLASSES} (ReLU) on scikit-learn's digits, "
        f"{N_TRAIN} training images with {100 * LABEL_NOISE:.0f}% of their labels replaced "
        f"by a random other class, {N_IMAGES - N_TRAIN} validation images (clean labels), "
        f"batches of {BATCH}, {args.epochs} epochs. Losses are the plain cross-entropy in "
        "inference mode; train acc is against the (noisy) training labels; gap = train acc "
        "- val acc (points); weight norm = L2 norm of all weight matrices together; zeros = "
        "fraction of weights exactly 0; time = training and per-epoch evaluation of the "
        "variant.",
        "",
        table(results),
        "",
        f"Total {total:.1f} s including data loading and a one-step warm-up of each variant "
        f"(Numba cache loads); load average {load[0]:.1f} at the start, {load[1]:.1f} at the "
        f"end on {os.cpu_count()} logical cores; numpy {np.__version__}, numba "
        f"{numba.__version__}, python {platform.python_version()}.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(path, results, epochs):
    """A grid of panels, one per variant: train and validation loss per epoch (linear
    scale, shared axes), the validation minimum marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), sharex=True,
                             sharey=True, squeeze=False)
    top = max(max(max(r["curves"]["train_loss"]), max(r["curves"]["val_loss"]))
              for r in results)
    for i, (ax, r) in enumerate(zip(axes.flat, results)):
        c = r["curves"]
        x = np.arange(1, len(c["train_loss"]) + 1)
        best = int(np.argmin(c["val_loss"]))
        ax.plot(x, c["train_loss"], color="#1b6ca8", linewidth=1.2, label="train")
        ax.plot(x, c["val_loss"], color="#e67e22", linewidth=1.2, label="validation")
        ax.plot(best + 1, c["val_loss"][best], "o", color="#e67e22", markersize=3.5,
                label="validation minimum")
        if r["best_epoch"] is not None:
            ax.axvline(r["best_epoch"] + 1, color="gray", linestyle=":", linewidth=1.2,
                       label="restored epoch")
        ax.set_title(f"{r['title']}\nval acc {100 * r['val_acc']:.1f}%, "
                     f"gap {100 * r['gap']:.1f}", fontsize=8)
        ax.set_ylim(0, top * 1.05)
        ax.set_xlim(0, epochs + 1)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("cross-entropy", fontsize=8)
        if i + cols >= n:
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    handles = {}
    for ax in axes.flat[:n]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    for ax in axes.flat[n:]:
        ax.axis("off")
    if n < rows * cols:
        axes.flat[n].legend(handles.values(), handles.keys(), loc="center", fontsize=8,
                            frameon=False)
    else:
        axes.flat[0].legend(handles.values(), handles.keys(), fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gallery-out", help="folder for gallery.png/.md")
    parser.add_argument("--quick", action="store_true",
                        help=f"{len(QUICK)} variants, {QUICK_EPOCHS} epochs (the test suite)")
    parser.add_argument("--variants", help="comma-separated keys: "
                        + ", ".join(v.key for v in VARIANTS))
    parser.add_argument("--epochs", type=int, help=f"default {EPOCHS} ({QUICK_EPOCHS} quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    by_key = {v.key: v for v in VARIANTS}
    keys = (args.variants.split(",") if args.variants
            else QUICK if args.quick else list(by_key))
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(by_key)}")
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else EPOCHS
    if args.epochs < 1 or args.threads < 1:
        parser.error("--epochs and --threads must be >= 1")
    loadavg = getattr(os, "getloadavg", lambda: (math.nan,))     # absent on Windows
    load = [loadavg()[0]]
    results, total = run([by_key[k] for k in keys], args.epochs, args.seed, args.threads)
    load.append(loadavg()[0])
    os.makedirs(args.out, exist_ok=True)
    write_markdown(os.path.join(args.out, "gallery.md"), results, total, args, load)
    plot(os.path.join(args.out, "gallery.png"), results, args.epochs)
    print(table(results))
    print(f"total {total:.1f} s; wrote {os.path.join(args.out, 'gallery.md')} and "
          f"{os.path.join(args.out, 'gallery.png')}")
    return results


if __name__ == "__main__":
    main()
