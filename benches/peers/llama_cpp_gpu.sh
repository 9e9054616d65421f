#!/usr/bin/env bash
# The GPU peer: llama.cpp's Vulkan or CUDA build against `wgsparse`'s GPU decoder on the
# same GGUF files and the same GPU, in one run.
#
#   LLAMA_BACKEND=vulkan|cuda bash benches/peers/llama_cpp_gpu.sh MODEL.gguf [MODEL.gguf ...]
#
# Builds `llama-bench` once (build_llama_cpp.sh; vulkan needs libvulkan-dev, spirv-headers
# and glslc, cuda needs nvcc: CUDA_ARCH=90 on the H200), then per model prints one JSON
# line per side and test:
#   llama.cpp: llama-bench -ngl 99 -fa 1 -p PROMPTS -n GEN   (all layers on the GPU,
#              flash attention; prefill of each prompt length, decode from an empty
#              context)
#   wgsparse:  bench-model --backend vulkan --prompt-tokens 16,PROMPTS --gen GEN
#              (the GPU decoder: prefill of each prompt length; decode after 16 and
#              after each prompt; peak GPU buffer memory and peak host memory)
# PROMPTS defaults to 512 (the H200 issue: 512,8192,32768), GEN to 32; METHOD (default
# dense) is wgsparse's prompt attention; REPS (default 5) llama-bench's repetitions;
# WGSPARSE is the binary (built if missing). llama.cpp skips CPU-type Vulkan devices
# (lavapipe) unless GGML_VK_VISIBLE_DEVICES names them: the script sets it to 0 when
# unset and the only device is one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ $# -ge 1 ] || { echo "usage: LLAMA_BACKEND=vulkan|cuda $0 MODEL.gguf [MODEL.gguf ...]" >&2; exit 2; }
say() { printf '[llama-cpp-gpu] %s\n' "$*" >&2; }
export LLAMA_BACKEND=${LLAMA_BACKEND:-vulkan}
prompts=${PROMPTS:-512}
gen=${GEN:-32}
method=${METHOD:-dense}
wgsparse=${WGSPARSE:-target/release/wgsparse}

source benches/peers/build_llama_cpp.sh
if [ "$LLAMA_BACKEND" = vulkan ] && [ -z "${GGML_VK_VISIBLE_DEVICES:-}" ]; then
    export GGML_VK_VISIBLE_DEVICES=0
fi
build_llama_cpp llama-bench
bench=$(llama_cpp_bin_dir)/llama-bench
[ -x "$wgsparse" ] || cargo build --release --locked --bin wgsparse
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}

for model in "$@"; do
    say "$model: llama.cpp ($LLAMA_BACKEND), -ngl 99 -fa 1 -p $prompts -n $gen"
    "$bench" -m "$model" -ngl 99 -fa 1 -p "$prompts" -n "$gen" -r "${REPS:-5}" -o jsonl 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    kind = "prefill" if r["n_prompt"] else "decode"
    print(json.dumps({"bench": "llama.cpp", "backend": r.get("backends", ""),
                      "model": r["model_filename"].rsplit("/", 1)[-1], "test": kind,
                      "tokens": r["n_prompt"] or r["n_gen"], "context": r.get("n_depth", 0),
                      "tok_s": round(r["avg_ts"], 2)}))'
    say "$model: wgsparse bench-model --backend vulkan (GPU decoder, method $method)"
    "$wgsparse" bench-model --model "$model" --backend vulkan --engine gpu --method "$method" \
        --prompt-tokens "16,$prompts" --gen "$gen" --json 2>/dev/null |
        python3 -c '
import json, sys
r = json.load(sys.stdin)
name = r["model"].rsplit("/", 1)[-1]
for run in r["runs"]:
    if run["prompt_tokens"] != 16:
        print(json.dumps({"bench": "wgsparse", "model": name, "test": "prefill",
                          "tokens": run["prompt_tokens"], "context": 0,
                          "tok_s": round(run["prefill_tok_s"], 2),
                          "attention_share": run["prefill_attention_share"]}))
    print(json.dumps({"bench": "wgsparse", "model": name, "test": "decode",
                      "tokens": run["gen_tokens"], "context": run["prompt_tokens"],
                      "tok_s": round(run["decode_tok_s"], 2),
                      "peak_gpu_mb": (run["peak_gpu_bytes"] or 0) >> 20,
                      "peak_host_mb": run["peak_host_bytes"] >> 20,
                      "file_mb": r["file_bytes"] >> 20}))'
done
