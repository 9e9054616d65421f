#!/usr/bin/env bash
# The MoE rows of BENCHMARKS.md in one go (SmallThinker-4B shapes, synthetic weights):
# the MoE layer at 1/8/512/4096 tokens in f16 and Q4_0, the prefill chunk skipping
# (off, on, with synthetic cold neurons), expert streaming through 8/16/32 GPU slots,
# the whole decoder layer resident vs streamed, and the PyTorch eager peer.
#
#   scripts/bench-moe.sh [WGSPARSE_BINARY] [OUT.jsonl]
#
# Each line of OUT is one JSON object: `wgsparse moe|layer --json` output plus a
# "case" label, or the peer's lines (benches/peers/torch_moe.py).
set -euo pipefail
bin=${1:-target/release/wgsparse}
out=${2:-moe-bench.jsonl}
: >"$out"

run() {
    local label=$1
    shift
    local line
    if line=$("$bin" "$@" --json 2>/dev/null | tail -1); then
        python3 -c 'import json,sys; d=json.loads(sys.argv[2]); d["case"]=sys.argv[1]; print(json.dumps(d))' \
            "$label" "$line" >>"$out"
        echo "$label: $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(round(d["ms"],3), "ms, wall", round(d.get("wall_ms") or 0,3), "ms")' "$line")"
    else
        echo "$label: FAILED ($*)" | tee -a "$out.failures"
    fi
}

for t in 1 8 512 4096; do
    for w in f16 q4_0; do
        run "moe T=$t $w" moe --tokens "$t" --weights "$w" --iters 10 --check
    done
done
for t in 512 4096; do
    run "moe T=$t f16 no-skip" moe --tokens "$t" --weights f16 --iters 10 --no-skip-chunks
    run "moe T=$t f16 cold0.6 skip" moe --tokens "$t" --weights f16 --iters 10 --cold-chunks 0.6 --check
    run "moe T=$t f16 cold0.6 no-skip" moe --tokens "$t" --weights f16 --iters 10 --cold-chunks 0.6 --no-skip-chunks
done
# Decode-sized runs see a different routing each run (--vary-inputs), as from token to
# token; prefill-sized runs route to every expert anyway.
for t in 1 8; do
    run "moe T=$t f16 resident vary" moe --tokens "$t" --weights f16 --iters 30 --vary-inputs
    for s in 8 16; do
        run "moe T=$t f16 stream$s vary" moe --tokens "$t" --weights f16 --iters 30 --vary-inputs --stream-slots "$s" --check
        run "moe T=$t q4_0 stream$s vary" moe --tokens "$t" --weights q4_0 --iters 30 --vary-inputs --stream-slots "$s"
    done
done
for t in 512 4096; do
    for s in 8 32; do
        run "moe T=$t f16 stream$s" moe --tokens "$t" --weights f16 --iters 10 --stream-slots "$s" --check
        run "moe T=$t q4_0 stream$s" moe --tokens "$t" --weights q4_0 --iters 10 --stream-slots "$s"
    done
done
for w in f16 q4_0; do
    run "layer T=1 $w resident vary" layer --tokens 1 --weights "$w" --iters 30 --vary-inputs
    for s in 8 16; do
        run "layer T=1 $w stream$s vary" layer --tokens 1 --weights "$w" --iters 30 --vary-inputs --stream-slots "$s"
    done
done
for t in 512 4096; do
    for w in f16 q4_0; do
        run "layer T=$t $w resident" layer --tokens "$t" --weights "$w" --iters 10
        run "layer T=$t $w stream8" layer --tokens "$t" --weights "$w" --iters 10 --stream-slots 8
        run "layer T=$t $w stream32" layer --tokens "$t" --weights "$w" --iters 10 --stream-slots 32
    done
done
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    python3 benches/peers/torch_moe.py --dtype f16 --json "$out"
else
    echo "PyTorch with CUDA not found: peer rows skipped"
fi
