"""Turn a pytest-benchmark JSON of bench/bench_norm.py into a markdown table.

    python -m pytest bench/ --benchmark-only --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json [--copy-gbs 23.4] [--out bench/results/cpu.md]

One row per case (a benchmark group ``<op>_<dir>|<shape>|<dtype>``): the
median ms of each peer; fastreg's GB/s over the case's minimal byte count and
its % of the copy ceiling, for ``out=`` and fresh outputs; its speed-up over
the NumPy reference and over PyTorch (x > 1: fastreg is faster). The copy
ceiling comes from the JSON (bench/conftest.py measures it) unless
``--copy-gbs`` is given. Standard library only.
"""

import argparse
import json
import pathlib
import sys

PEERS = ("fastreg", "fastreg fresh", "numpy", "torch")
HEAD = ["case", "layout", "MB", "fastreg ms", "GB/s", "% copy", "fresh ms", "fresh GB/s",
        "numpy ms", "x numpy", "torch ms", "x torch", "x torch (fresh)"]


def load(path):
    """``(cases, machine)``: {group: {"bytes", "layout", "median": {peer: s}}} in file order."""
    data = json.loads(pathlib.Path(path).read_text())
    cases = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "peer" not in info or "bytes" not in info:
            continue                                   # not a bench_norm benchmark
        c = cases.setdefault(b["group"], {"bytes": info["bytes"],
                                          "layout": info.get("layout", ""), "median": {}})
        c["median"][info["peer"]] = b["stats"]["median"]
    return cases, data.get("machine_info", {})


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def rows(cases, copy_gbs):
    out = []
    for group, c in cases.items():
        t, nbytes = c["median"], c["bytes"]
        fast, fresh, numpy, torch = (t.get(p) for p in PEERS)
        gbs = nbytes / fast / 1e9 if fast else None
        fresh_gbs = nbytes / fresh / 1e9 if fresh else None
        ratio = lambda a, b: a / b if a and b else None  # noqa: E731
        out.append([group.replace("|", " "), c["layout"], f"{nbytes / 1e6:.1f}",
                    _fmt(fast and fast * 1e3, ".3f"), _fmt(gbs, ".1f"),
                    _fmt(gbs and copy_gbs and 100 * gbs / copy_gbs, ".0f"),
                    _fmt(fresh and fresh * 1e3, ".3f"), _fmt(fresh_gbs, ".1f"),
                    _fmt(numpy and numpy * 1e3, ".2f"), _fmt(ratio(numpy, fast), ".1f"),
                    _fmt(torch and torch * 1e3, ".3f"), _fmt(ratio(torch, fast), ".2f"),
                    _fmt(ratio(torch, fresh), ".2f")])
    return out


def markdown(cases, machine, copy_gbs):
    fr = machine.get("fastreg", {})
    lines = []
    if fr:
        lines.append(f"fastreg {fr.get('fastreg')}, numpy {fr.get('numpy')}, numba "
                     f"{fr.get('numba')} ({fr.get('numba_threading_layer')}, "
                     f"{fr.get('numba_threads')} threads), torch {fr.get('torch')} "
                     f"(THP_MEM_ALLOC_ENABLE={fr.get('THP_MEM_ALLOC_ENABLE')}); "
                     f"{fr.get('cpu')}, {fr.get('cores')} cores.")
    lines.append(f"Copy ceiling {_fmt(copy_gbs, '.1f')} GB/s (bytes read + written). "
                 "Medians; GB/s over the minimal bytes (inputs read once, outputs written "
                 "once); x > 1 means fastreg is faster.")
    lines += ["", "| " + " | ".join(HEAD) + " |",
              "|" + "|".join("---" if i < 2 else "---:" for i in range(len(HEAD))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(cases, copy_gbs)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="pytest-benchmark JSON -> markdown table")
    p.add_argument("json", help="file written by --benchmark-json")
    p.add_argument("--copy-gbs", type=float, default=None,
                   help="copy ceiling in GB/s (default: the one measured in the run)")
    p.add_argument("--out", default=None, help="write the table here instead of stdout")
    args = p.parse_args(argv)
    cases, machine = load(args.json)
    if not cases:
        print(f"{args.json}: no bench_norm benchmarks (extra_info 'peer'/'bytes') found",
              file=sys.stderr)
        return 1
    copy_gbs = args.copy_gbs or machine.get("fastreg", {}).get("copy", {}).get("ceiling_gbs")
    text = markdown(cases, machine, copy_gbs)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
