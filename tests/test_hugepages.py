"""Transparent huge pages for the buffers a token streams through (csrc/hugepages.*): the weights
a CPU backend copies out of the file and the caches are advised before their pages are first
touched; mapped file pages are left alone; SAMBAY_HUGE_PAGES=0 turns it off. Where the
system's THP mode is "madvise" (the advice decides), the process then holds huge pages for
them, and none without the advice (the negative control)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sambay._system import thp_mode
from sambay.engine import Context, Model

MIB = 1 << 20


def test_copied_weights_and_caches_are_advised(tiny_gguf, monkeypatch):
    _, path = tiny_gguf()  # F32: nothing repacked, so with mmap every weight stays in the file
    assert Model(path).huge_page_bytes == 0
    m = Model(path, use_mmap=False)
    want = m.weights_bytes if sys.platform.startswith("linux") else 0
    # the buffer's whole pages: the weights give or take a page at each end and their padding
    assert abs(m.huge_page_bytes - want) < 64 * 1024
    ctx = Context(m, n_ctx=8192, n_threads=1)
    kv = ctx.memory_breakdown()["full_kv"]
    assert kv > 2 * MIB
    if want:
        assert ctx.huge_page_bytes >= kv
    else:
        assert ctx.huge_page_bytes == 0
    # a small cache (under one huge page) is not advised
    assert Context(m, n_ctx=16, n_threads=1).huge_page_bytes == 0
    monkeypatch.setenv("SAMBAY_HUGE_PAGES", "0")
    assert Model(path, use_mmap=False).huge_page_bytes == 0
    assert Context(m, n_ctx=8192, n_threads=1).huge_page_bytes == 0


_PROBE = """
import json, sys
from sambay.engine import Context, Model
def anon_huge():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
at = [anon_huge()]
m = Model(sys.argv[1], use_mmap=False)
at.append(anon_huge())
ctx = Context(m, n_ctx=32768, n_threads=1)
ctx.eval([1, 2, 3])
at.append(anon_huge())
print(json.dumps({"weights": [at[1] - at[0], m.huge_page_bytes], "caches": [at[2] - at[1], ctx.huge_page_bytes]}))
"""


def _huge_pages_gained(path: Path, advise: bool) -> dict:
    """{part: [bytes of huge pages the process gained, bytes advised]} for the weights and the caches."""
    env = {**os.environ, "SAMBAY_HUGE_PAGES": "1" if advise else "0"}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(thp_mode() != "madvise",
                    reason="the system's transparent huge page mode is unreadable here (no /sys) or not 'madvise', "
                           "the mode where the advice decides")
def test_the_kernel_backs_advised_buffers_with_huge_pages(tiny_gguf):
    _, path = tiny_gguf()
    on = _huge_pages_gained(path, advise=True)
    off = _huge_pages_gained(path, advise=False)
    for part in ("weights", "caches"):
        gained, advised = on[part]
        assert advised > 8 * MIB, on
        # most of the advised bytes: a buffer's ends need not be 2 MiB aligned, and the kernel
        # may fall back to small pages where memory is fragmented; advice given after the
        # pages were touched (cleared, filled) gets none of them
        assert gained >= advised // 2, (part, on)
        assert off[part] == [0, 0], (part, off)
