"""Call every row of tests/api_table.py on large inputs and save the results to an .npz.

Used by test_concurrency.py in subprocesses (different NUMBA_NUM_THREADS and
threading layers). With ``--threads 8`` every call is also made from 8 Python
threads at once, each on its own copy of the arguments, and must give the
serial call's bits; a mismatch exits with status 1.

Usage: python _run_api_table.py OUT.npz [--threads N] [--backend NAME]
"""

import argparse
import pathlib
import sys
import threading

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from api_table import ALL, build, fresh, results, runs_on  # noqa: E402


def run(api, kw, backend):
    kw = fresh(kw)
    return results(api, kw, api.call(kw, backend if api.backend_kw else None))


def concurrent(api, kw, backend, threads):
    out, errors = [None] * threads, []
    start = threading.Barrier(threads)

    def work(i):
        try:
            k = fresh(kw)
            start.wait()
            out[i] = results(api, k, api.call(k, backend if api.backend_kw else None))
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            errors.append(repr(exc))
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return out, errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args()
    saved, failures = {}, []
    for api in ALL:
        if not runs_on(api, args.backend) or (args.backend != "cpu" and not api.backend_kw):
            continue
        kw = build(api, np.float32, big=args.backend == "cpu")
        serial = run(api, kw, args.backend)
        for i, a in enumerate(serial):
            saved[f"{api.name}_{i}"] = a
        if args.threads:
            outs, errors = concurrent(api, kw, args.backend, args.threads)
            failures += [f"{api.name}: {e}" for e in errors]
            for t, res in enumerate(outs):
                if res is not None and any(a.tobytes() != b.tobytes() or a.shape != b.shape
                                           for a, b in zip(res, serial)):
                    failures.append(f"{api.name}: thread {t} differs from the serial call")
    np.savez(args.out, **saved)
    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print(f"{len({k.rsplit('_', 1)[0] for k in saved})} functions")


if __name__ == "__main__":
    main()
