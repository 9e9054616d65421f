# Sourced by scripts/test.sh, scripts/test-gpu.sh and scripts/test-web.sh.

# `cargo_executables ARGS...` builds what `cargo test --no-run ARGS...` names and prints
# one line `KIND NAME PATH` per executable it built or found fresh (KIND: lib, test, bin).
cargo_executables() {
    cargo test --locked --no-run --message-format=json "$@" 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])'
}

# `test_binaries ARGS...` prints one line `TARGET_NAME PATH` per library or
# integration-test binary of `cargo test --no-run ARGS...` (e.g. --lib --test coop).
test_binaries() {
    cargo_executables "$@" | awk '$1 == "lib" || $1 == "test" { print $2, $3 }'
}

# `cli_binary` prints the path of the `wgsparse` command as `cargo test` builds it for
# the CLI tests (built if missing). `cargo run` would build the crate a second time: a
# build without the dev-dependencies resolves other features of shared dependencies
# (naga's outputs), so every crate above them is compiled again (minutes on 2 cores).
cli_binary() {
    cargo_executables --test cli | awk '$1 == "bin" && $2 == "wgsparse" { print $3 }'
}
