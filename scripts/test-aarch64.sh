#!/usr/bin/env bash
# The CPU kernels on AArch64 (NEON): the library's quantized-product, CPU-attention and
# decode-attention tests cross-built for aarch64-unknown-linux-gnu and run under
# qemu-user (emulating the instructions, not timing them).
#
#   bash scripts/test-aarch64.sh [extra libtest filters]
#
# Installs what is missing: rustup's aarch64 std (`rustup target add`), and (apt, as root
# or through passwordless sudo) the cross linker gcc-aarch64-linux-gnu with its libc and
# qemu-user-static. Environment: WGSPARSE_SKIP_APT=1 never runs apt-get.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[test-aarch64] %s\n' "$*" >&2; }
. scripts/apt.sh

target=aarch64-unknown-linux-gnu
start=$SECONDS
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    say "rustup target add $target"
    rustup target add "$target"
fi
packages=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || packages+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null 2>&1 || packages+=(qemu-user-static)
if [ "${#packages[@]}" -gt 0 ]; then
    [ "${WGSPARSE_SKIP_APT:-0}" != 1 ] || { say "missing ${packages[*]} (WGSPARSE_SKIP_APT=1)"; exit 1; }
    apt_install "${packages[@]}"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
filters=(quant:: attention::decode_cpu attention::flash_cpu "$@")
# The library alone (no CLI dependencies), in the cross-test profile (the crate
# optimized, its dependencies not).
cargo test --locked --profile cross-test --no-default-features --target "$target" --lib -- "${filters[@]}"
say "passed in $((SECONDS - start)) s"
