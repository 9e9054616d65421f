// SALE's low-bit Q and K (docs/algorithms.md §3), in three kernels:
//
// sale_mean_partial  one workgroup per (row chunk, head), heads = q_heads then kv_heads:
//                    the chunk's column sums of Q or K.
//
// Q and K may each be over one storage binding (256k tokens x 32 heads x d 128 in f16 is
// 2 GiB): the mean and quantization kernels run once per run of whole heads, X bound to
// that part only. A dispatch covers heads head_first + wg.id.y (in the numbering q heads
// then kv heads); X starts at head x_head0, x_base vec4s into its binding.
// sale_mean_final    one workgroup per head: the sequence mean (sum of the partials / n).
// sale_quant         one workgroup per (64-row block, head) of Q (or of K with QUANT_K):
//                    subtracts the head's sequence mean, quantizes each row symmetrically
//                    with ONE scale per row (amax / LEVELS, LEVELS = 7 for int4, 127 for
//                    int8; round half to even), packs the codes (int4: 8 per u32, channel c
//                    in nibble c % 8; int8: 4 per u32, channel c in byte c % 4, the layout
//                    dot4I8Packed reads) and writes the mean-correction terms:
//                      Q row i of head h:  row_meta = (scale, q_i · k_mean[kv(h)])
//                      K row j, each q head h of its group: row_meta = (scale, q_mean[h] · k'_j)
//                    so that  q_i·k_j = q'_i·k'_j + q_mean·k'_j + q_i·k_mean  exactly and
//                    the estimate approximates q·k, the units of the exact pass's row max.
// Constants: D (head_dim), BITS (4 or 8).

#include "common/invocation.wgsl"
#include "common/storage.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

const D4: u32 = D / 4u;

@group(0) @binding(0) var<uniform> p: Params;
// Vec4 `c` of row `r` of head `head` of the bound part of X.
fn x_index(head: u32, r: u32, c: u32) -> u32 {
    return p.x_base + ((head - p.x_head0) * p.seq_len + r) * D4 + c;
}

#ifdef STAGE_MEAN_PARTIAL
@group(0) @binding(1) var<storage, read> x_buf: array<Store4>;
@group(0) @binding(2) var<storage, read_write> partial: array<vec4<f32>>;  // [heads, chunks, D4]

@compute @workgroup_size(64)
fn sale_mean_partial(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let chunk = wg.id.x;
    let head = p.head_first + wg.id.y;
    let r0 = chunk * p.chunk_rows;
    let r1 = min(r0 + p.chunk_rows, p.seq_len);
    // Thread c4 owns dimensions 4*c4..+4 (D4 <= 64 threads).
    if lid < D4 {
        var sum = vec4<f32>(0.0);
        for (var r = r0; r < r1; r++) {
            sum += decode4(x_buf[x_index(head, r, lid)]);
        }
        partial[(head * p.chunks + chunk) * D4 + lid] = sum;
    }
}
#endif

#ifdef STAGE_MEAN_FINAL
@group(0) @binding(1) var<storage, read> partial: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> means: array<vec4<f32>>;    // [heads, D4]

@compute @workgroup_size(64)
fn sale_mean_final(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let head = wg.id.x;
    if lid < D4 {
        var sum = vec4<f32>(0.0);
        for (var c = 0u; c < p.chunks; c++) {
            sum += partial[(head * p.chunks + c) * D4 + lid];
        }
        means[head * D4 + lid] = sum / f32(p.seq_len);
    }
}
#endif

#ifdef STAGE_QUANT
const LEVELS: f32 = f32((1u << (BITS - 1u)) - 1u);
const PER_WORD: u32 = 32u / BITS;          // codes per u32
const WORDS: u32 = D / PER_WORD;           // packed words per row
const MASK: u32 = (1u << BITS) - 1u;

@group(0) @binding(1) var<storage, read> x_buf: array<Store4>;
@group(0) @binding(2) var<storage, read> means: array<vec4<f32>>;          // [q_heads + kv_heads, D4]
@group(0) @binding(3) var<storage, read_write> packed: array<u32>;        // [heads, n, WORDS]
@group(0) @binding(4) var<storage, read_write> row_meta: array<vec2<f32>>;    // [q_heads, n]

fn code(x: f32, inv: f32) -> u32 {
    return u32(i32(clamp(round(x * inv), -LEVELS, LEVELS))) & MASK;
}

@compute @workgroup_size(64)
fn sale_quant(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    // (QUANT_K: kv heads, numbered from 0 here; x_head0 likewise.)
    let head = p.head_first + wg.id.y;
    let row = wg.id.x * 64u + lid;
    if row >= p.seq_len { return; }
#ifdef QUANT_K
    let own_mean = (p.q_heads + head) * D4;   // k_mean of this kv head
#else
    let kvh = head / p.group;
    let own_mean = head * D4;                 // q_mean of this q head
    let other_mean = (p.q_heads + kvh) * D4;  // k_mean of its kv head
#endif
    let base = x_index(head, row, 0u);
    // Pass 1: amax of the smoothed row (and q·k_mean, on the original row).
    var amax = 0.0;
#ifndef QUANT_K
    var qkm = 0.0;
#endif
    for (var c = 0u; c < D4; c++) {
        let x = decode4(x_buf[base + c]);
        let xs = x - means[own_mean + c];
        let a = abs(xs);
        amax = max(amax, max(max(a.x, a.y), max(a.z, a.w)));
#ifndef QUANT_K
        qkm += dot(x, means[other_mean + c]);
#endif
    }
    var scale = amax / LEVELS;
    var inv = 0.0;
    if amax > 0.0 {
        inv = LEVELS / amax;
    } else {
        scale = 0.0;
    }
    // Pass 2: codes, PER_WORD per u32 (int4: two vec4 per word; int8: one).
    for (var w = 0u; w < WORDS; w++) {
        var word = 0u;
        for (var part = 0u; part < PER_WORD / 4u; part++) {
            let c = w * (PER_WORD / 4u) + part;
            let xs = decode4(x_buf[base + c]) - means[own_mean + c];
            let sh = part * 4u * BITS;
            word |= code(xs.x, inv) << sh;
            word |= code(xs.y, inv) << (sh + BITS);
            word |= code(xs.z, inv) << (sh + 2u * BITS);
            word |= code(xs.w, inv) << (sh + 3u * BITS);
        }
        packed[(head * p.seq_len + row) * WORDS + w] = word;
    }
#ifdef QUANT_K
    // q_mean[h] · k'_j for every q head of this kv head.
    for (var g = 0u; g < p.group; g++) {
        let h = head * p.group + g;
        var qmk = 0.0;
        for (var c = 0u; c < D4; c++) {
            let xs = decode4(x_buf[base + c]) - means[own_mean + c];
            qmk += dot(means[h * D4 + c], xs);
        }
        row_meta[h * p.seq_len + row] = vec2<f32>(scale, qmk);
    }
#else
    row_meta[head * p.seq_len + row] = vec2<f32>(scale, qkm);
#endif
}
#endif
