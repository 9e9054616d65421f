#!/usr/bin/env python3
"""Reference token ids for a GGUF's tokenizer, made with Hugging Face `transformers`' own GGUF
tokenizer builders (no torch needed), independently of wgsparse's Rust tokenizer.

    python tokenizer_reference.py MODEL.gguf TEXT_FILE N_CHARS OUT.json [--save-tokenizer T.json]

Writes {"model", "text", "ids"} for the first N_CHARS characters of TEXT_FILE (cut at a line
end). Needs the PyPI packages gguf, tokenizers, transformers (a venv; see
scripts/fetch-models.sh for where the data lives).

One deliberate addition to transformers: for `tokenizer.ggml.pre = smollm`, transformers
falls back to plain GPT-2 byte-level splitting, while the model's own tokenizer (and
llama.cpp) first splits every digit apart (`\\p{N}`). We add that digit split so the
reference is the model's real tokenization.
"""

import json
import sys

import gguf
from tokenizers import pre_tokenizers
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    GGUF_TOKENIZER_MAPPING,
    convert_gguf_tokenizer,
)


def field_value(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def load_tokenizer(path):
    r = gguf.GGUFReader(path)
    arch = field_value(r, "general.architecture")
    d = {}
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        v = field_value(r, "tokenizer." + key)
        if v is not None:
            d[name] = v
    tok, _ = convert_gguf_tokenizer(arch, d)
    if d.get("pre_tokenizer_type") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return tok


def main():
    args = sys.argv[1:]
    save = None
    if "--save-tokenizer" in args:
        i = args.index("--save-tokenizer")
        save = args[i + 1]
        del args[i : i + 2]
    if len(args) != 4:
        sys.exit(__doc__)
    model, text_file, n_chars, out = args[0], args[1], int(args[2]), args[3]
    tok = load_tokenizer(model)
    if save:
        tok.save(save)
    with open(text_file, encoding="utf-8") as f:
        text = f.read()[:n_chars]
    text = text[: text.rfind("\n") + 1] if "\n" in text else text
    ids = tok.encode(text, add_special_tokens=False).ids
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"model": model.rsplit("/", 1)[-1], "text": text, "ids": ids}, f)
    print(f"{out}: {len(text)} chars -> {len(ids)} ids")


if __name__ == "__main__":
    main()
