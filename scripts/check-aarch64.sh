#!/usr/bin/env bash
# Checks sambay on Linux aarch64 (what a Raspberry Pi 5 on Pi OS bookworm 64-bit runs) from an
# x86-64 Debian host, under qemu-user emulation: an arm64 Debian bookworm root (Python 3.11,
# gcc 12, cmake 3.25, glibc 2.36: Pi OS bookworm's versions) gets a copy of this working tree,
# installs it in a venv exactly as the README says (`pip install ".[test]"`) and runs a named
# subset of the tests. Slow (about 5 min to make the root, 5 min to compile the extension, and
# the tests run 10-50x slower than natively), so it is not part of the default test run.
#
#   sudo scripts/check-aarch64.sh [wheel|native|all]      (default: wheel)
#
#   wheel   the README's install (the aarch64 libggml-python wheel) and the tests below
#   native  then ggml built from source for a Pi 5's CPU (scripts/build-ggml.sh native with
#           GGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16, as a build made elsewhere for a Pi 5
#           would be: GGML_NATIVE cannot see the CPU under qemu), sambay rebuilt against it,
#           `sambay system-info` and the engine tests
#   all     both
#
# Environment: SAMBAY_AARCH64_ROOT (default /var/tmp/sambay-aarch64-root; kept between runs,
# never inside the repository), SAMBAY_AARCH64_TESTS (the test files, default below),
# QEMU_CPU (the emulated CPU, default cortex-a76: a Pi 5's core, with dotprod and fp16 but no
# i8mm or SVE), DEBIAN_MIRROR. Needs root (debootstrap, chroot, mounts) and
# Debian's qemu-user-static and debootstrap packages (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

mode=${1:-wheel}
case "$mode" in wheel|native|all) ;; *) echo "usage: $0 [wheel|native|all]" >&2; exit 2 ;; esac
root=${SAMBAY_AARCH64_ROOT:-/var/tmp/sambay-aarch64-root}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tests=${SAMBAY_AARCH64_TESTS:-"tests/test_package.py tests/test_engine_errors.py tests/test_engine.py tests/test_batch.py tests/test_convert.py tests/test_convert_exact.py tests/test_quant_types.py tests/test_quantize.py tests/test_demo_model.py"}
export QEMU_CPU=${QEMU_CPU:-cortex-a76}

case "$root" in "$repo"|"$repo"/*) echo "$0: keep the root outside the repository" >&2; exit 1 ;; esac
[ "$(id -u)" = 0 ] || { echo "$0: needs root (debootstrap, chroot, mounts)" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || { echo "$0: this is for an x86-64 host" >&2; exit 1; }

stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
t0=$(date +%s)
elapsed() { echo "$(( ($(date +%s) - t0) / 60 ))m$(( ($(date +%s) - t0) % 60 ))s"; }

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    stamp "installing qemu-user-static and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap
fi

# qemu for aarch64 binaries: without systemd/binfmt-support nothing registers it. Its F flag
# opens the interpreter at registration, so it works inside the chroot without a copy there.
binfmt=/proc/sys/fs/binfmt_misc
registered=""
mountpoint -q "$binfmt" || mount -t binfmt_misc binfmt_misc "$binfmt"
if [ ! -e "$binfmt/qemu-aarch64" ]; then
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$binfmt/register"
    registered=1
fi

mounted=()
cleanup() {
    local i
    for (( i=${#mounted[@]}-1; i>=0; i-- )); do umount -l "${mounted[i]}" 2>/dev/null || true; done
    [ -z "$registered" ] || echo -1 > "$binfmt/qemu-aarch64" 2>/dev/null || true
}
trap cleanup EXIT

if [ ! -x "$root/usr/bin/python3" ]; then
    stamp "debootstrap arm64 bookworm into $root"
    mkdir -p "$root"
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-pip,python3-venv,python3-dev,cmake,g++,make,ninja-build,git,ca-certificates,binutils \
        bookworm "$root" "$mirror"
fi

mount -t proc proc "$root/proc"; mounted+=("$root/proc")
mount --rbind /dev "$root/dev"; mount --make-rslave "$root/dev"; mounted+=("$root/dev")
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# a host behind a TLS-inspecting proxy: its extra CA certificates, for pip inside the root
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
# The host's /sys is not bound in. torch's oneDNN (xbyak_aarch64), when torch is installed by
# hand, reads the CPU's identification register from sysfs and crashes under qemu-user without
# it: a Cortex-A76 (a Pi 5's core) for each CPU.
ncpu=$(nproc)
cpus=/sys/devices/system/cpu
mkdir -p "$root$cpus"
for f in possible present online; do echo "0-$((ncpu - 1))" > "$root$cpus/$f"; done
for (( i=0; i<ncpu; i++ )); do
    mkdir -p "$root$cpus/cpu$i/regs/identification"
    echo 0x00000000414fd0b1 > "$root$cpus/cpu$i/regs/identification/midr_el1"
done

# the project: this working tree's tracked and untracked-but-not-ignored files
stamp "copying the working tree into $root/opt/sambay"
rm -rf "$root/opt/sambay"
mkdir -p "$root/opt/sambay"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$root/opt/sambay"

in_root() {
    chroot "$root" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        ${QEMU_CPU:+QEMU_CPU=$QEMU_CPU} /bin/bash -euo pipefail -c "cd /opt/sambay; $1"
}

stamp "in the root: $(in_root 'uname -m; python3 --version; gcc -dumpfullversion; cmake --version | head -1' | tr '\n' ' ')"
in_root 'update-ca-certificates >/dev/null'

if [ "$mode" != native ]; then
    stamp "python3 -m venv /opt/venv; pip install \".[test]\" (the README's install)"
    in_root 'rm -rf /opt/venv; python3 -m venv /opt/venv; s=$(date +%s)
             pip install -q ".[test]"
             echo "install: $(( $(date +%s) - s )) s, venv $(du -sm /opt/venv | cut -f1) MB"
             if python -c "import torch" 2>/dev/null; then echo "torch was installed"; exit 1; fi
             sambay system-info'
    stamp "tests (wheel ggml, QEMU_CPU=$QEMU_CPU): $tests"
    in_root "s=\$(date +%s); python -m pytest -q -p no:cacheprovider $tests; echo \"tests: \$(( \$(date +%s) - s )) s\""
fi

if [ "$mode" != wheel ]; then
    [ -x "$root/opt/venv/bin/python" ] || { echo "$0: run the wheel step first" >&2; exit 1; }
    stamp "ggml from source for a Pi 5 (armv8.2-a+dotprod+fp16), sambay against it"
    in_root 'SAMBAY_GGML_DEFINES="GGML_NATIVE=OFF GGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" \
             scripts/build-ggml.sh native .'
    stamp "system-info and the engine tests on QEMU_CPU=$QEMU_CPU"
    in_root 'sambay system-info; python -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_quant_types.py'
fi
stamp "done in $(elapsed)"
