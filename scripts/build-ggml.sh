#!/usr/bin/env bash
# Builds ggml from the sources of the pinned libggml-python (the very version the wheel is, so
# the extension still runs against the ggml it was compiled with) for this machine, installs it
# into the active Python environment in place of the wheel, then builds sambay against it.
#
#   scripts/build-ggml.sh [native|cuda|metal] [pip install arguments for sambay, default "."]
#
#   native  this CPU's instruction set (GGML_NATIVE: -march=native / -mcpu=native) and
#           llamafile's sgemm kernels (GGML_LLAMAFILE), both off in the portable wheels
#   cuda    native + the CUDA backend, for this machine's GPU (CMAKE_CUDA_ARCHITECTURES=native;
#           needs the CUDA toolkit's nvcc)
#   metal   native + the Metal backend (macOS; the macOS arm64 wheel already has Metal)
#
# SAMBAY_GGML_DEFINES adds or overrides CMake definitions, e.g. a Raspberry Pi 5 build made on
# another machine: SAMBAY_GGML_DEFINES="GGML_NATIVE=OFF GGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"
# Examples: scripts/build-ggml.sh native ".[test]"      scripts/build-ggml.sh cuda -e .
# `sambay system-info` shows what the result runs on. `pip install --force-reinstall
# libggml-python==<pin>` and reinstalling sambay go back to the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-native}
shift || true
[ $# -gt 0 ] || set -- .
PY=${PYTHON:-python}

# KEY=VALUE CMake definitions; later ones override earlier ones (bash 3 compatible: macOS)
defs="GGML_NATIVE=ON GGML_LLAMAFILE=ON"
case "$mode" in
    native) ;;
    cuda) defs="$defs GGML_CUDA=ON CMAKE_CUDA_ARCHITECTURES=native" ;;
    metal) defs="$defs GGML_METAL=ON" ;;
    *) echo "usage: $0 [native|cuda|metal] [pip install arguments]" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086
read -r -a settings <<< "$("$PY" -c '
import sys
defs = dict(kv.split("=", 1) for kv in sys.argv[1:])
print(" ".join(f"--config-settings=cmake.define.{k}={v}" for k, v in defs.items()))
' $defs ${SAMBAY_GGML_DEFINES:-})"

# the pin and sambay's build requirements, from pyproject.toml (their one owner)
reqs=$("$PY" - <<'EOF2'
import re
text = open("pyproject.toml", encoding="utf-8").read()
section = text.split("[build-system]", 1)[1]
block = re.search(r"^requires\s*=\s*\[(.*?)\]", section, re.S | re.M).group(1)
for req in re.findall(r'"([^"]+)"', block):
    print(req)
EOF2
)
pin=""
build_reqs=()
while read -r r; do
    case "$r" in libggml-python==*) pin=$r ;; ?*) build_reqs+=("$r") ;; esac
done <<< "$reqs"
[ -n "$pin" ] || { echo "no libggml-python==... pin in pyproject.toml" >&2; exit 1; }

echo "== ggml: $pin from source ($mode: ${settings[*]})"
# --no-cache-dir: a cached wheel built with other flags must not be reused
"$PY" -m pip install --force-reinstall --no-deps --no-cache-dir --no-binary libggml-python \
    "${settings[@]}" "$pin"

echo "== sambay against it (no build isolation: build with the ggml just installed)"
"$PY" -m pip install "${build_reqs[@]}"
# its own build folder: the default one's CMake cache may name another ggml
"$PY" -m pip install --no-build-isolation --config-settings="build-dir=build/ggml-$mode/{wheel_tag}" "$@"
"$PY" -m sambay system-info
