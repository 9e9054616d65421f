#!/usr/bin/env bash
# Runs a command against a lavapipe that has cooperative matrices.
#
#   bash scripts/coop-lavapipe.sh CMD [ARGS...]
#
# Debian 12's Mesa (22.3, 25.0 in backports) lavapipe has no VK_KHR_cooperative_matrix;
# Mesa 26.1's (Debian 13 "trixie" backports) has it: 8x8x8 tiles, f16 inputs, f16 or
# f32 accumulators, subgroup size 8. wgpu exposes it as EXPERIMENTAL_COOPERATIVE_MATRIX,
# so the crate's matrix-unit kernels run, and are tested, on the CPU.
#
# The first call builds a small Debian 13 root with that driver (debootstrap, then the
# backports' mesa-vulkan-drivers, and spirv-tools, whose spirv-val knows
# SPV_KHR_cooperative_matrix: a few minutes, ~250 MB, once per machine) under
# $WGSPARSE_COOP_ROOT (default: wgsparse/trixie-root in the user's cache folder,
# $XDG_CACHE_HOME or ~/.cache). Every call then runs CMD inside
# it, in the current directory (bind-mounted at the same path), with the Vulkan loader
# pointed at lavapipe. Programs built on this host run there unchanged (trixie's glibc is
# newer than bookworm's), so build outside and run only the binaries inside.
#
# Needs root (debootstrap, mount, chroot) and a Debian mirror: the one apt uses here, or
# $WGSPARSE_DEBIAN_MIRROR.
set -euo pipefail

root="${WGSPARSE_COOP_ROOT:-${XDG_CACHE_HOME:-${HOME:?set HOME, XDG_CACHE_HOME or WGSPARSE_COOP_ROOT}/.cache}/wgsparse/trixie-root}"
say() { printf '[coop-lavapipe] %s\n' "$*" >&2; }
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
[ $# -gt 0 ] || { say "usage: $0 CMD [ARGS...]"; exit 2; }
[ "$(id -u)" = 0 ] || { say "needs root (debootstrap, mount, chroot)"; exit 1; }

debian_mirror() {
    local uri="${WGSPARSE_DEBIAN_MIRROR:-}"
    if [ -z "$uri" ] && compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/*.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || { say "no Debian mirror in apt's sources: set WGSPARSE_DEBIAN_MIRROR"; exit 1; }
    printf '%s' "$uri"
}

build_root() {
    local tmp="$root.partial" uri
    uri=$(debian_mirror)
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    say "building a Debian 13 root at $root from $uri (once per machine)"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$root")"
    debootstrap --variant=minbase trixie "$tmp" "$uri" >/dev/null
    rm -f "$tmp/etc/apt/sources.list"
    cat > "$tmp/etc/apt/sources.list.d/trixie.sources" <<EOF
Types: deb
URIs: $uri
Suites: trixie trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    mount --bind /proc "$tmp/proc"
    local ok=0
    chroot "$tmp" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t trixie-backports mesa-vulkan-drivers libvulkan1 spirv-tools >/dev/null' || ok=$?
    umount "$tmp/proc"
    [ "$ok" = 0 ] || { say "installing Mesa in the root failed"; exit 1; }
    mv "$tmp" "$root"
    touch "$root/.wgsparse-ready"
}

[ -e "$root/.wgsparse-ready" ] || build_root
if [ ! -x "$root/usr/bin/spirv-val" ]; then
    # A root made before spirv-tools was part of it.
    say "installing spirv-tools in $root"
    mount --bind /proc "$root/proc"
    chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t trixie-backports spirv-tools >/dev/null' || {
        umount "$root/proc"
        say "installing spirv-tools in the root failed"
        exit 1
    }
    umount "$root/proc"
fi

here=$(pwd)
mkdir -p "$root$here" "$root/tmp"
mounts=()
cleanup() {
    local m
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        m=${mounts[$i]}
        umount -l "$m" 2>/dev/null || true
    done
}
trap cleanup EXIT
for m in /proc /dev "$here"; do
    mount --bind "$m" "$root$m"
    mounts+=("$root$m")
done
chroot "$root" env \
    VK_DRIVER_FILES=/usr/share/vulkan/icd.d/lvp_icd.json \
    HOME=/root PATH=/usr/local/bin:/usr/bin:/bin \
    XDG_RUNTIME_DIR=/tmp \
    WGSPARSE_REQUIRE_GPU="${WGSPARSE_REQUIRE_GPU:-1}" \
    WGSPARSE_REQUIRE_COOP="${WGSPARSE_REQUIRE_COOP:-1}" \
    WGSPARSE_NO_COOP="${WGSPARSE_NO_COOP:-0}" \
    WGSPARSE_SEED="${WGSPARSE_SEED:-}" \
    RUST_LOG="${RUST_LOG:-}" RUST_BACKTRACE="${RUST_BACKTRACE:-}" \
    sh -c 'cd "$0" && exec "$@"' "$here" "$@"
