"""``python -m fastreg bench|info``.

    python -m fastreg bench [--ops PATTERN] [--quick] [--repeat N] [--out DIR]
    python -m fastreg info

Nothing heavy is imported before the command is known: ``bench`` must set
THP_MEM_ALLOC_ENABLE before torch is imported (see fastreg/_bench.py).
"""

import argparse
import sys

COMMANDS = {
    "bench": "time every op against the copy ceiling, NumPy and PyTorch; verify "
             "the results (exit 1 if any check fails)",
    "info": "versions, thread counts, Numba's threading layer and cache",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m fastreg",
                                description="fastreg command line.")
    sub = p.add_subparsers(dest="command", metavar="{bench,info}", required=True)
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    # Each command parses its own options (so `bench --help` lists bench's options).
    args, rest = p.parse_known_args(argv[:1])
    from fastreg import _bench
    return (_bench.bench if args.command == "bench" else _bench.info)(argv[1:] + rest)


if __name__ == "__main__":
    sys.exit(main())
