// SALE's block selection (docs/algorithms.md §3), in two kernels:
//
// sale_estimate  one workgroup (64 threads) per (chunk of 32 candidate key blocks,
//                64-row query block, q-head). Candidates of query block qb are the
//                32-key blocks [1, 2·qb − LOCAL_BLOCKS): everything causal except the
//                sink block 0, the local window and the two diagonal blocks, which the
//                exact pass computed. For each candidate block it forms the integer dot
//                products of the quantized Q' and K' (dot4I8Packed where the WGSL
//                language feature exists, plain integer arithmetic otherwise), turns
//                them into score estimates  ŝ = sq·sk·Σ + q_mean·k'_j  and keeps the
//                block when any of its 64 × 32 entries passes the Relative Attention
//                Score test  ŝ > (m + ln(τ_h·l)) / scale − q·k_mean,  i.e.
//                exp(scale·(q·k − m)) / l > τ_h  with (m, l) the exact pass's row state.
//                Writes one bit per candidate block (32 per u32). No N × N matrix.
//                With WRITE_DOTS it writes the integer dot products instead (tests).
//                With SCORES (per-head budgets) it writes instead each candidate
//                block's largest margin  ŝ − threshold  at τ = 1 (the estimated
//                ln RAS / scale of the block's strongest entry) as an ordered u32.
// sale_compact   same grid: the kept key blocks of the chunk, ascending, at the
//                chunk's offset (set bits of the row's earlier chunks) in the row's slice
//                of the LUT; chunk 0 also writes the row's LUT range.
// sale_topk      (per-head budgets, after SCORES) one workgroup per (query block,
//                q-head): the row's keep[h, qb] candidates of the largest margins (ties
//                to the lower block; "common/topk.wgsl"), ascending into its LUT slice.
// Constants: D (head_dim), BITS (4 or 8), LOCAL_BLOCKS (local window / 32).
//
// COOP (entry sale_estimate_coop): the integer dot products on matrix units. The codes
// (|c| ≤ 127) widened to f16 are exact, their products (|p| ≤ 16129) too, and the f32
// sums of at most 256 of them stay below 2^24, so every dot product is the exact
// integer the plain path computes and the block decisions are bit-identical. Q's codes
// of a 32-dimension chunk are unpacked from the packed tile, K's from the key block in
// global memory, and the 64 × 32 dot tile accumulates in workgroup memory over the
// chunks (T × T tiles spread over the subgroups; TILE16: T = 16, else 8).

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "common/invocation.wgsl"

const BQ: u32 = 64u;
const BK: u32 = 32u;
const CHUNK_BLOCKS: u32 = 32u;
const PER_WORD: u32 = 32u / BITS;
const WORDS: u32 = D / PER_WORD;     // packed words per row
const HIGH_NIBBLES: u32 = 0xF0F0F0F0u;
const NEG_BIG: f32 = -3.0e38;
const POS_BIG: f32 = 3.0e38;

@group(0) @binding(0) var<uniform> p: Params;

// Exclusive end of the candidate key blocks of query block qb (candidates start at 1).
fn cand_end(qb: u32) -> u32 {
    let diag = qb * (BQ / BK);
    if diag > LOCAL_BLOCKS + 1u {
        return diag - LOCAL_BLOCKS;
    }
    return 1u;
}

#ifdef STAGE_ESTIMATE
@group(0) @binding(1) var<storage, read> qq: array<u32>;              // [q_heads, n, WORDS]
@group(0) @binding(2) var<storage, read> kq: array<u32>;              // [kv_heads, n, WORDS]
@group(0) @binding(3) var<storage, read> q_meta: array<vec2<f32>>;    // [q_heads, n] (sq, q·k_mean)
@group(0) @binding(4) var<storage, read> k_meta: array<vec2<f32>>;    // [q_heads, n] (sk, q_mean·k')
@group(0) @binding(5) var<storage, read> ml_buf: array<vec2<f32>>;    // [q_heads, n] exact pass (m, l)
@group(0) @binding(6) var<storage, read> tau: array<f32>;             // [q_heads]
#ifdef WRITE_DOTS
@group(0) @binding(7) var<storage, read_write> dots: array<i32>;      // [q_heads, n, n]
#else
#ifdef SCORES
@group(0) @binding(7) var<storage, read_write> scores: array<u32>;    // [q_heads, n_qb, chunks · 32]
var<workgroup> best: array<atomic<u32>, CHUNK_BLOCKS>;

// An f32's bits mapped so that unsigned order is the numbers' order.
fn ordered(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x80000000u) != 0u {
        return ~b;
    }
    return b | 0x80000000u;
}
#else
@group(0) @binding(7) var<storage, read_write> flags: array<u32>;     // [q_heads, n_qb, chunks]
#endif
#endif

var<workgroup> q_tile: array<u32, BQ * WORDS>;   // the query block's packed rows
#ifndef COOP
var<workgroup> k_tile: array<u32, BK * WORDS>;   // one key block's packed rows
#endif
var<workgroup> selected: atomic<u32>;

#ifdef COOP
#include "common/coop.wgsl"
const DCH: u32 = 32u;                              // dimensions per chunk
var<workgroup> q_h: array<f16, BQ * DCH>;          // Q codes of the chunk [BQ][DCH]
var<workgroup> k_h: array<f16, BK * DCH>;          // K codes of the chunk [BK][DCH]
var<workgroup> dot_s: array<f32, BQ * BK>;         // dot products [BQ][BK]

// The signed code of channel c from the packed word holding it, as f16 (exact).
fn code_of(word: u32, c: u32) -> f16 {
    let shift = (c % PER_WORD) * BITS;
    let v = bitcast<i32>(word << (32u - BITS - shift)) >> (32u - BITS);
    return f16(v);
}

#endif

#ifdef INT_DOT4
fn dot4(a: u32, b: u32) -> i32 {
    return dot4I8Packed(a, b);
}
#else
fn dot4(a: u32, b: u32) -> i32 {
    let x = bitcast<i32>(a);
    let y = bitcast<i32>(b);
    return extractBits(x, 0u, 8u) * extractBits(y, 0u, 8u)
        + extractBits(x, 8u, 8u) * extractBits(y, 8u, 8u)
        + extractBits(x, 16u, 8u) * extractBits(y, 16u, 8u)
        + extractBits(x, 24u, 8u) * extractBits(y, 24u, 8u);
}
#endif

@compute @workgroup_size(64)
#ifdef COOP
fn sale_estimate_coop(
    wg: Workgroup,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sid: u32,
    @builtin(num_subgroups) nsg: u32,
) {
#else
fn sale_estimate(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
#endif
    let chunk = wg.id.x;
    let qb = wg.id.y;
    let h = wg.id.z;
    let n = p.seq_len;
    let kb0 = 1u + chunk * CHUNK_BLOCKS;
    let kb_end = min(kb0 + CHUNK_BLOCKS, cand_end(qb));
#ifndef COOP
    if kb0 >= kb_end {
        return;  // workgroup-uniform: no candidates in this chunk
    }
#endif
    // (COOP: no early return, which naga would take as non-uniform flow around the
    // cooperative operations; the key-block loop below is then empty, and the chunk's
    // flag word is written as 0.)
    let kvh = h / p.group;
    for (var i = lid; i < BQ * WORDS; i += 64u) {
        let row = qb * BQ + i / WORDS;
        var w = 0u;
        if row < n {
            w = qq[(h * n + row) * WORDS + i % WORDS];
        }
        q_tile[i] = w;
    }
    if lid == 0u {
        atomicStore(&selected, 0u);
    }
#ifdef SCORES
    if lid < CHUNK_BLOCKS {
        atomicStore(&best[lid], 0u);  // below every margin: no candidate
    }
#endif
    // Thread (rg, kg) owns rows rg + 16·t (t < 4) and keys kg + 4·u (u < 8) of a block.
    let rg = lid / 4u;
    let kg = lid % 4u;
    var thr: array<f32, 4>;
    var sq: array<f32, 4>;
    let tau_h = tau[h];
    #unroll t 4
    {
        let row = qb * BQ + rg + 16u * ${t}u;
        thr[${t}] = POS_BIG;  // rows past the end never pass
        sq[${t}] = 0.0;
        if row < n {
            let qm = q_meta[h * n + row];
            let ml = ml_buf[h * n + row];
            sq[${t}] = qm.x;
            thr[${t}] = NEG_BIG;  // τ = 0: every block passes (dense)
            if tau_h > 0.0 {
                thr[${t}] = (ml.x + log(tau_h * ml.y)) / p.scale - qm.y;
            }
        }
    }
    #endunroll
    for (var kb = kb0; kb < kb_end; kb++) {
#ifdef COOP
        // dot_s = Q'·K'ᵀ of the query block and key block kb, exactly (inline: the
        // coop operations need the entry point's subgroup-uniform control flow).
        workgroupBarrier();
        for (var i = lid; i < BQ * BK; i += 64u) {
            dot_s[i] = 0.0;
        }
        // (D = 80 or 112: the last chunk's missing channels are zero codes.)
        for (var dc = 0u; dc < (D + DCH - 1u) / DCH; dc++) {
            workgroupBarrier();
            for (var i = lid; i < BQ * DCH; i += 64u) {
                let c = dc * DCH + i % DCH;
                var code = f16(0.0);
                if c < D {
                    code = code_of(q_tile[(i / DCH) * WORDS + c / PER_WORD], c);
                }
                q_h[i] = code;
            }
            for (var i = lid; i < BK * DCH; i += 64u) {
                let c = dc * DCH + i % DCH;
                var code = f16(0.0);
                if c < D {
                    code = code_of(kq[(kvh * n + kb * BK + i / DCH) * WORDS + c / PER_WORD], c);
                }
                k_h[i] = code;
            }
            workgroupBarrier();
            for (var t = sid; t < (BQ / T) * (BK / T); t += nsg) {
                let ot = tile_at(t, BK / T);
                let o = ot.x * BK + ot.y;
                var acc = coopLoadT<MatC>(&dot_s[o], BK);
                for (var ks = 0u; ks < DCH / T; ks++) {
                    let qa = ot.x * DCH + ks * T;
                    let kb_ = ot.y * DCH + ks * T;
                    let a = coopLoadT<MatA>(&q_h[qa], DCH);
                    let b = coopLoad<MatB>(&k_h[kb_], DCH);
                    acc = coopMultiplyAdd(a, b, acc);
                }
                coopStoreT(acc, &dot_s[o], BK);
            }
        }
        workgroupBarrier();
        // The exact integer products, in the plain path's units (int4: 256×).
        var acc: array<i32, 32>;
        for (var t = 0u; t < 4u; t++) {
            for (var u = 0u; u < 8u; u++) {
                let v = i32(dot_s[(rg + 16u * t) * BK + kg + 4u * u]);
#ifdef INT4
                acc[t * 8u + u] = v * 256;
#else
                acc[t * 8u + u] = v;
#endif
            }
        }
#else
        workgroupBarrier();  // the previous block's tile is no longer read
        for (var i = lid; i < BK * WORDS; i += 64u) {
            k_tile[i] = kq[(kvh * n + kb * BK) * WORDS + i];
        }
        workgroupBarrier();
#ifdef PORTABLE_LOOPS
        // Plain loops (the browser variant: SwiftShader's compiler in Chromium loses the
        // device on the unrolled body below).
        var acc: array<i32, 32>;
        for (var a = 0u; a < 32u; a++) {
            acc[a] = 0;
        }
        for (var w = 0u; w < WORDS; w++) {
            for (var t = 0u; t < 4u; t++) {
                let qw = q_tile[(rg + 16u * t) * WORDS + w];
                for (var u = 0u; u < 8u; u++) {
                    let kw = k_tile[(kg + 4u * u) * WORDS + w];
#ifdef INT4
                    acc[t * 8u + u] += dot4((qw << 4u) & HIGH_NIBBLES, (kw << 4u) & HIGH_NIBBLES)
                        + dot4(qw & HIGH_NIBBLES, kw & HIGH_NIBBLES);
#else
                    acc[t * 8u + u] += dot4(qw, kw);
#endif
                }
            }
        }
#else
        var acc: array<i32, 32>;
        #unroll a 32
        acc[${a}] = 0;
        #endunroll
        for (var w = 0u; w < WORDS; w++) {
            #unroll t 4
            let qw${t} = q_tile[(rg + 16u * ${t}u) * WORDS + w];
            #endunroll
#ifdef INT4
            #unroll t 4
            let qlo${t} = (qw${t} << 4u) & HIGH_NIBBLES;
            let qhi${t} = qw${t} & HIGH_NIBBLES;
            #endunroll
            #unroll u 8
            {
                // Nibbles 0, 2, 4, 6 (lo) and 1, 3, 5, 7 (hi) of the word, each times 16
                // in a signed byte: the products are exactly 256× the true ones.
                let kw = k_tile[(kg + 4u * ${u}u) * WORDS + w];
                let klo = (kw << 4u) & HIGH_NIBBLES;
                let khi = kw & HIGH_NIBBLES;
                #unroll t 4
                acc[${t} * 8 + ${u}] += dot4(qlo${t}, klo) + dot4(qhi${t}, khi);
                #endunroll
            }
            #endunroll
#else
            #unroll u 8
            {
                let kw = k_tile[(kg + 4u * ${u}u) * WORDS + w];
                #unroll t 4
                acc[${t} * 8 + ${u}] += dot4(qw${t}, kw);
                #endunroll
            }
            #endunroll
#endif
        }
#endif
#endif
#ifdef WRITE_DOTS
        #unroll t 4
        #unroll u 8
        {
            let row = qb * BQ + rg + 16u * ${t}u;
            if row < n {
#ifdef INT4
                let s = acc[${t} * 8 + ${u}] >> 8u;
#else
                let s = acc[${t} * 8 + ${u}];
#endif
                dots[(h * n + row) * n + kb * BK + kg + 4u * ${u}u] = s;
            }
        }
        #endunroll
        #endunroll
#else
#ifdef SCORES
        var top = NEG_BIG;
#else
        var hit = false;
#endif
#ifdef PORTABLE_LOOPS
        for (var u = 0u; u < 8u; u++) {
            let km = k_meta[h * n + kb * BK + kg + 4u * u];
            for (var t = 0u; t < 4u; t++) {
#ifdef INT4
                let s = acc[t * 8u + u] >> 8u;
#else
                let s = acc[t * 8u + u];
#endif
                let e = f32(s) * sq[t] * km.x + km.y;
#ifdef SCORES
                top = max(top, e - thr[t]);
#else
                hit = hit || e > thr[t];
#endif
            }
        }
#else
        #unroll u 8
        {
            let km = k_meta[h * n + kb * BK + kg + 4u * ${u}u];
            #unroll t 4
            {
#ifdef INT4
                let s = acc[${t} * 8 + ${u}] >> 8u;
#else
                let s = acc[${t} * 8 + ${u}];
#endif
                let e = f32(s) * sq[${t}] * km.x + km.y;
#ifdef SCORES
                top = max(top, e - thr[${t}]);
#else
                hit = hit || e > thr[${t}];
#endif
            }
            #endunroll
        }
        #endunroll
#endif
#ifdef SCORES
        atomicMax(&best[kb - kb0], ordered(top));
#else
        if hit {
            atomicOr(&selected, 1u << (kb - kb0));
        }
#endif
#endif
    }
#ifndef WRITE_DOTS
    workgroupBarrier();
#ifdef SCORES
    if lid < CHUNK_BLOCKS {
        scores[((h * p.n_qb + qb) * p.chunks + chunk) * CHUNK_BLOCKS + lid] = atomicLoad(&best[lid]);
    }
#else
    if lid == 0u {
        flags[(h * p.n_qb + qb) * p.chunks + chunk] = atomicLoad(&selected);
    }
#endif
#endif
}
#endif

#ifdef STAGE_COMPACT
@group(0) @binding(1) var<storage, read> flags: array<u32>;
@group(0) @binding(2) var<storage, read> row_base: array<u32>;        // [h, n_qb] slice starts
@group(0) @binding(3) var<storage, read_write> lut_ranges: array<vec2<u32>>; // [h, n_qb]
@group(0) @binding(4) var<storage, read_write> lut_idx: array<u32>;

const COMPACT_WG: u32 = 64u;
#include "common/compact.wgsl"

@compute @workgroup_size(64)
fn sale_compact(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let chunk = wg.id.x;
    let qb = wg.id.y;
    let h = wg.id.z;
    let row = h * p.n_qb + qb;
    let used = (cand_end(qb) - 1u + CHUNK_BLOCKS - 1u) / CHUNK_BLOCKS;
    // Kept blocks of the row's earlier chunks (chunk 0: of all its chunks, for the
    // range), summed by the whole workgroup.
    var upto = chunk;
    if chunk == 0u {
        upto = used;
    }
    var mine = 0u;
    for (var c = lid; c < upto; c += 64u) {
        mine += countOneBits(flags[row * p.chunks + c]);
    }
    let base = row_base[row];
    let offset = compact_offset(lid, mine, chunk, row, base);
    if chunk >= used || lid >= 32u { return; }
    let word = flags[row * p.chunks + chunk];
    if (word & (1u << lid)) != 0u {
        let rank = countOneBits(word & ((1u << lid) - 1u));
        lut_idx[base + offset + rank] = 1u + chunk * CHUNK_BLOCKS + lid;
    }
}
#endif

#ifdef STAGE_TOPK
@group(0) @binding(1) var<storage, read> scores: array<u32>;          // [q_heads, n_qb, chunks · 32]
@group(0) @binding(2) var<storage, read> keep_of: array<u32>;         // [q_heads, n_qb]
@group(0) @binding(3) var<storage, read> row_base: array<u32>;        // [h, n_qb] slice starts
@group(0) @binding(4) var<storage, read_write> lut_ranges: array<vec2<u32>>; // [h, n_qb]
@group(0) @binding(5) var<storage, read_write> lut_idx: array<u32>;

const WG: u32 = 64u;
#include "common/scan.wgsl"

// Candidate i of the row is key block 1 + i; its key, the ordered margin.
var<private> row_at: u32;
fn topk_key(i: u32) -> u32 {
    return scores[row_at + i];
}
fn topk_entry(i: u32) -> u32 {
    return 1u + i;
}
#include "common/topk.wgsl"

@compute @workgroup_size(64)
fn sale_topk(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let qb = wg.id.x;
    let h = wg.id.y;
    let row = h * p.n_qb + qb;
    let count = cand_end(qb) - 1u;
    row_at = row * p.chunks * CHUNK_BLOCKS;
    topk_select(lid, count, min(keep_of[row], count), row);
}
#endif
