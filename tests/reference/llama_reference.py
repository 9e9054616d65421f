#!/usr/bin/env python3
"""Independent reference forward pass of a llama-architecture GGUF (SmolLM2) in numpy.

Usage: llama_reference.py MODEL.gguf IDS_FILE OUT_FILE

IDS_FILE holds token ids as little-endian uint32; OUT_FILE receives the logits of
every position as little-endian float32 [len(ids), vocab]. Weights are read and
dequantized with the `gguf` package (gguf.quants.dequantize); the forward pass is
written here from the llama definition in float64: RMSNorm, rotary embedding on
adjacent pairs (the GGUF converter permutes llama's Q/K rows to that layout), grouped
query attention with a causal softmax, SwiGLU MLP, tied embeddings when the file has
no output.weight. It shares no code with the Rust decoder.
"""
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(reader, name):
    f = reader.fields[name]
    v = f.parts[f.data[0]]
    return v.tolist()[0] if len(v) == 1 else v.tolist()


def main():
    model, ids_path, out_path = sys.argv[1:4]
    r = GGUFReader(model)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    if arch != "llama":
        sys.exit(f"reference: architecture {arch} is not llama")
    n_layer = field(r, "llama.block_count")
    n_head = field(r, "llama.attention.head_count")
    n_kv = field(r, "llama.attention.head_count_kv")
    d_model = field(r, "llama.embedding_length")
    eps = field(r, "llama.attention.layer_norm_rms_epsilon")
    base = field(r, "llama.rope.freq_base") if "llama.rope.freq_base" in r.fields else 10000.0
    hd = d_model // n_head
    tensors = {t.name: t for t in r.tensors}

    def w(name):
        t = tensors[name]
        a = dequantize(t.data, t.tensor_type)
        # ggml order is (ne0 = input dim, ne1 = rows): numpy holds [rows, ne0].
        shape = [int(x) for x in reversed(t.shape.tolist())]
        return np.asarray(a, dtype=np.float64).reshape(shape)

    ids = np.fromfile(ids_path, dtype="<u4").astype(np.int64)
    t = len(ids)
    emb = w("token_embd.weight")
    x = emb[ids]

    def rms(v, g):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * g

    pos = np.arange(t, dtype=np.float64)
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = pos[:, None] * inv[None, :]  # [t, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # v [t, heads, hd], pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(v)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    mask = np.triu(np.full((t, t), -np.inf), k=1)
    for l in range(n_layer):
        p = f"blk.{l}."
        h = rms(x, w(p + "attn_norm.weight"))
        q = rope((h @ w(p + "attn_q.weight").T).reshape(t, n_head, hd))
        k = rope((h @ w(p + "attn_k.weight").T).reshape(t, n_kv, hd))
        v = (h @ w(p + "attn_v.weight").T).reshape(t, n_kv, hd)
        o = np.empty((t, n_head, hd))
        for hh in range(n_head):
            kv = hh // (n_head // n_kv)
            s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            o[:, hh, :] = s @ v[:, kv, :]
        x = x + o.reshape(t, d_model) @ w(p + "attn_output.weight").T
        h = rms(x, w(p + "ffn_norm.weight"))
        g = h @ w(p + "ffn_gate.weight").T
        u = h @ w(p + "ffn_up.weight").T
        x = x + ((g / (1.0 + np.exp(-g))) * u) @ w(p + "ffn_down.weight").T
    x = rms(x, w("output_norm.weight"))
    out = w("output.weight") if "output.weight" in tensors else emb
    logits = x @ out.T
    logits.astype("<f4").tofile(out_path)


if __name__ == "__main__":
    main()
