"""The machine's memory read bandwidth, measured with the same thread count as the benchmarks.

Decode of a large model is bound by how fast the weights stream from memory: tokens/s can be
at most (read bandwidth) / (bytes read per token). Several readers stream a buffer far larger
than the caches, split across the threads: a small C program (``bandwidth_read.c``, built here
with the host compiler and ``-O3 -march=native``; skipped without a compiler), and three NumPy
readers (NumPy and BLAS release the GIL): a float64 sum, a byte count and a float32
matrix-vector product (BLAS gemv). The best pass of the fastest reader is the bandwidth; every
reader's figure is reported.

    python -m bench.bandwidth [--threads 2] [--mib 2048] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def c_read_bandwidth(threads: int, mib: int, passes: int = 5) -> Optional[float]:
    """GB/s of bandwidth_read.c, or None when no C compiler is available or it fails."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    src = Path(__file__).with_name("bandwidth_read.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "bandwidth_read"
        for flags in (["-O3", "-march=native"], ["-O3"]):
            if subprocess.run([cc, *flags, "-pthread", str(src), "-o", str(exe)], capture_output=True).returncode == 0:
                break
        else:
            return None
        p = subprocess.run([str(exe), str(mib), str(threads), str(passes)], capture_output=True, text=True)
        return float(p.stdout.split()[0]) if p.returncode == 0 else None


def _threaded(fn: Callable[[np.ndarray], object], buf: np.ndarray, threads: int) -> Callable[[], None]:
    slices = np.array_split(buf, threads)

    def run() -> None:
        workers = [threading.Thread(target=fn, args=(s,)) for s in slices]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return run


def read_bandwidth(threads: int = 2, mib: int = 2048, passes: int = 5) -> dict[str, float]:
    """GB/s of each reader with ``threads`` threads over ``mib`` MiB (best of ``passes``)."""
    n = mib * 2**20
    f64 = np.ones(n // 8, dtype=np.float64)  # ones, not zeros: the pages must be real
    u8 = f64.view(np.uint8)
    f32 = f64.view(np.float32).reshape(-1, 4096)
    x = np.ones(4096, dtype=np.float32)
    readers = {
        "sum_f64": _threaded(np.add.reduce, f64, threads),
        "count_u8": _threaded(np.count_nonzero, u8, threads),
        "gemv_f32": lambda: np.dot(f32, x),  # BLAS threads: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS
    }
    out = {}
    c = c_read_bandwidth(threads, mib, passes)
    if c:
        out["c_read"] = c
    for name, run in readers.items():
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        out[name] = n / best / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--json", action="store_true", help="print one RESULT line (for bench.peers)")
    a = ap.parse_args()
    readers = read_bandwidth(a.threads, a.mib)
    res = {"read_gb_s": max(readers.values()), "readers_gb_s": readers, "threads": a.threads, "mib": a.mib}
    if a.json:
        print("RESULT " + json.dumps(res))
    else:
        print(f"read bandwidth: {res['read_gb_s']:.1f} GB/s with {a.threads} threads "
              f"({', '.join(f'{k} {v:.1f}' for k, v in readers.items())})")


if __name__ == "__main__":
    main()
