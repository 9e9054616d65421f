#!/usr/bin/env bash
# The H200 measurements of BENCHMARKS.md, ours and the peers in the same call, on a GPU
# machine without Rust: the binaries are built on the development machine and carried.
#
#   here:   bash scripts/bench-h200.sh pack       (release binaries -> target/h200/)
#   there:  bash scripts/bench-h200.sh STAGE... (OUT dir: $OUT, else ./h200-out)
#
# carry: target/h200 and .gl (the Vulkan loader .debs, ../shared/gpu/fetch-vulkan-loader.sh).
# Stages (any order, several per call):
#   tests      scripts/test-gpu.sh: the GPU-vs-CPU suite, matrix units and portable
#   tune       every attention tiling the device can run, timed (wgsparse tune, d 128)
#   dense      dense causal f16 attention 4k-128k (32 q-heads, 8 kv-heads, d 128) with a
#              CPU check at 1k, then PyTorch SDPA (cuDNN, FA2) on the same shapes
#   sparse     the block-sparse executor at density 0.1 and the selectors (SALE,
#              AnchorAttention, ProxyAttn) on structured data at 32k/128k/256k, then
#              FlexAttention at the same density and block layout
#   moe        the SmallThinker-4B MoE layer at T 1, 8, 512, 4096 and the grouped-GEMM peer
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[bench-h200] %s\n' "$*" >&2; }

if [ "${1:-}" = pack ]; then
    cargo build --release --locked --bins --examples || exit 1
    mkdir -p target/h200
    bash scripts/test-gpu.sh pack target/h200 || exit 1
    tar -C target/release -cf - wgsparse examples/bench | xz -T0 -6 >target/h200/tools.tar.xz
    peer=../shared/gpu/peers/moe_grouped_peer.py
    [ -f "$peer" ] && cp "$peer" target/h200/
    du -sh target/h200/* >&2
    exit 0
fi

out=${OUT:-h200-out}
mkdir -p "$out"
if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
chmod 700 "$XDG_RUNTIME_DIR"
tools=$(mktemp -d)
python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    target/h200/tools.tar.xz "$tools"
bin=$tools/wgsparse
bench=$tools/examples/bench
export WGSPARSE_TUNE_FILE=$out/tune.json
"$bin" info | tail -4

stage_tests() {
    bash scripts/test-gpu.sh run target/h200 "$out/tests" | tail -25
}

stage_tune() {
    "$bin" tune --head-dims 128 --seq-len 32768 --iters 3 --out "$WGSPARSE_TUNE_FILE"
}

stage_dense() {
    local lens=${DENSE_LENS:-4096,16384,32768,131072}
    "$bench" --seq-lens "$lens" --iters 5 --check-len 1024 --budget-s 30 \
        --methods dense --json "$out/dense.jsonl" | tail -8
    python3 benches/peers/torch_sdpa.py --seq-lens "$lens" --dtypes fp16 --backends cudnn,flash \
        --json "$out/torch_sdpa.jsonl" | tail -10
}

stage_sparse() {
    local lens=${SPARSE_LENS:-32768,131072,262144}
    "$bench" --seq-lens "$lens" --iters 3 --warmup 1 --budget-s 60 --data structured \
        --methods 'dense;blocks:p=0.1;sale:tau=0.004;anchor;proxy' \
        --json "$out/sparse.jsonl" | tail -24
    python3 benches/peers/torch_flex.py --seq-lens "${lens%,262144}" --ps 0.1 \
        --json "$out/torch_flex.jsonl" | tail -8
}

stage_moe() {
    for t in 1 8 512 4096; do
        "$bin" moe --tokens "$t" --iters 20 --json >"$out/moe_$t.json" || say "moe T $t failed"
        python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("moe T", sys.argv[2], "ms", round(d["ms"],4), [s.get("variant") for s in d.get("stages", [])])' \
            "$out/moe_$t.json" "$t"
    done
    # The grouped-GEMM peer is the project's shared script (../shared/gpu/peers/), copied
    # into target/h200 by `pack`.
    python3 target/h200/moe_grouped_peer.py 1,8,512,4096 | tee "$out/moe_peer.txt"
}

[ $# -gt 0 ] || set -- tests tune dense sparse moe
for s in "$@"; do
    say "== $s"
    start=$SECONDS
    "stage_$s"
    say "== $s: $((SECONDS - start)) s"
done
