#!/usr/bin/env python3
"""Block-sparse peer: PyTorch FlexAttention with a BlockMask, on the masks that
`examples/bench.rs --methods "blocks:p=P,block=B"` runs.

Causal prefill, batch 1, GQA (`enable_gqa=True`), fp16. Per (head, query block qb) the
kept key blocks are: block 0, the diagonal block, and every other causal block kb with
hash(h, qb, kb) < p, where

    hash = (((h << 40) | (qb << 20) | kb) * 0x9E3779B97F4A7C15 mod 2^64) >> 11, / 2^53

the same rule as the Rust bench, so both sides compute the same blocks. The mask is
built directly as a BlockMask (`BlockMask.from_kv_blocks`): off-diagonal blocks are
"full" blocks, the diagonal block is a partial block with the causal mask_mod. The
density printed is the fraction of causal (q, k) pairs computed, counted exactly as the
Rust `SparseLut::pairs(true)` does.

Times with CUDA events: `--warmup` untimed calls (the first compiles), then the median
of `--iters` timed calls.

Example (on the GPU machine):
    python3 benches/peers/torch_flex.py --seq-lens 32768,131072 --ps 0.05,0.1,0.2,1.0 \
        --json "$OUT/torch_flex.jsonl"
"""

import argparse
import json
import statistics
import sys

try:
    import numpy as np
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError as e:  # pragma: no cover - only on machines without torch
    print(f"torch_flex.py needs PyTorch with FlexAttention: {e}", file=sys.stderr)
    sys.exit(2)

def parse_len(s):
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def keep_table(heads, n, block, p):
    """[heads, nqb, nqb] bool: off-diagonal causal key blocks kept (block 0 always),
    by the hash rule shared with the Rust bench (uint64 arithmetic wraps mod 2^64)."""
    nqb = (n + block - 1) // block
    qb = np.arange(nqb, dtype=np.uint64)[:, None]
    kb = np.arange(nqb, dtype=np.uint64)[None, :]
    out = np.zeros((heads, nqb, nqb), dtype=bool)
    with np.errstate(over="ignore"):
        for h in range(heads):
            x = (np.uint64(h) << np.uint64(40)) | (qb << np.uint64(20)) | kb
            y = (x * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
            kept = (y.astype(np.float64) / float(1 << 53)) < p
            out[h] = (kept | (kb == 0)) & (kb < qb)
    return out


def causal_pairs_of(table, n, block):
    """Pairs computed: off-diagonal blocks are full, the diagonal block is causal;
    ragged last blocks clipped to n (as SparseLut::pairs(true))."""
    nqb = table.shape[1]
    sizes = np.minimum(np.arange(1, nqb + 1) * block, n) - np.arange(nqb) * block
    off = (table * sizes[None, :, None] * sizes[None, None, :]).sum()
    diag = table.shape[0] * (sizes * (sizes + 1) // 2).sum()
    return int(off + diag)


def build_mask(table, n, block, device):
    heads, nqb, _ = table.shape
    t = torch.from_numpy(table)
    full_num = t.sum(-1).to(torch.int32)[None]
    # Kept blocks first, in ascending order (stable sort of "not kept").
    full_idx = torch.argsort((~t).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]
    part_num = torch.ones((1, heads, nqb), dtype=torch.int32)
    part_idx = torch.zeros((1, heads, nqb, nqb), dtype=torch.int32)
    part_idx[0, :, :, 0] = torch.arange(nqb, dtype=torch.int32)[None, :]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(
        part_num.to(device),
        part_idx.to(device),
        full_num.to(device),
        full_idx.to(device),
        BLOCK_SIZE=block,
        mask_mod=causal,
        seq_lengths=(n, n),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", default="32768,131072")
    ap.add_argument("--ps", default="0.05,0.1,0.2,1.0")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = "cuda"
    flex = torch.compile(flex_attention, dynamic=False)
    out = open(a.json, "w") if a.json else None
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    for n in [parse_len(x) for x in a.seq_lens.split(",") if x.strip()]:
        g = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn((1, a.q_heads, n, a.head_dim), device=dev, dtype=torch.float16, generator=g)
        k = torch.randn((1, a.kv_heads, n, a.head_dim), device=dev, dtype=torch.float16, generator=g)
        v = torch.randn((1, a.kv_heads, n, a.head_dim), device=dev, dtype=torch.float16, generator=g)
        causal_total = a.q_heads * n * (n + 1) // 2
        for p in [float(x) for x in a.ps.split(",") if x.strip()]:
            row = {"bench": "torch-flex", "tokens": n, "p": p, "block": a.block,
                   "q_heads": a.q_heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                   "dtype": "fp16", "torch": torch.__version__}
            try:
                table = keep_table(a.q_heads, n, a.block, p)
                row["density"] = causal_pairs_of(table, n, a.block) / causal_total
                mask = build_mask(table, n, a.block, dev)
                for _ in range(a.warmup):
                    flex(q, k, v, block_mask=mask, enable_gqa=True)
                torch.cuda.synchronize()
                times = []
                for _ in range(a.iters):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    flex(q, k, v, block_mask=mask, enable_gqa=True)
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
                row["median_ms"] = statistics.median(times)
                row["status"] = "ok"
                print(f"{n:>7} tokens p={p:<5} density {row['density']:.4f}: {row['median_ms']:.3f} ms")
            except Exception as ex:  # noqa: BLE001 - recorded, not hidden
                row["status"] = "error"
                row["note"] = f"{type(ex).__name__}: {ex}"[:500]
                print(f"{n:>7} tokens p={p}: error {row['note']}")
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
