# Sourced by scripts/test.sh, scripts/test-gpu.sh and scripts/test-web.sh.
#
# `test_binaries ARGS...` builds the test binaries `cargo test --no-run ARGS...` names
# (e.g. --lib --test coop) and prints one line `TARGET_NAME PATH` per library or
# integration-test binary.
test_binaries() {
    cargo test --locked --no-run --message-format=json "$@" 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] in (["test"], ["lib"]):
        print(m["target"]["name"], m["executable"])'
}

# `cli_binary` prints the path of the `wgsparse` command as `cargo test` builds it for
# the CLI tests (built if missing). `cargo run` would build the crate a second time: a
# build without the dev-dependencies resolves other features of shared dependencies
# (naga's outputs), so every crate above them is compiled again (minutes on 2 cores).
cli_binary() {
    cargo test --locked --no-run --test cli --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bin"] and m["target"]["name"] == "wgsparse":
        print(m["executable"])'
}
