#!/usr/bin/env bash
# The test command of the README and of CI.
#
#   bash scripts/test.sh [extra args for `cargo test`]
#
# On a fresh Debian/Ubuntu machine it first installs what the GPU tests need: a Vulkan
# loader and lavapipe, Mesa's software Vulkan driver (apt, as root or through
# passwordless sudo; otherwise it prints the command and stops). It then runs every test
# with WGSPARSE_REQUIRE_GPU=1 (and WGSPARSE_REQUIRE_GL=1 for the GL-compute test), so a
# missing adapter FAILS the GPU tests instead of skipping them; runs the attention and
# matrix-unit tests again on Mesa 26.1's lavapipe, which has cooperative matrices, in a
# Debian 13 root (scripts/coop-lavapipe.sh builds it once per machine) — the coop, MoE
# and GPU-decoder tests run there only, with and without the matrix units — and validates
# the matrix-unit SPIR-V with its spirv-val; runs the CPU kernels' tests cross-built for
# AArch64 (NEON) under qemu-user (scripts/test-aarch64.sh); builds the benches and examples so they
# cannot rot and runs three examples; then the real-model tests (scripts/test-models.sh:
# fetches SmolLM2, 93 MB, and checks the decoder against a numpy reference and the GPU
# decoder against the CPU one), and finally the browser test (scripts/test-web.sh: the
# WASM build and the demo page in headless Chromium, WebGPU and the CPU fallback).
#
# Environment: WGSPARSE_SKIP_APT=1 skips the package check; WGSPARSE_REQUIRE_GPU=0 lets
# the GPU tests skip on a machine without any adapter (not for CI); WGSPARSE_SKIP_WEB=1
# skips the browser test; WGSPARSE_SKIP_MODELS=1 the real-model tests; WGSPARSE_SKIP_COOP=1
# the matrix-unit run on Mesa 26.1's lavapipe (scripts/coop-lavapipe.sh, needs root);
# WGSPARSE_SKIP_AARCH64=1 the AArch64 run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '[test.sh] %s\n' "$*" >&2; }
. scripts/apt.sh
. scripts/test-binaries.sh

# --- Rust toolchain -------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    say "cargo not found: install a Rust toolchain >= 1.89 with rustup, then re-run."
    exit 1
fi

# --- System packages: Vulkan loader + lavapipe, and a C linker ------------------------
have_vulkan_driver() {
    # The loader library and at least one ICD manifest (lavapipe's, or a real GPU's).
    local loader=0 icd=0
    if ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
        loader=1
    else
        for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
            [ -e "$d/libvulkan.so.1" ] && loader=1
        done
    fi
    for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
        compgen -G "$d/*.json" >/dev/null 2>&1 && icd=1
    done
    [ "$loader" = 1 ] && [ "$icd" = 1 ]
}

packages=()
if ! have_vulkan_driver; then
    packages+=(mesa-vulkan-drivers libvulkan1)
fi
# GL compute through EGL (llvmpipe): the GL backend test needs Mesa's EGL and GL driver.
if ! ldconfig -p 2>/dev/null | grep -q 'libEGL_mesa\.so\.0'; then
    packages+=(libegl1 libegl-mesa0 libgl1-mesa-dri)
fi
if ! command -v cc >/dev/null 2>&1; then
    packages+=(gcc libc6-dev)
fi

if [ "${#packages[@]}" -gt 0 ] && [ "${WGSPARSE_SKIP_APT:-0}" != 1 ]; then
    # (a Vulkan loader and Mesa's lavapipe driver, Mesa's EGL/GL, a C toolchain)
    apt_install "${packages[@]}" || exit 1
fi

# --- Environment ----------------------------------------------------------------------
# wgpu's GL/EGL probing wants a private runtime directory; containers often lack one.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "${XDG_RUNTIME_DIR}" ]; then
    XDG_RUNTIME_DIR="$(mktemp -d "${TMPDIR:-/tmp}/wgsparse-xdg.XXXXXX")"
    chmod 0700 "$XDG_RUNTIME_DIR"
    export XDG_RUNTIME_DIR
    trap 'rm -rf "$XDG_RUNTIME_DIR"' EXIT
fi
export WGSPARSE_REQUIRE_GPU="${WGSPARSE_REQUIRE_GPU:-1}"
export WGSPARSE_REQUIRE_GL="${WGSPARSE_REQUIRE_GL:-$WGSPARSE_REQUIRE_GPU}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
# The soak test (tests/faults.rs): plans of changing shapes for 20 s on lavapipe, after
# one run of every method (CI's time budget; longer soaks: WGSPARSE_SOAK_S=600 bash
# scripts/test.sh).
export WGSPARSE_SOAK_S="${WGSPARSE_SOAK_S:-20}"

# --- Tests ----------------------------------------------------------------------------
start=$SECONDS
# The test binaries that the matrix-unit stage below runs twice on Mesa 26.1's lavapipe
# (matrix units required, then WGSPARSE_NO_COOP=1: the portable kernels) are not run a
# third time on this machine's lavapipe; every other tests/*.rs runs here.
twice_in_root=(coop moe gpu_decoder)
runs_twice_in_root() { [[ " ${twice_in_root[*]} " == *" $1 "* ]]; }
host_targets=(--lib --bins)
for f in tests/*.rs; do
    name=$(basename "$f" .rs)
    if [ "${WGSPARSE_SKIP_COOP:-0}" != 1 ] && runs_twice_in_root "$name"; then
        continue
    fi
    host_targets+=(--test "$name")
done
say "cargo test (WGSPARSE_REQUIRE_GPU=$WGSPARSE_REQUIRE_GPU): ${host_targets[*]}"
cargo test --locked "${host_targets[@]}" "$@"
say "cargo test --doc"
cargo test --locked --doc "$@"
if [ "${WGSPARSE_SKIP_COOP:-0}" != 1 ]; then
    # The matrix-unit (cooperative-matrix) kernels: this machine's lavapipe has none, so
    # the tests of the matrix-unit kernels (flash attention: dense, block-sparse, stripes,
    # both passes of the selectors, row-state export/import, split problems; the
    # projection GEMM of the decoder layer and the GPU decoder; the MoE experts) run
    # again, host-built, on Mesa 26.1's lavapipe in a Debian 13 root (built once by
    # scripts/coop-lavapipe.sh) with the coop path required, and the coop, MoE and GPU
    # decoder tests once more with it turned off (the portable kernels on the same
    # lavapipe). Tests of kernels without a matrix-unit form ran on the host above: on
    # lavapipe the time goes into compiling each pipeline (LLVM, ~20-40 s for an
    # unrolled matrix-unit kernel on a 2-core machine), so only these run twice.
    say "matrix-unit kernels on Mesa 26.1's lavapipe (scripts/coop-lavapipe.sh; WGSPARSE_SKIP_COOP=1 skips)"
    coop_bins=$(test_binaries --test coop --test dense_attention --test decoder_layer --test moe \
        --test gpu_decoder)
    [ "$(wc -l <<<"$coop_bins")" = 5 ] || { say "test binaries missing for the matrix-unit run: $coop_bins"; exit 1; }
    while read -r name bin; do
        filters=()
        # dense_attention: the runs the coop test does not repeat (split problems under
        # lowered binding limits, row-state continuation; browsers have no matrix units);
        # its GL test needs the host's EGL.
        [ "$name" = dense_attention ] && filters=(split_paths row_state)
        say "  $name (matrix units required)"
        bash scripts/coop-lavapipe.sh "$bin" --test-threads 2 "${filters[@]}"
        if runs_twice_in_root "$name"; then
            say "  $name (WGSPARSE_NO_COOP=1: the portable kernels on the same lavapipe)"
            WGSPARSE_NO_COOP=1 bash scripts/coop-lavapipe.sh "$bin" --test-threads 2
        fi
    done <<<"$coop_bins"
    say "  spirv-val (SPV_KHR_cooperative_matrix) on every matrix-unit variant, tile 8 and 16"
    rm -rf target/coop-spirv
    WGSPARSE_SPIRV_OUT=target/coop-spirv cargo test --locked --test portability coop_variants -- --quiet
    bash scripts/coop-lavapipe.sh sh -c 'n=0; for f in target/coop-spirv/*.spv; do
        spirv-val --target-env vulkan1.3 "$f" || { echo "spirv-val rejected $f"; exit 1; }
        n=$((n + 1)); done; [ "$n" -gt 0 ] || { echo "no SPIR-V written"; exit 1; }; echo "spirv-val: $n modules valid"'
fi
if [ "${WGSPARSE_SKIP_AARCH64:-0}" != 1 ]; then
    say "scripts/test-aarch64.sh (the NEON kernels, cross-built, under qemu-user; WGSPARSE_SKIP_AARCH64=1 skips)"
    bash scripts/test-aarch64.sh
fi
say "cargo build --benches --examples (debug: they must compile)"
cargo build --locked --benches --examples
say "cargo run --example sparse_prefill (the embedding example, on the GPU: sale at 1,024 tokens)"
cargo run --locked --example sparse_prefill -- sale 1024
say "cargo run --example moe_layer (a MoE layer vs its CPU twin: 8 tokens, Q4_0)"
cargo run --locked --example moe_layer -- 8 q4_0
say "cargo doc (the library's docs build without warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --lib
say "cargo check --no-default-features --lib (the crate as a dependency, no CLI)"
cargo check --locked --no-default-features --lib
# The .crate an app would download: its file list must hold every shader the library
# include_str!s. The crate is unpacked outside this tree and type-checked there (macro
# expansion reads every include_str!; a full build of it again would only repeat the
# codegen of the builds above).
say "cargo package (the crate packs with its shaders and checks from the package)"
cargo package --locked -p wgsparse --allow-dirty --no-verify
crate_file=$(ls -t target/package/wgsparse-*.crate | head -1)
unpacked=$(mktemp -d "${TMPDIR:-/tmp}/wgsparse-package.XXXXXX")
repo_target="$PWD/target"
tar -xzf "$crate_file" -C "$unpacked"
(cd "$unpacked"/wgsparse-* && CARGO_TARGET_DIR="$repo_target" cargo check --locked --lib --bins)
rm -rf "$unpacked"
if [ "${WGSPARSE_SKIP_MODELS:-0}" != 1 ]; then
    say "scripts/test-models.sh (SmolLM2: numpy reference, eval, GPU-vs-CPU decoder; WGSPARSE_SKIP_MODELS=1 skips it)"
    bash scripts/test-models.sh
fi
if [ "${WGSPARSE_SKIP_WEB:-0}" != 1 ]; then
    say "scripts/test-web.sh (WASM build + headless Chromium; WGSPARSE_SKIP_WEB=1 skips it)"
    bash scripts/test-web.sh
fi
say "all tests passed in $((SECONDS - start)) s"
