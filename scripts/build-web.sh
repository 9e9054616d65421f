#!/usr/bin/env bash
# Builds the browser package: web/ (wasm-bindgen cdylib) -> web/pkg/ (git-ignored).
#
#   bash scripts/build-web.sh [--debug]
#
# Compiler, in this order:
#   A. rustup's prebuilt wasm32-unknown-unknown std, when installed or when
#      `rustup target add wasm32-unknown-unknown` succeeds;
#   B. otherwise, offline from the distribution: Debian's rustc-web, cargo-web,
#      rust-web-src, rust-web-llvm and lld-22 (apt, as root or through passwordless sudo),
#      with RUSTC_BOOTSTRAP=1 -Zbuild-std. Debian's cargo/rustc are called by full path
#      with a PATH scoped to that one command; when this script installed rustc-web and
#      cargo-web itself it removes those two packages again afterwards, so no second
#      cargo/rustc is left next to rustup's.
# Then wasm-bindgen-cli at exactly the version in Cargo.lock (cargo install, without
# --locked: its own lockfile pins a crate version the registry no longer offers) into a
# cache directory, and wasm-bindgen --target web.
#
# Environment: WGSPARSE_WASM_TOOLCHAIN=auto|rustup|debian (default auto),
# WGSPARSE_CACHE_DIR (default ~/.cache/wgsparse), WGSPARSE_SKIP_APT=1 (never apt-get).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"

say() { printf '[build-web] %s\n' "$*" >&2; }

profile=release
[ "${1:-}" = "--debug" ] && profile=debug
target=wasm32-unknown-unknown
crate=wgsparse_web
cache="${WGSPARSE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wgsparse}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
start=$SECONDS

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { say "cargo not found (install rustup)"; exit 1; }
# The cargo every later step uses (rustup's): resolved once, before anything is installed.
host_cargo="$(command -v cargo)"

sudo_cmd=()
as_root_ok() {
    if [ "$(id -u)" = 0 ]; then return 0; fi
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo_cmd=(sudo -n)
        return 0
    fi
    return 1
}

# --- compiler ---------------------------------------------------------------------
choice="${WGSPARSE_WASM_TOOLCHAIN:-auto}"
have_rustup_target() {
    command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx "$target"
}
if [ "$choice" = auto ]; then
    if have_rustup_target; then
        choice=rustup
    elif command -v rustup >/dev/null 2>&1 && timeout 300 rustup target add "$target" >&2; then
        choice=rustup
    else
        say "rustup cannot provide $target; using Debian's rustc-web (-Zbuild-std)"
        choice=debian
    fi
fi

profile_flag=()
[ "$profile" = release ] && profile_flag=(--release)

case "$choice" in
rustup)
    say "compiler: rustup $(rustc --version) with the prebuilt $target std"
    "$host_cargo" build --locked "${profile_flag[@]}" --target "$target" -p wgsparse-web
    ;;
debian)
    debs=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22)
    missing=()
    for p in "${debs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    installed_here=()
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "${WGSPARSE_SKIP_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null 2>&1 || ! as_root_ok; then
            say "missing ${missing[*]}; as root: apt-get install -y ${debs[*]}"
            exit 1
        fi
        say "apt-get install ${missing[*]}"
        "${sudo_cmd[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
        for p in rustc-web cargo-web; do
            [[ " ${missing[*]} " == *" $p "* ]] && installed_here+=("$p")
        done
    fi
    cleanup_debian() {
        if [ "${#installed_here[@]}" -gt 0 ]; then
            say "removing ${installed_here[*]} again (rustup's cargo/rustc stay the only ones)"
            DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" dpkg --remove "${installed_here[@]}" >/dev/null
        fi
    }
    trap cleanup_debian EXIT
    say "compiler: Debian $(/usr/bin/rustc --version) with -Zbuild-std"
    # Separate target dir: std is rebuilt with a different compiler.
    env PATH=/usr/bin:/bin RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
        CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" CARGO_TARGET_DIR="$target_dir/web-debian" \
        /usr/bin/cargo build --locked "${profile_flag[@]}" -Zbuild-std=std,panic_abort \
        --target "$target" -p wgsparse-web
    cleanup_debian
    trap - EXIT
    ;;
*)
    say "WGSPARSE_WASM_TOOLCHAIN must be auto, rustup or debian (got $choice)"
    exit 1
    ;;
esac

case "$choice" in
debian) wasm="$target_dir/web-debian/$target/$profile/$crate.wasm" ;;
*) wasm="$target_dir/$target/$profile/$crate.wasm" ;;
esac
[ -f "$wasm" ] || { say "no $wasm after the build"; exit 1; }

# --- wasm-bindgen at the locked version -------------------------------------------
wbv="$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
[ -n "$wbv" ] || { say "wasm-bindgen not found in Cargo.lock"; exit 1; }
wb_root="$cache/wasm-bindgen-cli-$wbv"
wb="$wb_root/bin/wasm-bindgen"
if [ ! -x "$wb" ] || [ "$("$wb" --version 2>/dev/null | awk '{print $2}')" != "$wbv" ]; then
    say "cargo install wasm-bindgen-cli $wbv into $wb_root (several minutes, once)"
    t=$SECONDS
    "$host_cargo" install wasm-bindgen-cli --version "$wbv" --root "$wb_root" --force
    say "wasm-bindgen-cli installed in $((SECONDS - t)) s"
fi

rm -rf web/pkg
"$wb" --target web --out-dir web/pkg --out-name "$crate" "$wasm"
say "web/pkg: $(du -h web/pkg/${crate}_bg.wasm | cut -f1) wasm ($choice, $profile) in $((SECONDS - start)) s"
