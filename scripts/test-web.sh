#!/usr/bin/env bash
# Browser test: builds the web crate (scripts/build-web.sh), serves web/ on 127.0.0.1 and
# drives the system Chromium headless through playwright-core (never a downloaded
# browser) to check the demo page on WebGPU and on the CPU (WASM) fallback; see
# scripts/web-test/browser-test.mjs for the assertions; the model page with SmolLM2-135M
# and a tiny SmallThinker (scripts/web-test/model-test.mjs); then every portable kernel
# variant through the browser's own WGSL compiler (scripts/web-test/compile-wgsl.mjs).
#
#   bash scripts/test-web.sh
#
# Installs what is missing (apt, as root or through passwordless sudo): chromium, and
# nodejs + npm; then playwright-core from scripts/web-test/package-lock.json into the
# git-ignored scripts/web-test/node_modules. Screenshots: target/web-test/*.png.
# Environment: CHROMIUM=/path/to/chromium, WGSPARSE_SKIP_APT=1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[test-web] %s\n' "$*" >&2; }
. scripts/apt.sh
. scripts/test-binaries.sh
start=$SECONDS

# --- system packages ------------------------------------------------------------------
chromium="${CHROMIUM:-}"
if [ -z "$chromium" ]; then
    for c in /usr/bin/chromium /usr/bin/chromium-browser; do
        [ -x "$c" ] && chromium="$c" && break
    done
fi
packages=()
[ -n "$chromium" ] || packages+=(chromium)
node_ok() {
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 &&
        [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 18 ]
}
node_ok || packages+=(nodejs npm)
if [ "${#packages[@]}" -gt 0 ]; then
    if [ "${WGSPARSE_SKIP_APT:-0}" = 1 ]; then
        say "missing ${packages[*]} (WGSPARSE_SKIP_APT=1)"
        exit 1
    fi
    apt_install "${packages[@]}" || exit 1
    [ -n "$chromium" ] || chromium=/usr/bin/chromium
fi
node_ok || { say "node >= 18 with npm is needed"; exit 1; }
say "browser: $("$chromium" --version 2>/dev/null || echo "$chromium"), node $(node --version)"

# --- playwright-core (pinned by the committed lockfile) ---------------------------------
pw=scripts/web-test
if [ ! -f "$pw/node_modules/playwright-core/package.json" ] ||
    [ "$pw/package-lock.json" -nt "$pw/node_modules/.package-lock.json" ]; then
    say "npm ci (playwright-core)"
    # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: belt and braces, playwright-core never downloads.
    (cd "$pw" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi

# --- build and test ---------------------------------------------------------------------
t=$SECONDS
bash scripts/build-web.sh
say "web build took $((SECONDS - t)) s"
# The CLI as the host tests built it (scripts/test-binaries.sh says why not `cargo run`).
wgsparse="$(cli_binary)"
[ -x "$wgsparse" ] || { say "could not build the wgsparse command"; exit 1; }
CHROMIUM="$chromium" node "$pw/browser-test.mjs" web target/web-test
# The model page: SmolLM2-135M (fetched by the real-model tests) generating greedily on
# WebGPU and on the WASM CPU path, against the native CPU decoder's text; a tiny
# synthetic SmallThinker (MoE) file. WGSPARSE_SKIP_MODELS=1 skips it.
if [ "${WGSPARSE_SKIP_MODELS:-0}" = 1 ]; then
    say "model page test skipped (WGSPARSE_SKIP_MODELS=1)"
else
    data="${WGSPARSE_DATA:-$PWD/data}"
    [ -f "$data/models/smollm2-135m-instruct-q4_1.gguf" ] || bash scripts/fetch-models.sh smollm2
    models="$(mktemp -d)"
    trap 'rm -rf "$models"' EXIT
    ln -s "$data/models/smollm2-135m-instruct-q4_1.gguf" "$models/"
    prompt="The capital of France is"
    tokens=4
    "$wgsparse" synth-gguf --arch smallthinker --preset tiny-smallthinker \
        --type q4_0 --out "$models/tiny-smallthinker.gguf" >/dev/null
    "$wgsparse" generate --model "$models/smollm2-135m-instruct-q4_1.gguf" \
        --engine cpu --backend cpu --prompt "$prompt" --tokens "$tokens" --json >"$models/expected.json"
    say "native CPU decoder: $(cat "$models/expected.json")"
    [ -f "$data/text/prideprejudice.txt" ] || bash scripts/fetch-models.sh austen
    CHROMIUM="$chromium" node "$pw/model-test.mjs" web target/web-test "$models" \
        "$models/expected.json" "$prompt" "$tokens" "$data/text/prideprejudice.txt"
fi
# Every portable kernel variant through the browser's own shader compiler.
rm -rf target/web-test/wgsl
"$wgsparse" shader --dump target/web-test/wgsl >/dev/null
CHROMIUM="$chromium" node "$pw/compile-wgsl.mjs" target/web-test/wgsl
say "browser test passed; screenshots in target/web-test/; $((SECONDS - start)) s in all"
