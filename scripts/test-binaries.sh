# Sourced by scripts/test.sh and scripts/test-gpu.sh: `test_binaries ARGS...` builds the
# test binaries `cargo test --no-run ARGS...` names (e.g. --lib --test coop) and prints
# one line `TARGET_NAME PATH` per library or integration-test binary.
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
