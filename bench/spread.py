"""How far the ratios to PyTorch move between runs of ``python -m fastreg bench``.

    python bench/spread.py RUN.json [RUN.json ...] [--out FILE]

Each argument is a ``results.json`` (or the folder holding one). One row per
norm case and direction (float32, CPU): in each run, fastreg's speed-up over
PyTorch with ``out=`` and with fresh outputs, and the most any kernel could
reach there ("at most": PyTorch's time over the case's floor bytes moved at
the speed of the copy timed beside it); then the lowest and highest ratio over
the runs. A ratio that crosses a target between runs of unchanged kernels is
set by the machine's state (its bandwidth, what is in its cache, whether a
fresh output's pages must be faulted in), not by the kernel. Standard library
only.
"""

import argparse
import json
import pathlib
import sys


def load(path):
    """{(op, shape, layout, dir): (x torch out=, x torch fresh, at most)} of one run."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "results.json"
    rows = {}
    for r in json.loads(p.read_text())["rows"]:
        if (r.get("family") != "norm" or r.get("dtype") != "float32" or r.get("backend") != "cpu"
                or r.get("direction") not in ("fwd", "bwd") or "x torch" not in r.get("fastreg", {})):
            continue
        key = (r["op"], "x".join(map(str, r["shape"])), r["layout"], r["direction"])
        fresh = r.get("fastreg fresh", {}).get("x torch")
        rows[key] = (r["fastreg"]["x torch"], fresh, r.get("x torch at floor"))
    return rows


def _f(v):
    return "-" if v is None else f"{v:.2f}"


def table(runs):
    """Markdown: one column per run, then the range of each ratio over the runs."""
    keys = []
    for run in runs:
        keys += [k for k in run if k not in keys]
    head = ["case", "dir"] + [f"run {i + 1}" for i in range(len(runs))] + [
        "out= lowest-highest", "fresh lowest-highest"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for key in keys:
        cells, outs, freshes = [], [], []
        for run in runs:
            if key not in run:
                cells.append("-")
                continue
            out, fresh, at_most = run[key]
            outs.append(out)
            if fresh is not None:
                freshes.append(fresh)
            cells.append(f"{_f(out)} / {_f(fresh)} (at most {_f(at_most)})")
        rng = [f"{min(v):.2f}-{max(v):.2f}" if v else "-" for v in (outs, freshes)]
        lines.append(f"| {key[0]} {key[1]} {key[2]} | {key[3]} | " + " | ".join(cells + rng) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="results.json files, or folders holding one")
    ap.add_argument("--out", help="write the table here as well as to stdout")
    args = ap.parse_args(argv)
    text = ("x torch per run: with out= / with fresh outputs (the most a kernel could reach "
            "with out=)\n\n" + table([load(p) for p in args.runs]) + "\n")
    sys.stdout.write(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
