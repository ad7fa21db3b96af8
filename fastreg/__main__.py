"""``python -m fastreg bench|info``."""

import sys


def info():
    import os
    import platform

    import numba
    import numpy as np

    import fastreg
    from fastreg.cpu._common import CACHE

    print(f"fastreg {fastreg.__version__} (python {platform.python_version()}, "
          f"numpy {np.__version__}, numba {numba.__version__})")
    print(f"numba threads: {numba.config.NUMBA_NUM_THREADS}, threading layer: "
          f"{numba.config.THREADING_LAYER} (requested)")
    print(f"numba cache: {'on' if CACHE else 'off (FASTREG_NUMBA_CACHE=0)'}, dir: "
          f"{os.environ.get('NUMBA_CACHE_DIR') or 'beside the package (__pycache__)'}")
    try:
        import torch
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        print("torch: not installed")
    print("backends: cpu (Numba), reference (NumPy); cuda: not available yet")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("bench", "info"):
        print("usage: python -m fastreg bench [--ops PATTERN] [--quick] [--repeat N] [--out DIR]\n"
              "       python -m fastreg info", file=sys.stderr)
        return 2
    if argv[0] == "info":
        return info()
    from fastreg._bench import bench
    return bench(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
