#!/usr/bin/env bash
# The matrix-unit kernels on a GPU machine, in one go: which kernel each family runs,
# the GPU-vs-CPU checks of attention (dense, SALE, AnchorAttention, ProxyAttn; f16), the MoE layer
# and the decoder layer with them, dense and sparse f16 attention with and without
# matrix units (WGSPARSE_NO_COOP=1), the tuning table, and the PyTorch SDPA peer on the
# same shapes.
#
#   scripts/bench-coop.sh [OUT_DIR]      (binaries: target/release/{wgsparse,examples/bench})
set -uo pipefail
out=${1:-coop-bench}
bin=target/release/wgsparse
bench=target/release/examples/bench
mkdir -p "$out"
say() { printf '[bench-coop] %s\n' "$*"; }
"$bin" info --json >"$out/info.json" && "$bin" info | tail -4
for m in dense sale anchor proxy; do
    "$bin" attention --method "$m" --dtype f16 --seq-len 4096 --iters 3 --check --json \
        >"$out/check-$m.json" || say "check $m FAILED"
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], "ms", round(d["ms"],3), "density", round(d["density"],4), "max_abs_err", d.get("max_abs_err"), [s.get("variant") for s in d.get("stages", [])])' \
        "$out/check-$m.json" "$m"
done
for what in "moe --tokens 512" "moe --tokens 4096" "layer --tokens 512"; do
    # shellcheck disable=SC2086
    "$bin" $what --iters 5 --check --json >"$out/${what// /_}.json" || say "$what FAILED"
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], "ms", round(d["ms"],3), "rel_l2_err", d.get("rel_l2_err"), [s.get("variant") for s in d.get("stages", [])])' \
        "$out/${what// /_}.json" "$what"
done
"$bin" tune --head-dims 128 --seq-len 8192 --out "$out/tune.json" | tail -3
lens=4096,16384,32768
"$bench" --seq-lens "$lens" --iters 5 --check-len 1024 --budget-s 30 \
    --methods 'dense;sale:tau=0.004;proxy;blocks:p=0.1' --json "$out/coop.jsonl" | tail -12
WGSPARSE_NO_COOP=1 "$bench" --seq-lens 4096,16384 --iters 3 --budget-s 30 \
    --methods 'dense;blocks:p=0.1' --json "$out/portable.jsonl" | tail -6
python3 benches/peers/torch_sdpa.py --seq-lens "$lens" --dtypes fp16 --backends cudnn,flash \
    --json "$out/torch.jsonl" | tail -8
