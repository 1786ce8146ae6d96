#!/usr/bin/env bash
# The CUDA check, prepared for a machine with an NVIDIA GPU and the CUDA toolkit (nvcc): ggml
# built with CUDA, sambay against it, the engine's parity tests on the GPU, and a speed run of
# the real-shape model, written to bench/results/gpu-<GPU name>/.
#
#   scripts/check-gpu.sh [build|test|bench|all]      (default: all)
#
#   build  scripts/build-ggml.sh cuda -e . (ggml from the pinned sources, for this GPU), then
#          pytest and matplotlib if missing; `sambay system-info` must list a CUDA device
#   test   the engine parity tests with every layer of every test model on the first CUDA
#          device (SAMBAY_TEST_DEVICE=cuda, tests/engine_helpers.py): the CPU's tolerances,
#          f32 and f16 caches, the default and the flash-attention path
#   bench  the real Phi-4-mini-flash shape (hidden size 3072, random F16 weights, written and
#          converted here by bench/peers.py): prefill of 512 and 8192 tokens, decode at depth
#          512 and 32768 (bench/peers.py --full), batched decode of 1, 4 and 16 sequences at
#          depth 512 and 8192 (bench/batched.py --full)
#   all    the three in order
#
# Every invocation runs under one time budget, SAMBAY_CHECK_TIMEOUT seconds (default 570:
# commands on the lent GPU machines stop at 10 minutes); each step gets what is left and the
# script stops at the first step that fails or runs out (exit 124). Building ggml's CUDA
# kernels takes minutes: on such a machine run the phases as separate commands.
# SAMBAY_CHECK_WORKDIR holds the bench's model files between invocations (default
# /tmp/sambay-gpu-check), SAMBAY_CHECK_OUT the results (default bench/results/gpu-<GPU name>,
# from nvidia-smi); PYTHON is the interpreter (default python). Without an index, point
# pip at local files the usual way (PIP_FIND_LINKS=DIR PIP_NO_INDEX=1).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
phase=${1:-all}
case "$phase" in
    build|test|bench|all) ;;
    -h|--help) usage; exit 0 ;;
    *) { echo "unknown phase '$phase'"; usage; } >&2; exit 2 ;;
esac

PY=${PYTHON:-python}
budget=${SAMBAY_CHECK_TIMEOUT:-570}
deadline=$(( $(date +%s) + budget ))
work=${SAMBAY_CHECK_WORKDIR:-/tmp/sambay-gpu-check}
threads=$(nproc 2>/dev/null || echo 4)
[ -d /usr/local/cuda/bin ] && PATH=/usr/local/cuda/bin:$PATH
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$threads}

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
slug=$(printf '%s' "${gpu:-cuda}" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-*//; s/-*$//')
out=${SAMBAY_CHECK_OUT:-bench/results/gpu-$slug}

# step NAME COMMAND...: runs COMMAND with what is left of the budget
step() {
    local name=$1 left rc=0
    shift
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -le 5 ]; then
        echo "== $name: out of time (SAMBAY_CHECK_TIMEOUT=$budget)" >&2
        exit 124
    fi
    echo "== $name ($left s left)"
    timeout --kill-after=10 "$left" "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "== $name failed (exit $rc$([ "$rc" -eq 124 ] && echo ': out of time'))" >&2
        exit "$rc"
    fi
}

if [ "$phase" = build ] || [ "$phase" = all ]; then
    step "ggml with CUDA, sambay against it" scripts/build-ggml.sh cuda -e .
    "$PY" -c 'import pytest, matplotlib' 2>/dev/null || step "test and plot packages" "$PY" -m pip install pytest matplotlib
    info=$("$PY" -m sambay system-info)
    echo "$info"
    case "$info" in
        *CUDA*) ;;
        *) echo "== the installed ggml has no CUDA device (sambay system-info above)" >&2; exit 1 ;;
    esac
fi

mkdir -p "$out"
if [ "$phase" = test ] || [ "$phase" = all ]; then
    step "engine parity tests on $slug" env SAMBAY_TEST_DEVICE=cuda "$PY" -m pytest -p no:cacheprovider \
        --junitxml="$out/tests.xml" tests/test_engine.py tests/test_batch.py tests/test_flash_split.py \
        tests/test_placement.py tests/test_attn_cpu.py
fi

if [ "$phase" = bench ] || [ "$phase" = all ]; then
    # the GPU, the driver and what sambay runs on, next to the figures
    { echo "gpu: ${gpu:-unknown}"
      nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/driver, memory: /' || true
      echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
      "$PY" -m sambay system-info; } > "$out/machine.txt"
    mkdir -p "$work"
    step "prefill 512/8K, decode at 512/32K" "$PY" -m bench.peers --full --engines sambay --types F16 \
        --prefill 512,8192 --decode 512,32768 --threads "$threads" --workdir "$work" --out "$out" --fresh
    step "batched decode" "$PY" -m bench.batched --full --engines sambay --types F16 --depths 512,8192 \
        --seqs 1,4,16 --no-budget --gen 8 --threads "$threads" --workdir "$work" --out "$out"
fi
echo "== done: $phase ($out)"
