#!/usr/bin/env bash
# Builds llama.cpp's tools (the targets given, e.g. llama-bench llama-simple) once, from
# the llama.cpp source that the llama-cpp-python sdist vendors (pip downloads it; cmake
# and ninja come from pip too, into target/peers/venv). Sourced by the peer scripts:
# `build_llama_cpp TARGET...`.
#
# LLAMA_BACKEND picks the ggml backend and the build directory:
#   cpu (default)  target/peers/llama.cpp/build         -DGGML_NATIVE=ON
#   vulkan         target/peers/llama.cpp/build-vulkan  -DGGML_VULKAN=ON (needs the
#                  Vulkan and SPIR-V headers and glslc: apt install libvulkan-dev spirv-headers
#                  glslc; Vulkan headers newer than Debian 12's 1.3.239, e.g. Debian 13's:
#                  1.3.239 lacks VK_EXT_layer_settings and the build stops there)
#   cuda           target/peers/llama.cpp/build-cuda    -DGGML_CUDA=ON
#                  -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} (needs nvcc; the H200 is sm_90)
# LLAMA_CMAKE_ARGS adds cmake flags (e.g. -DVulkan_INCLUDE_DIR=... for newer headers).
# llama_cpp_bin_dir prints the directory the tools land in.
llama_cpp_bin_dir() {
    case "${LLAMA_BACKEND:-cpu}" in
        cpu) echo "$PWD/target/peers/llama.cpp/build/bin" ;;
        *) echo "$PWD/target/peers/llama.cpp/build-${LLAMA_BACKEND}/bin" ;;
    esac
}

build_llama_cpp() {
    local peers=$PWD/target/peers missing=() bin
    bin=$(llama_cpp_bin_dir)
    for t in "$@"; do
        [ -x "$bin/$t" ] || missing+=("$t")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    printf '[build-llama-cpp] building %s (once)\n' "${missing[*]}" >&2
    if [ ! -x "$peers/venv/bin/cmake" ] || [ ! -x "$peers/venv/bin/ninja" ]; then
        python3 -m venv "$peers/venv"
        "$peers/venv/bin/pip" install -q --disable-pip-version-check cmake ninja scikit-build-core
    fi
    if [ ! -f "$peers/llama.cpp/CMakeLists.txt" ]; then
        local tmp
        tmp=$(mktemp -d)
        "$peers/venv/bin/pip" download -q --disable-pip-version-check --no-deps \
            --no-build-isolation --no-binary :all: -d "$tmp" llama-cpp-python
        tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
        rm -rf "$peers/llama.cpp"
        mv "$(ls -d "$tmp"/llama_cpp_python-*/vendor/llama.cpp)" "$peers/llama.cpp"
        rm -rf "$tmp"
    fi
    local build flags=()
    build=$(dirname "$bin")
    # (the Vulkan backend's shader generator is a sub-build that finds ninja on PATH)
    export PATH="$peers/venv/bin:$PATH"
    case "${LLAMA_BACKEND:-cpu}" in
        cpu) flags=(-DGGML_NATIVE=ON) ;;
        vulkan) flags=(-DGGML_NATIVE=ON -DGGML_VULKAN=ON) ;;
        cuda) flags=(-DGGML_NATIVE=ON -DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90}") ;;
        *) printf '[build-llama-cpp] LLAMA_BACKEND=%s: cpu, vulkan or cuda\n' "$LLAMA_BACKEND" >&2; return 2 ;;
    esac
    "$peers/venv/bin/cmake" -S "$peers/llama.cpp" -B "$build" -G Ninja \
        -DCMAKE_MAKE_PROGRAM="$peers/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
        "${flags[@]}" ${LLAMA_CMAKE_ARGS:-} -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF >/dev/null
    "$peers/venv/bin/cmake" --build "$build" --target "${missing[@]}" -j "$(nproc)" >/dev/null
}
