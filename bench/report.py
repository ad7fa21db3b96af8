"""Turn a pytest-benchmark JSON (bench/bench_norm.py) into a markdown table.

    python bench/report.py bench/results/cpu.json [--copy-gbs 23.4]

Per case: the median ms of each peer, fastreg's GB/s and % of the copy ceiling
(measured by `python -m fastreg bench`, or passed in), and the ratio to torch.
"""

import argparse
import collections
import json


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--copy-gbs", type=float, default=None, help="copy ceiling in GB/s")
    args = p.parse_args(argv)
    data = json.load(open(args.json))
    groups = collections.defaultdict(dict)
    nbytes = {}
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"]["peer"]] = b["stats"]["median"]
        nbytes[b["group"]] = b["extra_info"]["bytes"]
    peers = ["fastreg", "fastreg fresh", "numpy", "torch"]
    print("| case | " + " | ".join(f"{p} ms" for p in peers) + " | GB/s | % copy | x torch |")
    print("|---" * (len(peers) + 4) + "|")
    for group, t in groups.items():
        fast = t.get("fastreg")
        gbs = nbytes[group] / fast / 1e9 if fast else None
        cells = [f"{t[p] * 1e3:.2f}" if p in t else "-" for p in peers]
        pct = f"{100 * gbs / args.copy_gbs:.0f}" if gbs and args.copy_gbs else "-"
        ratio = f"{t['torch'] / fast:.2f}" if fast and "torch" in t else "-"
        print(f"| {group.replace('|', ' ')} | " + " | ".join(cells) + f" | {gbs:.1f} | {pct} | {ratio} |")


if __name__ == "__main__":
    main()
