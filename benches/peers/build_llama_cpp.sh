#!/usr/bin/env bash
# Builds llama.cpp's CPU tools (the targets given, e.g. llama-bench llama-simple) into
# target/peers/llama.cpp/build/bin, once, from the llama.cpp source that the
# llama-cpp-python sdist vendors (pip downloads it; cmake and ninja come from pip too,
# into target/peers/venv). Sourced by the peer scripts: `build_llama_cpp TARGET...`.
build_llama_cpp() {
    local peers=$PWD/target/peers missing=()
    for t in "$@"; do
        [ -x "$peers/llama.cpp/build/bin/$t" ] || missing+=("$t")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    printf '[build-llama-cpp] building %s (once)\n' "${missing[*]}" >&2
    if [ ! -f "$peers/llama.cpp/CMakeLists.txt" ]; then
        python3 -m venv "$peers/venv"
        "$peers/venv/bin/pip" install -q --disable-pip-version-check cmake ninja scikit-build-core
        local tmp
        tmp=$(mktemp -d)
        "$peers/venv/bin/pip" download -q --disable-pip-version-check --no-deps \
            --no-build-isolation --no-binary :all: -d "$tmp" llama-cpp-python
        tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
        rm -rf "$peers/llama.cpp"
        mv "$(ls -d "$tmp"/llama_cpp_python-*/vendor/llama.cpp)" "$peers/llama.cpp"
        rm -rf "$tmp"
    fi
    "$peers/venv/bin/cmake" -S "$peers/llama.cpp" -B "$peers/llama.cpp/build" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$peers/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF >/dev/null
    "$peers/venv/bin/cmake" --build "$peers/llama.cpp/build" --target "${missing[@]}" \
        -j "$(nproc)" >/dev/null
}
