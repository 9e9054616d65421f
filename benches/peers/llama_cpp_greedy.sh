#!/usr/bin/env bash
# An independent check of the CPU decoder's architectures: greedy continuations of
# llama.cpp (`llama-simple`, its CPU build) and `wgsparse generate --backend cpu` on the
# same synthetic GGUF files (`wgsparse synth-gguf`, the tiny preset of each
# architecture, F16, Q8_0 and Q4_0 weights), compared as text (invalid UTF-8 replaced
# on both sides). wgsparse runs its default form and its f32 oracle (`--exact`).
#
#   bash benches/peers/llama_cpp_greedy.sh [TOKENS]      (default 16)
#
# Prints one line per file and mode, SAME or DIFF with both texts; exits 1 on a DIFF.
# Tiny random models have nearly flat logits (and, for SmallThinker, near-tied router
# top-k choices), so llama.cpp's 8-bit (or f16) activation rounding can flip a greedy token:
# with Q4_0 codes of mean 0 (synth-gguf since 2026-12-05), seed 3 gives 16 of 18 SAME
# (smallthinker q4_0 differs), and over seeds 1-9 (8 tokens, --exact) qwen2 q4_0 matched
# 8 of 8, llama q4_0 5 of 8, smallthinker q4_0 6 of 8 (of 6 tried), q8_0 5 of 8, f16 7 of 8.
# A DIFF here is a lead to follow (compare logits and their top-2 margin), not a verdict;
# the real-model tests hold the forward pass to an f64 reference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source benches/peers/build_llama_cpp.sh
build_llama_cpp llama-simple
simple=$PWD/target/peers/llama.cpp/build/bin/llama-simple
wgsparse=${WGSPARSE:-target/release/wgsparse}
[ -x "$wgsparse" ] || cargo build --release --locked --bin wgsparse
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
tokens=${1:-16}
prompt="hello world the cat"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail=0
for arch in qwen2 llama smallthinker; do
    for ty in f16 q8_0 q4_0; do
        f=$dir/tiny-$arch-$ty.gguf
        "$wgsparse" synth-gguf --arch "$arch" --preset "tiny-$arch" --type "$ty" --seed 3 \
            --out "$f" >/dev/null
        "$simple" -m "$f" -n "$tokens" "$prompt" 2>/dev/null >"$dir/llama.txt" || true
        for mode in default exact; do
            flag=(); [ $mode = exact ] && flag=(--exact)
            "$wgsparse" generate --model "$f" --prompt "$prompt" --tokens "$tokens" \
                --backend cpu "${flag[@]}" --json 2>/dev/null >"$dir/ours.json"
            if out=$(python3 - "$dir/llama.txt" "$dir/ours.json" "$prompt" <<'PY'
import json, sys
raw = open(sys.argv[1], "rb").read()
prompt = sys.argv[3].encode()
theirs = raw[len(prompt):] if raw.startswith(prompt) else raw
theirs = theirs.rstrip(b"\n").decode("utf-8", "replace")
ours = json.load(open(sys.argv[2]))["text"]
same = theirs == ours
print(("SAME " if same else "DIFF ") + json.dumps({"llama.cpp": theirs, "wgsparse": ours}))
sys.exit(0 if same else 1)
PY
            ); then
                echo "$arch $ty $mode: $out"
            else
                echo "$arch $ty $mode: $out"
                fail=1
            fi
        done
    done
done
exit $fail
