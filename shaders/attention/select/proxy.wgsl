// ProxyAttn's block selection (its steps are in src/attention/select/proxy.rs), in four
// kernels:
//
// proxy_pool          flat 1D grid, one thread per output vec4: the proxy heads, the
//                     mean of each group's query heads at the kept rows (every STRIDE-th
//                     row of a block: qbar [groups, blocks, kept, D4], rows past the end
//                     zero) and the mean of its key heads at every key (kbar [groups, n,
//                     D4]). Heads are summed in order, then divided by their count.
// proxy_block_scores  one workgroup per (query block m, group): for ROWS kept rows at a
//                     time, a first sweep over the causal keys gives each row's softmax
//                     max and sum (each thread an online pair over the key blocks it
//                     owns, then combined), a second sweep the largest probability of
//                     each key block over those rows: scores[g, m, n] (the same thread
//                     owns block n for every row chunk, so it keeps the max itself).
// proxy_head_weights  (HEAD_WEIGHTS) one workgroup per (ROWS rows of the last query
//                     block, q head): the same two sweeps on the head's own Q and K; the
//                     second sums each key block's probabilities over the rows, divided
//                     by the block's key count: part[h, chunk, n].
// proxy_budget        one workgroup per q head: a[n] = the chunks' sum; the smallest k
//                     whose k largest weights hold GAMMA of the total (bisection on the
//                     float bits for the k-th value, then the ties it needs): budget[h].
// proxy_select        one workgroup per (query block m, q head): K = min(m + 1,
//                     max(ceil(budget·(m + 1) / blocks), min_blocks)); the K-th largest
//                     score of the group's row (bisection on the bits; scores are >= 0),
//                     the blocks above it and the lowest-indexed equal ones, written
//                     ascending to the head's LUT row without block 0 and the diagonal
//                     (the exact pass has those).
//
// Constants: D (head_dim).

#include "common/invocation.wgsl"
#include "common/storage.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

const D4: u32 = D / 4u;
const ROWS: u32 = 8u;      // query rows per sweep
const WG: u32 = 64u;       // threads per workgroup
const NEG_BIG: f32 = -1.0e30;

@group(0) @binding(0) var<uniform> p: Params;

#ifdef STAGE_POOL
@group(0) @binding(1) var<storage, read> q_buf: array<Store4>;
@group(0) @binding(2) var<storage, read> k_buf: array<Store4>;
@group(0) @binding(3) var<storage, read_write> qbar: array<vec4<f32>>;   // [groups, blocks, kept, D4]
@group(0) @binding(4) var<storage, read_write> kbar: array<vec4<f32>>;   // [groups, n, D4]

@compute @workgroup_size(64)
fn proxy_pool(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    // Q may be over one binding: the pool runs once per run of whole heads
    // [x_head0, x_head1), Q bound to that part (head x_head0 at vec4 x_base); each run
    // adds its heads' share of the group means (the first one writes them, and the
    // pooled keys).
    let i = flat_id(wg) * WG + lid;
    let kv_per_group = p.kv_heads / p.groups;
    let q_per_kv = p.q_heads / p.kv_heads;
    let q_elems = p.groups * p.blocks * p.kept * D4;
    if i < q_elems {
        let c = i % D4;
        let slot = i / D4;                       // (g, m, kept row)
        let kr = slot % p.kept;
        let m = (slot / p.kept) % p.blocks;
        let g = slot / (p.kept * p.blocks);
        let r = m * p.block + kr * p.stride;
        var sum = vec4<f32>(0.0);
        let count = kv_per_group * q_per_kv;
        if r < p.seq_len && kr * p.stride < p.block {
            let h0 = max(g * count, p.x_head0);
            let h1 = min(g * count + count, p.x_head1);
            for (var h = h0; h < h1; h++) {
                sum += decode4(q_buf[p.x_base + ((h - p.x_head0) * p.seq_len + r) * D4 + c]);
            }
            sum /= f32(count);
        }
        if p.first_run != 0u {
            qbar[i] = sum;
        } else {
            qbar[i] += sum;
        }
        return;
    }
    let j = i - q_elems;
    if p.first_run != 0u && j < p.groups * p.seq_len * D4 {
        let c = j % D4;
        let r = (j / D4) % p.seq_len;
        let g = j / (D4 * p.seq_len);
        let h0 = g * kv_per_group;
        var sum = vec4<f32>(0.0);
        for (var h = h0; h < h0 + kv_per_group; h++) {
            sum += decode4(k_buf[(h * p.seq_len + r) * D4 + c]);
        }
        kbar[j] = sum / f32(kv_per_group);
    }
}
#endif

#ifdef STAGE_SCORES
#ifdef HEAD_WEIGHTS
@group(0) @binding(1) var<storage, read> q_buf: array<Store4>;
@group(0) @binding(2) var<storage, read> k_buf: array<Store4>;
@group(0) @binding(3) var<storage, read_write> part: array<f32>;         // [q_heads, chunks, blocks]

fn key4(at: u32) -> vec4<f32> {
    return decode4(k_buf[at]);
}
#else
@group(0) @binding(1) var<storage, read> qbar: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> kbar: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;       // [groups, blocks, blocks]

fn key4(at: u32) -> vec4<f32> {
    return kbar[at];
}
#endif

var<workgroup> qs: array<vec4<f32>, ROWS * D4>;
var<workgroup> red_m: array<f32, ROWS * WG>;
var<workgroup> red_l: array<f32, ROWS * WG>;
var<workgroup> row_ml: array<vec2<f32>, ROWS>;

// Scaled scores of the ROWS rows in `qs` against key row `key` (its first vec4 at
// `base + key * D4`).
fn scores_of(base: u32, key: u32) -> array<f32, ROWS> {
    var s: array<f32, ROWS>;
    for (var c = 0u; c < D4; c++) {
        let kv = key4(base + key * D4 + c);
        for (var i = 0u; i < ROWS; i++) {
            s[i] += dot(qs[i * D4 + c], kv);
        }
    }
    for (var i = 0u; i < ROWS; i++) {
        s[i] *= p.scale;
    }
    return s;
}

// First sweep: the softmax max and sum of each row over keys j < limit[i] (rows with
// limit 0 are absent), through the key blocks this thread owns, combined over the
// workgroup (through row_ml) and returned to every thread. Call from uniform control
// flow.
fn row_stats(lid: u32, base: u32, limit: array<u32, ROWS>, last_block: u32) -> array<vec2<f32>, ROWS> {
    var mx: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var top = 0u;
    for (var i = 0u; i < ROWS; i++) {
        mx[i] = NEG_BIG;
        top = max(top, limit[i]);
    }
    for (var n = lid; n <= last_block; n += WG) {
        let k1 = min((n + 1u) * p.block, top);
        for (var j = n * p.block; j < k1; j++) {
            let s = scores_of(base, j);
            for (var i = 0u; i < ROWS; i++) {
                if j < limit[i] {
                    if s[i] > mx[i] {
                        l[i] = l[i] * exp(mx[i] - s[i]) + 1.0;
                        mx[i] = s[i];
                    } else {
                        l[i] += exp(s[i] - mx[i]);
                    }
                }
            }
        }
    }
    for (var i = 0u; i < ROWS; i++) {
        red_m[i * WG + lid] = mx[i];
        red_l[i * WG + lid] = l[i];
    }
    workgroupBarrier();
    if lid < ROWS {
        var m = NEG_BIG;
        for (var t = 0u; t < WG; t++) {
            m = max(m, red_m[lid * WG + t]);
        }
        var sum = 0.0;
        for (var t = 0u; t < WG; t++) {
            let lt = red_l[lid * WG + t];
            if lt > 0.0 {
                sum += lt * exp(red_m[lid * WG + t] - m);
            }
        }
        row_ml[lid] = vec2<f32>(m, sum);
    }
    workgroupBarrier();
    var ml: array<vec2<f32>, ROWS>;
    for (var i = 0u; i < ROWS; i++) {
        ml[i] = row_ml[i];
    }
    return ml;
}

#ifdef HEAD_WEIGHTS
@compute @workgroup_size(64)
fn proxy_head_weights(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let chunk = wg.id.x;
    // (Once per run of whole heads of Q, as the pool.)
    let h = p.x_head0 + wg.id.y;
    let kvh = h / (p.q_heads / p.kv_heads);
    let last = p.blocks - 1u;
    let r0 = last * p.block + chunk * ROWS;
    var limit: array<u32, ROWS>;
    for (var i = 0u; i < ROWS; i++) {
        let r = r0 + i;
        limit[i] = select(0u, r + 1u, r < p.seq_len);
    }
    for (var x = lid; x < ROWS * D4; x += WG) {
        let r = r0 + x / D4;
        var v = vec4<f32>(0.0);
        if r < p.seq_len {
            v = decode4(q_buf[p.x_base + (wg.id.y * p.seq_len + r) * D4 + x % D4]);
        }
        qs[x] = v;
    }
    workgroupBarrier();
    let base = kvh * p.seq_len * D4;
    let ml = row_stats(lid, base, limit, last);
    for (var n = lid; n <= last; n += WG) {
        let k0 = n * p.block;
        let k1 = min(k0 + p.block, p.seq_len);
        var sums: array<f32, ROWS>;
        for (var j = k0; j < k1; j++) {
            let s = scores_of(base, j);
            for (var i = 0u; i < ROWS; i++) {
                if j < limit[i] {
                    sums[i] += exp(s[i] - ml[i].x);
                }
            }
        }
        var w = 0.0;
        for (var i = 0u; i < ROWS; i++) {
            if limit[i] > 0u {
                w += sums[i] / ml[i].y;
            }
        }
        part[(h * p.chunks + chunk) * p.blocks + n] = w / f32(k1 - k0);
    }
}
#else
@compute @workgroup_size(64)
fn proxy_block_scores(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let m = wg.id.x;
    let g = wg.id.y;
    let rows = min(p.block, p.seq_len - m * p.block);
    let kept = (rows + p.stride - 1u) / p.stride;
    let base = g * p.seq_len * D4;
    for (var c0 = 0u; c0 < kept; c0 += ROWS) {
        workgroupBarrier();  // the previous chunk's sweeps are done with qs
        var limit: array<u32, ROWS>;
        for (var i = 0u; i < ROWS; i++) {
            let r = m * p.block + (c0 + i) * p.stride;
            limit[i] = select(0u, r + 1u, c0 + i < kept);
        }
        for (var x = lid; x < ROWS * D4; x += WG) {
            var v = vec4<f32>(0.0);
            if c0 + x / D4 < kept {
                v = qbar[((g * p.blocks + m) * p.kept + c0) * D4 + x];
            }
            qs[x] = v;
        }
        workgroupBarrier();
        let ml = row_stats(lid, base, limit, m);
        for (var n = lid; n <= m; n += WG) {
            let k0 = n * p.block;
            let k1 = min(k0 + p.block, p.seq_len);
            var best: array<f32, ROWS>;
            for (var i = 0u; i < ROWS; i++) {
                best[i] = NEG_BIG;
            }
            for (var j = k0; j < k1; j++) {
                let s = scores_of(base, j);
                for (var i = 0u; i < ROWS; i++) {
                    if j < limit[i] {
                        best[i] = max(best[i], s[i]);
                    }
                }
            }
            var a = 0.0;
            for (var i = 0u; i < ROWS; i++) {
                if best[i] > 0.5 * NEG_BIG {
                    a = max(a, exp(best[i] - ml[i].x) / ml[i].y);
                }
            }
            let at = (g * p.blocks + m) * p.blocks + n;
            if c0 > 0u {
                a = max(a, scores[at]);
            }
            scores[at] = a;
        }
    }
}
#endif
#endif

#ifdef REDUCE  // proxy_budget and proxy_select
var<workgroup> red_f: array<f32, WG>;

// The workgroup's sum of `v` (every thread gets it; call from uniform control flow).
fn sum_f32(lid: u32, v: f32) -> f32 {
    red_f[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if lid < s {
            red_f[lid] += red_f[lid + s];
        }
        workgroupBarrier();
    }
    let total = red_f[0];
    workgroupBarrier();
    return total;
}

#include "common/scan.wgsl"
#endif

#ifdef STAGE_BUDGET
@group(0) @binding(1) var<storage, read> part: array<f32>;               // [q_heads, chunks, blocks]
@group(0) @binding(2) var<storage, read_write> weights: array<f32>;      // [q_heads, blocks]
@group(0) @binding(3) var<storage, read_write> budget: array<u32>;       // [q_heads]

@compute @workgroup_size(64)
fn proxy_budget(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let h = wg.id.x;
    let nb = p.blocks;
    // Each thread owns blocks lid, lid + WG, … (the same ones in every pass below).
    var own = 0.0;
    for (var n = lid; n < nb; n += WG) {
        var a = 0.0;
        for (var c = 0u; c < p.chunks; c++) {
            a += part[(h * p.chunks + c) * nb + n];
        }
        weights[h * nb + n] = a;
        own += a;
    }
    let goal = p.gamma * sum_f32(lid, own);
    // The largest value t whose weights >= t hold the goal: the k-th largest weight.
    var t = 0u;
    for (var b = 0u; b < 32u; b++) {
        let cand = t | (1u << (31u - b));
        var mine = 0.0;
        for (var n = lid; n < nb; n += WG) {
            let a = weights[h * nb + n];
            if bitcast<u32>(a) >= cand {
                mine += a;
            }
        }
        if sum_f32(lid, mine) >= goal {
            t = cand;
        }
    }
    let tv = bitcast<f32>(t);
    var gt_sum = 0.0;
    var gt = 0u;
    var eq = 0u;
    for (var n = lid; n < nb; n += WG) {
        let a = weights[h * nb + n];
        if a > tv {
            gt_sum += a;
            gt += 1u;
        } else if a == tv {
            eq += 1u;
        }
    }
    let above = sum_f32(lid, gt_sum);
    let counts = vec2<u32>(scan_u32(lid, gt).y, scan_u32(lid, eq).y);
    if lid == 0u {
        // Blocks above t, then as many weights equal to t as the goal still needs.
        var need = 1u;
        if tv > 0.0 {
            need = u32(max(ceil((goal - above) / tv), 1.0));
        }
        budget[h] = clamp(counts.x + min(need, max(counts.y, 1u)), 1u, nb);
    }
}
#endif

#ifdef STAGE_SELECT
@group(0) @binding(1) var<storage, read> scores: array<f32>;             // [groups, blocks, blocks]
@group(0) @binding(2) var<storage, read> budget: array<u32>;             // [q_heads]
@group(0) @binding(3) var<storage, read> row_base: array<u32>;           // [q_heads, blocks]
@group(0) @binding(4) var<storage, read_write> lut_ranges: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read_write> lut_idx: array<u32>;

// The row's scores (each >= 0: its bits order as the numbers), and its query block:
// block 0 and the diagonal are the exact pass's.
var<private> row_at: u32;
var<private> row_m: u32;
fn topk_key(n: u32) -> u32 {
    return bitcast<u32>(scores[row_at + n]);
}
fn topk_entry(n: u32) -> u32 {
    return select(n, TOPK_SKIP, n == 0u || n == row_m);
}
#include "common/topk.wgsl"

@compute @workgroup_size(64)
fn proxy_select(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let m = wg.id.x;
    let h = wg.id.y;
    let nb = p.blocks;
    let kv_per_group = p.kv_heads / p.groups;
    let g = (h / (p.q_heads / p.kv_heads)) / kv_per_group;
    let causal = m + 1u;
    let by_budget = (budget[h] * causal + nb - 1u) / nb;
    let keep = min(causal, max(by_budget, p.min_blocks));
    row_at = (g * nb + m) * nb;
    row_m = m;
    topk_select(lid, causal, keep, h * nb + m);
}
#endif
