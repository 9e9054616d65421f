#!/usr/bin/env bash
# The CPU peer: llama.cpp's own CPU build against `wgsparse`'s CPU path on the same GGUF
# files, on this machine, in one run (same threads).
#
#   bash benches/peers/llama_cpp_cpu.sh MODEL.gguf [MODEL.gguf ...]
#
# Builds `llama-bench` once into target/peers/llama.cpp (build_llama_cpp.sh: from the
# llama.cpp source that the llama-cpp-python sdist vendors), then per model prints one
# JSON line per side:
#   llama.cpp: llama-bench -t THREADS -p 512 -n 32 -d 0,512   (prefill of 512 tokens;
#              decode of 32 tokens from an empty context and after 512 tokens)
#   wgsparse:  bench-model --backend cpu --threads THREADS --prompt-tokens 16,512
#              --gen 32   (prefill of 512 tokens; decode of 32 tokens after 16 and after
#              512 prompt tokens; peak resident memory of the process)
# THREADS defaults to the number of cores (`nproc`); WGSPARSE is the binary
# (default target/release/wgsparse, built if missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ $# -ge 1 ] || { echo "usage: $0 MODEL.gguf [MODEL.gguf ...]" >&2; exit 2; }
say() { printf '[llama-cpp-cpu] %s\n' "$*" >&2; }
threads=${THREADS:-$(nproc)}
peers=$PWD/target/peers
bench=$peers/llama.cpp/build/bin/llama-bench
wgsparse=${WGSPARSE:-target/release/wgsparse}

source benches/peers/build_llama_cpp.sh
build_llama_cpp llama-bench
[ -x "$wgsparse" ] || cargo build --release --locked --bin wgsparse
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}

for model in "$@"; do
    say "$model: llama.cpp, $threads threads"
    "$bench" -m "$model" -t "$threads" -p 512 -n 32 -d 0,512 -o jsonl 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    kind = "prefill" if r["n_prompt"] else "decode"
    print(json.dumps({"bench": "llama.cpp", "model": r["model_filename"].rsplit("/", 1)[-1],
                      "test": kind, "tokens": r["n_prompt"] or r["n_gen"],
                      "context": r.get("n_depth", 0), "tok_s": round(r["avg_ts"], 2)}))'
    say "$model: wgsparse bench-model --backend cpu"
    "$wgsparse" bench-model --model "$model" --backend cpu --threads "$threads" \
        --prompt-tokens 16,512 --gen 32 --json 2>/dev/null |
        python3 -c '
import json, sys
r = json.load(sys.stdin)
name = r["model"].rsplit("/", 1)[-1]
for run in r["runs"]:
    if run["prompt_tokens"] == 512:
        print(json.dumps({"bench": "wgsparse", "model": name, "test": "prefill", "tokens": 512,
                          "context": 0, "tok_s": round(run["prefill_tok_s"], 2)}))
    print(json.dumps({"bench": "wgsparse", "model": name, "test": "decode",
                      "tokens": run["gen_tokens"], "context": run["prompt_tokens"],
                      "tok_s": round(run["decode_tok_s"], 2),
                      "peak_mb": run["peak_host_bytes"] >> 20,
                      "file_mb": r["file_bytes"] >> 20}))'
done
