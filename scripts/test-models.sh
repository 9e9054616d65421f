#!/usr/bin/env bash
# The real-model tests on SmolLM2-135M (93 MB, small enough for CI), with missing files
# failing instead of skipping:
#
#   bash scripts/test-models.sh [extra args for `cargo test`]
#
# 1. fetches SmolLM2 (scripts/fetch-models.sh smollm2; idempotent; the tests read their
#    text from tests/fixtures);
# 2. makes sure data/venv (or $WGSPARSE_DATA/venv) has numpy and gguf, the reference's
#    only dependencies (pip install into that private venv);
# 3. runs, with WGSPARSE_REQUIRE_MODELS=1: the numpy reference test (tests/reference.rs),
#    the eval tests (tests/eval.rs) and the SmolLM2 tests of tests/models.rs.
#
# scripts/test.sh (the README's test command and CI) runs it after the other tests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA="${WGSPARSE_DATA:-$PWD/data}"
PYTHON="${PYTHON:-python3}"
say() { printf '[test-models] %s\n' "$*" >&2; }

start=$SECONDS
bash scripts/fetch-models.sh smollm2

venv="$DATA/venv"
if ! "$venv/bin/python" -c 'import numpy, gguf' 2>/dev/null; then
    if [ ! -x "$venv/bin/python" ]; then
        say "creating $venv"
        "$PYTHON" -m venv "$venv" || { say "python3 -m venv failed (install python3-venv)"; exit 1; }
    fi
    say "installing numpy and gguf into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "numpy>=1.26" "gguf>=0.17"
fi

export WGSPARSE_REQUIRE_MODELS=1
export WGSPARSE_REFERENCE_PYTHON="$venv/bin/python"
say "cargo test: reference, eval (WGSPARSE_REQUIRE_MODELS=1)"
cargo test --locked --test reference --test eval "$@"
say "cargo test: SmolLM2 tests of tests/models.rs"
cargo test --locked --test models smollm2 "$@"
say "cargo run --example generate (SmolLM2 generating greedily)"
cargo run --locked --example generate -- "$DATA/models/smollm2-135m-instruct-q4_1.gguf" "The capital of France is"
say "real-model tests passed in $((SECONDS - start)) s"
