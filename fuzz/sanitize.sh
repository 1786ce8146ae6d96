#!/usr/bin/env bash
# The sanitizer job (.ci/run runs it when CI_SANITIZE=1; by hand: bash fuzz/sanitize.sh).
#  1. builds the extension with ASan + UBSan (-DSAMBAY_SANITIZE=ON) into .asan-site/ and the
#     native leak checker (-DSAMBAY_TOOLS=ON) into build/asan/;
#  2. runs the whole test suite against that build (gcc's ASan/UBSan runtimes preloaded into
#     the Python process; interpreter leaks are not ours, so detect_leaks=0 there);
#  3. runs LeakSanitizer on 20 model loads/unloads and 1000 context create/destroy cycles;
#  4. a sanitized fuzz slice: FUZZ_INPUTS (default 2000) mutated GGUFs through the load path.
# Needs the test dependencies installed in the active Python (pip install ".[test]").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SITE="$PWD/.asan-site"

$PY -m pip install --quiet scikit-build-core pybind11 "libggml-python==0.20.2.post1"
$PY -m pip install --quiet --no-build-isolation --no-deps --upgrade --target "$SITE" \
    -C build-dir=build/asan -C cmake.build-type=RelWithDebInfo \
    -C cmake.define.SAMBAY_SANITIZE=ON -C cmake.define.SAMBAY_TOOLS=ON .

ASAN_RT="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

echo "== test suite on the ASan/UBSan build"
(cd tests && PYTHONPATH="$SITE" LD_PRELOAD="$ASAN_RT" $PY -m pytest -q -p no:cacheprovider \
    --rootdir .. -c ../pyproject.toml .)

echo "== LeakSanitizer: 20 loads, 1000 contexts"
$PY - <<'PY'
from pathlib import Path
from sambay.convert import convert, tiny
root = Path("build/asan/leak-model"); root.mkdir(parents=True, exist_ok=True)
if not (root / "m.gguf").exists():
    convert(tiny.write_checkpoint(root / "ck", "tiny-8", seed=0), root / "m.gguf", outtype="f32", progress=False)
PY
ASAN_OPTIONS=detect_leaks=1 build/asan/sambay_leakcheck build/asan/leak-model/m.gguf 20 1000

echo "== sanitized fuzz slice"
PYTHONPATH="$SITE" $PY fuzz/gguf_fuzz.py --asan --inputs "${FUZZ_INPUTS:-2000}" --seed 1 \
    --seeds-dir build/asan/fuzz-seeds --out build/asan/fuzz-findings
