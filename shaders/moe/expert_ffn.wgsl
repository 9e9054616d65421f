// Grouped ReGLU expert FFN over the expert-contiguous assignment order of the dispatch:
//   act[pos, n] = (up_e[n] · z) * ReLU(gate_e[n] · z)       (UP kernels)
//   y[pos, :]   = Σ_n act[pos, n] * down_t_e[n, :]           (DOWN kernels)
// where pos runs over the positions of expert e's segment, z is the token's row of the
// (normalized) input, gate/up are [experts * ffn, hidden] and down_t is W_down stored
// transposed, also [experts * ffn, hidden], so that one neuron's down weights are one
// contiguous row. One dispatch covers every expert: no per-expert host loop.
//
// Neuron skipping: where gate · z <= 0 the neuron's activation is 0 and is counted in
// stats[0] (stats[1] counts every evaluated (position, neuron) pair). The GEMV variants
// (decode, a few tokens) then skip the up row and the down row of that neuron: their
// weights are never read. The tiled up kernel (prefill) computes gate and up in one
// pass over whole tiles; the tiled down kernel with SKIP_CHUNKS skips each 16-neuron
// chunk whose activations are 0 for every position of its tile: that chunk's down
// weights are not read and its multiply-adds not done (stats[2] counts skipped
// (tile, column block, chunk) triples, stats[3] all of them).
//
// Streamed weights: `slot_of[e]` is the slot of expert e's rows in the weight buffers
// (the identity when every expert is resident). Experts marked NOT_RESIDENT are not
// computed by this dispatch: a streaming plan runs the experts in rounds, each round
// with the slots it uploaded.
//
// Variants: TILED (grouped GEMM: a workgroup computes a TM-position x 64-column tile of
// one expert, TM = 16 MI = 16, 32 or 64 chosen by the plan from the tokens per expert;
// x = the tile index over all experts, found in the tile starts of `seg`; tiles past
// the last one exit) or GEMV (a workgroup per position and neuron/column
// block). Weights: WEIGHTS_F16 or WEIGHTS_Q4_0 (common/weights.wgsl). Activations and
// accumulation are f32. Requires hidden % 32 == 0 and ffn % 16 == 0.

#include "common/invocation.wgsl"
#include "quant/weights.wgsl"
#include "moe/expert_common.wgsl"

#ifdef TILED
const S: u32 = 5u;  // padded row stride (vec4) of the [64][16] tiles: no bank conflicts
#endif

// ---------------------------------------------------------------------------------------
#ifdef UP
#ifdef TILED
var<workgroup> zs: array<vec4<f32>, ZS_LEN>;
var<workgroup> gs: array<vec4<f32>, 320>;
var<workgroup> us: array<vec4<f32>, 320>;

// Thread (tx, ty) = (lid % 16, lid / 16) owns positions ty + 16 i (i < MI) and
// neurons tx + 16 j (j < 4) of the tile.
@compute @workgroup_size(256)
fn expert_up(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let t = expert_tile(wg.id.x);
    if (!t.valid) { return; }
    let n0 = wg.id.y * TN;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let lr = lid / 4u;
    let lc = lid % 4u;
    let h4 = p.hidden / 4u;
    let zrow = t.row0 + lr;
    let zload = lid < TM * 4u;
    let zvalid = zload && zrow < t.row_end;
    var ztok = 0u;
    if (zvalid) {
        ztok = sorted[zrow] / p.top_k;
    }
    let wn = n0 + lr;
    let wvalid = wn < p.ffn;
    let wrow = t.slot * p.ffn + wn;
    if (lid == 0u) {
        atomicStore(&skipped_wg, 0u);
    }
#unroll i MI
    var ag${i} = vec4<f32>(0.0);
    var au${i} = vec4<f32>(0.0);
    var a${i} = vec4<f32>(0.0);
#endunroll
    for (var k0 = 0u; k0 < p.hidden; k0 += TK) {
        var zv = vec4<f32>(0.0);
        if (zvalid) {
            zv = z[ztok * h4 + k0 / 4u + lc];
        }
        if (zload) {
            zs[lr * S + lc] = zv;
        }
        var gv = vec4<f32>(0.0);
        var uv = vec4<f32>(0.0);
        if (wvalid) {
            let lg = wloc(wrow, k0 + lc * 4u, p.hidden, p.gate_sb);
            gv = wdecode(gate[lg.w0], gate[lg.w1], lg);
            let lu = wloc(wrow, k0 + lc * 4u, p.hidden, p.up_sb);
            uv = wdecode(up[lu.w0], up[lu.w1], lu);
        }
        gs[lr * S + lc] = gv;
        us[lr * S + lc] = uv;
        workgroupBarrier();
#unroll k 4
#unroll i MI
        a${i} = zs[(ty + ${i}u * 16u) * S + ${k}u];
#endunroll
#unroll j 4
        {
            let g = gs[(tx + ${j}u * 16u) * S + ${k}u];
            let u = us[(tx + ${j}u * 16u) * S + ${k}u];
#unroll i MI
            ag${i}[${j}] += dot(a${i}, g);
            au${i}[${j}] += dot(a${i}, u);
#endunroll
        }
#endunroll
#endunroll
        workgroupBarrier();
    }
    var skipped = 0u;
#unroll i MI
    {
        let pos = t.row0 + ty + ${i}u * 16u;
#unroll j 4
        {
            let n = n0 + tx + ${j}u * 16u;
            if (pos < t.row_end && n < p.ffn) {
                let g = ag${i}[${j}];
                var v = 0.0;
                if (g > 0.0) {
                    v = au${i}[${j}] * g;
                } else {
                    skipped += 1u;
                }
                act[pos * p.ffn + n] = v;
            }
        }
#endunroll
    }
#endunroll
    count_up_tile(lid, t, n0, skipped, 0u);
}
#endif

#ifdef GEMV
var<workgroup> red: array<f32, 256>;

// 8 neurons per workgroup, 32 lanes per neuron; one position (wid.y).
fn reduce32(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    let lane = lid % 32u;
#unroll s 5
    if (lane < (16u >> ${s}u)) {
        red[lid] += red[lid + (16u >> ${s}u)];
    }
    workgroupBarrier();
#endunroll
    let r = red[lid - lane];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn expert_up(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let pos = wg.id.y;
    let slot = position_slot(pos);
    if (slot == NOT_RESIDENT) { return; }
    let tok = sorted[pos] / p.top_k;
    let n = wg.id.x * 8u + lid / 32u;
    let lane = lid % 32u;
    let nvalid = n < p.ffn;
    let h4 = p.hidden / 4u;
    let row = slot * p.ffn + n;
    var acc = 0.0;
    if (nvalid) {
        for (var c4 = lane; c4 < h4; c4 += 32u) {
            let l = wloc(row, c4 * 4u, p.hidden, p.gate_sb);
            acc += dot(z[tok * h4 + c4], wdecode(gate[l.w0], gate[l.w1], l));
        }
    }
    let g = reduce32(lid, acc);
    var uacc = 0.0;
    if (nvalid && g > 0.0) {
        for (var c4 = lane; c4 < h4; c4 += 32u) {
            let l = wloc(row, c4 * 4u, p.hidden, p.up_sb);
            uacc += dot(z[tok * h4 + c4], wdecode(up[l.w0], up[l.w1], l));
        }
    }
    let u = reduce32(lid, uacc);
    if (lane == 0u && nvalid) {
        var v = 0.0;
        if (g > 0.0) {
            v = u * g;
        } else {
            atomicAdd(&stats[0], 1u);
        }
        atomicAdd(&stats[1], 1u);
        act[pos * p.ffn + n] = v;
    }
}
#endif
#endif

// ---------------------------------------------------------------------------------------
#ifdef DOWN
#ifdef TILED
var<workgroup> as_: array<vec4<f32>, ZS_LEN>;
var<workgroup> ws: array<vec4<f32>, 256>;
// Thread (tx, ty) = (lid % 16, lid / 16) owns positions ty + 16 i (i < MI) and the
// columns 4 tx..4 tx + 3 of the 64-column block.
@compute @workgroup_size(256)
fn expert_down(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let t = expert_tile(wg.id.x);
    if (!t.valid) { return; }
    let h4 = p.hidden / 4u;
    let c40 = wg.id.y * (TN / 4u);
    let tx = lid % 16u;
    let ty = lid / 16u;
    let lr = lid / 4u;
    let lc = lid % 4u;
    let arow = t.row0 + lr;
    let aload = lid < TM * 4u;
    let avalid = aload && arow < t.row_end;
    let f4 = p.ffn / 4u;
    let kn = lid / 16u;
    let wc4 = c40 + lid % 16u;
    let wvalid = wc4 < h4;
#unroll i MI
    var acc${i} = vec4<f32>(0.0);
    var a${i} = vec4<f32>(0.0);
#endunroll
#ifdef SKIP_CHUNKS
    var skip = chunk_skip_start(lid);
    workgroupBarrier();
#endif
    for (var k0 = 0u; k0 < p.ffn; k0 += TK) {
        var av = vec4<f32>(0.0);
        if (avalid) {
            av = act4[arow * f4 + k0 / 4u + lc];
        }
        if (aload) {
            as_[lr * S + lc] = av;
        }
#ifdef SKIP_CHUNKS
        let live = chunk_live(lid, any(av != vec4<f32>(0.0)), &skip);
#else
        let live = true;
#endif
        var wv = vec4<f32>(0.0);
        if (wvalid && live) {
            let l = wloc(t.slot * p.ffn + k0 + kn, wc4 * 4u, p.hidden, p.down_sb);
            wv = wdecode(down[l.w0], down[l.w1], l);
        }
        ws[kn * 16u + lid % 16u] = wv;
        workgroupBarrier();
        if (live) {
#unroll k 4
#unroll i MI
            a${i} = as_[(ty + ${i}u * 16u) * S + ${k}u];
#endunroll
#unroll c 4
            {
                let b = ws[(${k}u * 4u + ${c}u) * 16u + tx];
#unroll i MI
                acc${i} += a${i}[${c}] * b;
#endunroll
            }
#endunroll
#endunroll
        }
        workgroupBarrier();
    }
#ifdef SKIP_CHUNKS
    if (lid == 0u) {
        atomicAdd(&stats[2], skip.skipped);
        atomicAdd(&stats[3], p.ffn / TK);
    }
#endif
    let c4 = c40 + tx;
#unroll i MI
    {
        let pos = t.row0 + ty + ${i}u * 16u;
        if (pos < t.row_end && c4 < h4) {
            y[pos * h4 + c4] = acc${i};
        }
    }
#endunroll
}
#endif

#ifdef GEMV
var<workgroup> part: array<vec4<f32>, 256>;

// One position (wid.y) and 64 columns (wid.x) per workgroup: thread (tx, ty) =
// (lid % 16, lid / 16) owns columns 4 tx..4 tx + 3 and neurons ty, ty + 16, ...; the 16
// partial sums are added in workgroup memory. Rows of skipped neurons are not read.
@compute @workgroup_size(256)
fn expert_down(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let pos = wg.id.y;
    let slot = position_slot(pos);
    if (slot == NOT_RESIDENT) { return; }
    let h4 = p.hidden / 4u;
    let tx = lid % 16u;
    let ty = lid / 16u;
    let c4 = wg.id.x * 16u + tx;
    var acc = vec4<f32>(0.0);
    if (c4 < h4) {
        for (var n = ty; n < p.ffn; n += 16u) {
            let a = act4[(pos * p.ffn + n) / 4u][n % 4u];
            if (a != 0.0) {
                let l = wloc(slot * p.ffn + n, c4 * 4u, p.hidden, p.down_sb);
                acc += a * wdecode(down[l.w0], down[l.w1], l);
            }
        }
    }
    part[lid] = acc;
    workgroupBarrier();
#unroll s 4
    if (ty < (8u >> ${s}u)) {
        part[lid] += part[lid + (8u >> ${s}u) * 16u];
    }
    workgroupBarrier();
#endunroll
    if (ty == 0u && c4 < h4) {
        y[pos * h4 + c4] = part[lid];
    }
}
#endif
#endif
