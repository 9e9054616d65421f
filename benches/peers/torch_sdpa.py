#!/usr/bin/env python3
"""Peer baseline: PyTorch `scaled_dot_product_attention` on the shapes of `examples/bench.rs`.

Causal prefill, batch 1, `--q-heads` query heads and `--kv-heads` key/value heads (GQA),
`--head-dim`, for each dtype (bf16, fp16) and each SDPA backend separately (cuDNN, flash,
efficient, and math only up to `--math-max-len` tokens because it materializes the N x N
scores), selected with `torch.nn.attention.sdpa_kernel`. Times with CUDA events: `--warmup`
untimed calls, then the median of `--iters` timed calls. A backend that raises (not
available for the shape/dtype, out of memory) is recorded as skipped with the reason.

GQA: `enable_gqa=True` when this PyTorch has it and the backend accepts it ("native");
otherwise K/V are expanded to the query heads with `repeat_interleave` *before* timing
("repeat_interleave"; the copy is not timed, the kernel then reads 4x more K/V).

FLOPs are counted as in the Rust crate (`AttentionShape::flops(true)`):
4 * q_heads * N (N + 1) / 2 * head_dim.

Example (on the GPU machine):
    python3 benches/peers/torch_sdpa.py --seq-lens 4096,8192,16384,32768,65536,131072 \
        --json "$OUT/torch_sdpa.jsonl"
"""

import argparse
import inspect
import json
import statistics
import sys
import time
import warnings

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - only on machines without torch
    print(f"torch_sdpa.py needs PyTorch: {e}", file=sys.stderr)
    sys.exit(2)

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError as e:  # pragma: no cover - torch < 2.3
    print(f"torch.nn.attention.sdpa_kernel is missing (torch {torch.__version__}): {e}", file=sys.stderr)
    sys.exit(2)

BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "f16": torch.float16}


def parse_len(s):
    s = s.strip().lower()
    n = int(s[:-1]) * 1024 if s.endswith("k") else int(s)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{s} is not a positive length")
    return n


def parse_list(conv):
    def f(s):
        try:
            return [conv(x) for x in s.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))

    return f


def has_enable_gqa():
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):
        # Builtins may have no introspectable signature; the call itself will tell.
        return True


def causal_flops(q_heads, n, d):
    return 4.0 * q_heads * (n * (n + 1) / 2.0) * d


class Refused(Exception):
    """A backend's failure with SDPA's warnings (its reasons) appended."""


def first_line(e):
    if isinstance(e, Refused):
        return str(e)
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def time_sdpa(call, warmup, iters, budget_s):
    """Median and min ms of `call()` timed with CUDA events. Stops early (at least one
    timed call) once the timed calls have taken `budget_s` seconds."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    t0 = time.perf_counter()
    for _ in range(max(1, iters)):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() - t0 > budget_s:
            break
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=parse_list(parse_len), default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtypes", type=parse_list(str), default=["bf16", "fp16"], help="bf16,fp16")
    p.add_argument(
        "--backends", type=parse_list(str), default=["cudnn", "flash", "efficient", "math"], help="cudnn,flash,efficient,math"
    )
    p.add_argument("--math-max-len", type=parse_len, default=8192, help="longest length the math backend runs")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=20.0, help="skip longer lengths of a backend after a call this slow")
    p.add_argument("--length-budget-s", type=float, default=30.0, help="max seconds of timed calls per case")
    p.add_argument("--no-gqa", action="store_true", help="always repeat_interleave K/V instead of enable_gqa")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", help="write one JSON object per line (per case) to this file")
    args = p.parse_args()

    if args.q_heads % args.kv_heads != 0:
        p.error(f"--q-heads {args.q_heads} is not a multiple of --kv-heads {args.kv_heads}")
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b} (known: {', '.join(BACKENDS)})")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d} (known: bf16, fp16)")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time", file=sys.stderr)
        sys.exit(2)

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    cudnn_v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    gqa_native = has_enable_gqa() and not args.no_gqa
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn_v,
        "device": props.name,
    }
    print(
        f"torch {env['torch']} | CUDA {env['cuda']} | cuDNN {cudnn_v} | {props.name} | "
        f"GQA: {'enable_gqa=True where accepted' if gqa_native else 'repeat_interleave (enable_gqa unavailable/disabled)'}",
        flush=True,
    )

    group = args.q_heads // args.kv_heads
    out_file = open(args.json, "w") if args.json else None
    rows = []
    # Per (backend, dtype): once a call exceeded the budget, longer lengths are skipped.
    stopped = {}
    try:
        for n in args.seq_lens:
            flops = causal_flops(args.q_heads, n, args.head_dim)
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                g = torch.Generator(device=dev)
                g.manual_seed(args.seed + n)
                shape_q = (1, args.q_heads, n, args.head_dim)
                shape_kv = (1, args.kv_heads, n, args.head_dim)
                q = torch.randn(shape_q, device=dev, dtype=dtype, generator=g)
                k = torch.randn(shape_kv, device=dev, dtype=dtype, generator=g)
                v = torch.randn(shape_kv, device=dev, dtype=dtype, generator=g)
                k_rep = v_rep = None  # expanded lazily, only when a backend needs them
                ref = None  # first successful output at this (n, dtype), for a cross-check
                for bname in args.backends:
                    row = {
                        "bench": "torch_sdpa",
                        "backend": bname,
                        "dtype": dname,
                        "tokens": n,
                        "q_heads": args.q_heads,
                        "kv_heads": args.kv_heads,
                        "head_dim": args.head_dim,
                        "causal": True,
                        "flops": flops,
                        "status": "skipped",
                        **env,
                    }
                    key = (bname, dname)
                    if bname == "math" and n > args.math_max_len:
                        row["note"] = f"math backend only up to --math-max-len {args.math_max_len}"
                    elif key in stopped:
                        row["note"] = stopped[key]
                    else:
                        backend = getattr(SDPBackend, BACKENDS[bname])
                        attempts = []
                        if gqa_native:
                            attempts.append("native")
                        attempts.append("repeat_interleave")
                        errors = []
                        for mode in attempts:
                            try:
                                if mode == "native":

                                    def call(q=q, k=k, v=v):
                                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

                                else:
                                    if k_rep is None:
                                        if group > 1:
                                            k_rep = k.repeat_interleave(group, dim=1).contiguous()
                                            v_rep = v.repeat_interleave(group, dim=1).contiguous()
                                        else:
                                            k_rep, v_rep = k, v

                                    def call(q=q, k=k_rep, v=v_rep):
                                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                                with warnings.catch_warnings(record=True) as caught:
                                    warnings.simplefilter("always")
                                    try:
                                        with sdpa_kernel(backend):
                                            o = call()  # the first warmup call; raises if unavailable
                                            torch.cuda.synchronize()
                                            times = time_sdpa(
                                                call, max(0, args.warmup - 1), args.iters, args.length_budget_s
                                            )
                                    except Exception as e:
                                        # SDPA explains why a backend was refused in warnings.
                                        why = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
                                        if why:
                                            raise Refused(f"{first_line(e)} [{'; '.join(why)[:400]}]") from e
                                        raise
                                if not bool(torch.isfinite(o).all()):
                                    raise RuntimeError("output has non-finite values")
                                if ref is None:
                                    ref = (bname, o)
                                else:
                                    row["max_abs_diff_vs"] = ref[0]
                                    row["max_abs_diff"] = float((o.float() - ref[1].float()).abs().max())
                                del o
                                med = statistics.median(times)
                                row.update(
                                    status="ok",
                                    gqa=mode,
                                    median_ms=med,
                                    min_ms=min(times),
                                    max_ms=max(times),
                                    iters=len(times),
                                    samples_ms=times,
                                    tflops=flops / med / 1e9,
                                )
                                row.pop("note", None)
                                if errors:  # why enable_gqa was not taken
                                    row["gqa_native_error"] = " | ".join(errors)
                                if max(times) / 1e3 > args.budget_s:
                                    stopped[key] = f"a call at {n} tokens took {max(times) / 1e3:.1f} s > --budget-s {args.budget_s}"
                                break
                            except Exception as e:  # noqa: BLE001 - any failure skips the backend
                                errors.append(f"{mode}: {first_line(e)}")
                                if isinstance(e, torch.cuda.OutOfMemoryError):
                                    torch.cuda.empty_cache()
                        if row["status"] != "ok":
                            row["note"] = " | ".join(errors)
                    line = f"{n:>7} {dname:>4} {bname:>9}: "
                    if row["status"] == "ok":
                        extra = ""
                        if row.get("max_abs_diff") is not None:
                            extra = f", max|diff| vs {row['max_abs_diff_vs']} {row['max_abs_diff']:.2e}"
                        line += f"{row['median_ms']:.3f} ms, {row['tflops']:.1f} TFLOP/s (gqa {row['gqa']}{extra})"
                    else:
                        line += f"skipped ({row.get('note', '')})"
                    print(line, flush=True)
                    rows.append(row)
                    if out_file:
                        out_file.write(json.dumps(row) + "\n")
                        out_file.flush()
                del q, k, v, k_rep, v_rep, ref
                torch.cuda.empty_cache()
    finally:
        if out_file:
            out_file.close()

    # Markdown table: one row per (tokens, dtype), one column per backend.
    print()
    print(
        f"PyTorch {env['torch']} SDPA on {props.name}: causal, batch 1, {args.q_heads} q heads / "
        f"{args.kv_heads} kv heads, d {args.head_dim}; median ms (TFLOP/s)"
    )
    print()
    print("| tokens | dtype | " + " | ".join(args.backends) + " |")
    print("|---:|---|" + "---:|" * len(args.backends))
    by = {(r["tokens"], r["dtype"], r["backend"]): r for r in rows}
    for n in args.seq_lens:
        for dname in args.dtypes:
            cells = []
            for bname in args.backends:
                r = by.get((n, dname, bname))
                if r is None or r["status"] != "ok":
                    cells.append("—")
                else:
                    mark = "" if r["gqa"] == "native" else "*"
                    cells.append(f"{r['median_ms']:.3f} ({r['tflops']:.0f}){mark}")
            print(f"| {n} | {dname} | " + " | ".join(cells) + " |")
    if any(r.get("gqa") == "repeat_interleave" and group > 1 for r in rows):
        print()
        print("* K/V expanded with repeat_interleave before timing (backend did not take enable_gqa).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
