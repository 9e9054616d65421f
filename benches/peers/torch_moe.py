#!/usr/bin/env python3
"""Peer baseline: a PyTorch eager MoE layer on the shapes of `wgsparse moe`.

The same computation as the crate's `MoePlan` (SmallThinker's MoE block, batch 1):

    logits = x @ W_router^T                      (router on x, f32)
    top    = topk(logits, k)                     (exact ties have probability zero with these
                                                  Gaussian inputs; the crate breaks them by index)
    w      = sigmoid(logits[top]); w /= w.sum()  (--softmax: softmax over the chosen logits)
    out    = x + sum_k w_k * down_t_e^T ((up_e z) * relu(gate_e z)),  z = x

The experts run the usual eager way: for each expert, `index_select` of its tokens, three
matmuls in `--dtype` (f16 by default, bf16 optional), and `index_add_` of the weighted
result back to token order. W_down is stored transposed (`[ffn, hidden]` per expert) as in
the crate. Weights and inputs are random (synthetic), like `wgsparse moe`.

Timing: CUDA events around the whole layer, `--warmup` untimed calls, then the median of
`--iters` timed calls. FLOPs are counted like the crate (`MoeConfig::expert_flops`):
6 * tokens * top_k * ffn * hidden (three matmuls, no neuron skipping), so `tflops` is the
dense-equivalent rate. `skip_frac` is the fraction of (routed token, neuron) pairs with
gate <= 0 (PyTorch computes them anyway).

One JSON object per token count on stdout (and appended to `--json FILE`), keys:
bench, tokens, hidden, experts, top_k, ffn, dtype, ms, tokens_per_s, tflops, skip_frac.

Example (on the GPU machine, next to the crate's run):
    ./target/release/wgsparse moe --tokens 4096 --hidden 1536 --experts 32 --top-k 4 \
        --ffn 768 --weights f16 --json
    python3 benches/peers/torch_moe.py --tokens 1,8,512,4096 --json "$OUT/torch_moe.jsonl"
"""

import argparse
import json
import statistics
import sys

try:
    import torch
except ImportError as e:  # pragma: no cover - only on machines without torch
    print(f"torch_moe.py needs PyTorch: {e}", file=sys.stderr)
    sys.exit(2)

DTYPES = {"f16": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_weights(experts, hidden, ffn, dtype, device, gen):
    def g(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    return {
        "router": torch.randn(experts, hidden, generator=gen, device=device) / hidden**0.5,
        "gate": g(experts, ffn, hidden, scale=hidden**-0.5),
        "up": g(experts, ffn, hidden, scale=hidden**-0.5),
        "down_t": g(experts, ffn, hidden, scale=ffn**-0.5),
    }


def moe_layer(x, w, top_k, softmax, stats=None):
    """x: [tokens, hidden] f32. Returns x + MoE(x) in f32."""
    logits = x @ w["router"].t()
    vals, ids = torch.topk(logits, top_k, dim=-1)
    s = torch.softmax(vals, dim=-1) if softmax else torch.sigmoid(vals)
    weights = s / s.sum(dim=-1, keepdim=True)
    out = x.clone()
    z = x.to(w["gate"].dtype)
    flat_ids = ids.reshape(-1)
    flat_w = weights.reshape(-1)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_k)
    for e in range(w["gate"].shape[0]):
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        tok = token_of.index_select(0, sel)
        ze = z.index_select(0, tok)
        g = ze @ w["gate"][e].t()
        u = ze @ w["up"][e].t()
        if stats is not None:
            stats[0] += int((g <= 0).sum())
            stats[1] += g.numel()
        a = u * torch.relu(g)
        y = a @ w["down_t"][e]
        out.index_add_(0, tok, y.float() * flat_w.index_select(0, sel).unsqueeze(1))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,512,4096", help="comma-separated token counts")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--dtype", default="f16", choices=sorted(DTYPES))
    p.add_argument("--softmax", action="store_true", help="softmax router weights instead of sigmoid")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", help="append one JSON line per token count to this file")
    a = p.parse_args()

    if not torch.cuda.is_available():
        print("torch_moe.py: CUDA is not available", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda")
    dtype = DTYPES[a.dtype]
    gen = torch.Generator(device=device)
    gen.manual_seed(a.seed)
    w = make_weights(a.experts, a.hidden, a.ffn, dtype, device, gen)

    for tokens in [int(t) for t in a.tokens.split(",") if t.strip()]:
        x = torch.randn(tokens, a.hidden, generator=gen, device=device)
        stats = [0, 0]
        with torch.no_grad():
            moe_layer(x, w, a.top_k, a.softmax, stats)  # also counts the skip fraction
            for _ in range(a.warmup):
                moe_layer(x, w, a.top_k, a.softmax)
            torch.cuda.synchronize()
            times = []
            for _ in range(a.iters):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                moe_layer(x, w, a.top_k, a.softmax)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        flops = 6.0 * tokens * a.top_k * a.ffn * a.hidden
        row = {
            "bench": "torch_moe",
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(),
            "tokens": tokens,
            "hidden": a.hidden,
            "experts": a.experts,
            "top_k": a.top_k,
            "ffn": a.ffn,
            "dtype": a.dtype,
            "router": "softmax" if a.softmax else "sigmoid",
            "ms": ms,
            "tokens_per_s": tokens / (ms / 1e3),
            "tflops": flops / ms / 1e9,
            "skip_frac": stats[0] / max(stats[1], 1),
            "data": "synthetic",
        }
        line = json.dumps(row)
        print(line, flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
