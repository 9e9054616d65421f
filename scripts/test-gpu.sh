#!/usr/bin/env bash
# The GPU-vs-CPU test suite on a real GPU machine: every test binary that checks a GPU
# kernel against its CPU twin, run once with the matrix-unit kernels required (where the
# device has cooperative matrices) and once with WGSPARSE_NO_COOP=1 (the portable
# kernels), with a one-line summary per pass. Run it whenever a matrix-unit kernel
# changes.
#
#   bash scripts/test-gpu.sh pack DIR     build the release test binaries here and pack
#                                         them into DIR/gpu-tests.tar.xz (a GPU machine
#                                         without Rust runs them from there)
#   bash scripts/test-gpu.sh run DIR [OUT]
#                                         unpack DIR/gpu-tests.tar.xz (or use DIR's
#                                         binaries) and run the suite; logs in OUT
#   bash scripts/test-gpu.sh              build and run here (a machine with a GPU and
#                                         Rust)
#
# The binaries are run from the repository root (their fixtures are found from there).
# The CLI tests are left out: they run the `wgsparse` binary at the path it was built at.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[test-gpu] %s\n' "$*" >&2; }
. scripts/test-binaries.sh

suite=(coop dense_attention sparse_attention sale decoder_layer moe large_binding q4_0 properties planning)

build() {
    # `name path` of each release test binary of the suite and of the library's tests.
    local args=(--lib)
    for t in "${suite[@]}"; do args+=(--test "$t"); done
    test_binaries --release "${args[@]}"
}

pack() {
    local dir=$1 list stage
    mkdir -p "$dir"
    stage=$(mktemp -d)
    list=$(build)
    [ -n "$list" ] || { say "no test binaries built"; exit 1; }
    while read -r name bin; do
        [ "$name" = wgsparse ] && name=lib
        cp "$bin" "$stage/$name"
    done <<<"$list"
    tar -C "$stage" -cf - . | xz -T0 -6 >"$dir/gpu-tests.tar.xz"
    rm -rf "$stage"
    say "packed $(wc -l <<<"$list") binaries: $(du -h "$dir/gpu-tests.tar.xz" | cut -f1)"
}

run_suite() {
    local bins=$1 out=$2 label=$3 pass=0 fail=0 failed=() counts
    for name in lib "${suite[@]}"; do
        local bin="$bins/$name" log="$out/$label-$name.log"
        [ -x "$bin" ] || { say "missing $bin"; fail=$((fail + 1)); failed+=("$name(missing)"); continue; }
        if "$bin" --test-threads 4 --skip gl_backend_matches_cpu >"$log" 2>&1; then
            :
        else
            failed+=("$name")
        fi
        # Count the test lines of this binary.
        counts=$(grep -E '^test result:' "$log" | tail -1)
        local p f
        p=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$counts")
        f=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$counts")
        pass=$((pass + ${p:-0}))
        fail=$((fail + ${f:-1}))
        printf '%-18s %s\n' "$name" "${counts:-no result (see $log)}"
    done
    printf 'gpu suite (%s): %d passed, %d failed%s\n' "$label" "$pass" "$fail" \
        "${failed:+ (${failed[*]})}" | tee -a "$out/summary.txt"
    [ "$fail" = 0 ]
}

mode=${1:-here}
case "$mode" in
    pack)
        pack "${2:?pack DIR}"
        ;;
    run | here)
        if [ "$mode" = run ]; then
            dir=${2:?run DIR [OUT]}
            out=${3:-$dir/logs}
            if [ -f "$dir/gpu-tests.tar.xz" ]; then
                bins=$(mktemp -d)
                python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
                    "$dir/gpu-tests.tar.xz" "$bins"
            else
                bins=$dir
            fi
        else
            bins=$(mktemp -d)
            out=target/gpu-tests
            while read -r name bin; do
                [ "$name" = wgsparse ] && name=lib
                ln -sf "$(realpath "$bin")" "$bins/$name"
            done <<<"$(build)"
        fi
        mkdir -p "$out"
        : >"$out/summary.txt"
        export WGSPARSE_REQUIRE_GPU=1 RUST_BACKTRACE=1
        if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
            XDG_RUNTIME_DIR=$(mktemp -d)
            chmod 700 "$XDG_RUNTIME_DIR"
            export XDG_RUNTIME_DIR
        fi
        status=0
        # The matrix-unit pass requires the coop kernels where the device offers them.
        if WGSPARSE_REQUIRE_COOP=1 run_suite "$bins" "$out" "matrix units"; then :; else status=1; fi
        if WGSPARSE_NO_COOP=1 run_suite "$bins" "$out" "portable"; then :; else status=1; fi
        exit $status
        ;;
    *)
        say "usage: $0 [pack DIR | run DIR [OUT]]"
        exit 2
        ;;
esac
