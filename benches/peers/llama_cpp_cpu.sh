#!/usr/bin/env bash
# The CPU peer: llama.cpp's own CPU build against `wgsparse`'s CPU path on the same GGUF
# files, on this machine, in one run (same threads).
#
#   bash benches/peers/llama_cpp_cpu.sh MODEL.gguf [MODEL.gguf ...]
#
# Builds `llama-bench` once into target/peers/llama.cpp from the llama.cpp source that the
# llama-cpp-python sdist vendors (pip downloads it; cmake and ninja come from pip too, into
# target/peers/venv), then per model prints one JSON line per side:
#   llama.cpp: llama-bench -t THREADS -p 512 -n 32  (prefill and decode tok/s)
#   wgsparse:  `nll --tokens 512` (prefill tok/s: 512 tokens through the decoder),
#              `generate --tokens 32` (decode tok/s), peak resident memory of each
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
text=${TEXT:-data/text/emma.txt}

if [ ! -x "$bench" ]; then
    say "building llama-bench (once)"
    python3 -m venv "$peers/venv"
    "$peers/venv/bin/pip" install -q --disable-pip-version-check cmake ninja scikit-build-core
    tmp=$(mktemp -d)
    "$peers/venv/bin/pip" download -q --disable-pip-version-check --no-deps \
        --no-build-isolation --no-binary :all: -d "$tmp" llama-cpp-python
    tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    rm -rf "$peers/llama.cpp"
    mv "$(ls -d "$tmp"/llama_cpp_python-*/vendor/llama.cpp)" "$peers/llama.cpp"
    rm -rf "$tmp"
    "$peers/venv/bin/cmake" -S "$peers/llama.cpp" -B "$peers/llama.cpp/build" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$peers/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    "$peers/venv/bin/cmake" --build "$peers/llama.cpp/build" --target llama-bench -j "$threads" >/dev/null
fi
[ -x "$wgsparse" ] || cargo build --release --locked --bin wgsparse
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}

for model in "$@"; do
    say "$model: llama.cpp, $threads threads"
    "$bench" -m "$model" -t "$threads" -p 512 -n 32 -o jsonl 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    kind = "prefill" if r["n_prompt"] else "decode"
    print(json.dumps({"bench": "llama.cpp", "model": r["model_filename"], "test": kind,
                      "tokens": r["n_prompt"] or r["n_gen"], "tok_s": round(r["avg_ts"], 2)}))'
    say "$model: wgsparse --backend cpu"
    for kind in prefill decode; do
        if [ $kind = prefill ]; then
            args=(nll --model "$model" --text "$text" --tokens 512 --backend cpu)
        else
            args=(generate --model "$model" --prompt "Once upon a time" --tokens 32 --backend cpu)
        fi
        out=$( { /usr/bin/time -f 'peak_kb %M' "$wgsparse" "${args[@]}" 2>&1; } )
        python3 - "$model" "$kind" "$out" <<'EOF'
import json, re, sys
model, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
peak = int(re.search(r"peak_kb (\d+)", out).group(1))
if kind == "prefill":
    m = re.search(r"of (\d+) tokens .*?, ([\d.]+) s", out)
    tokens, secs = int(m.group(1)), float(m.group(2))
else:
    m = re.search(r"(\d+) generated in ([\d.]+) s", out)
    tokens, secs = int(m.group(1)), float(m.group(2))
print(json.dumps({"bench": "wgsparse", "model": model.rsplit("/", 1)[-1], "test": kind,
                  "tokens": tokens, "tok_s": round(tokens / secs, 2), "peak_mb": peak // 1024}))
EOF
    done
done
