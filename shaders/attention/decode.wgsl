// Attention of a few query tokens over a layer's KV cache (decode steps and chunked
// prefill continuations): split-K ("flash decoding"). The cache is paged: page `page`
// (of `pages`) holds positions page0 .. page0 + cap in its own K and V buffers, f16,
// two per u32, [kv_heads, cap, D / 2] words (one page when the whole cache fits a
// binding). Query token i sits at position start + i (start: the `dyn` uniform, written
// per call) and sees keys lo ..= start + i (lo = 0, or the window's first key). The CPU
// twin is attention/decode_cpu.rs (CacheAttention).
//
// STORE:   one dispatch per page: cache[kv_head, start + t − page0, :] = f16(x[kv_head,
//          t, :]) for the new K or V rows whose position falls in the page.
// SPLIT:   one dispatch per page; workgroup (s, i, h): the page's keys of split s (of
//          `splits` equal parts of the query's range), 64 at a time with an online
//          softmax; writes (m, l, acc[D]) to `part` [heads, tokens, pages, splits, D + 2]
//          (an empty range: m = −1e30, l = 0).
// COMBINE: workgroup (i, h): merges every page's splits into out [heads, tokens, D].

#include "common/invocation.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

@group(0) @binding(0) var<uniform> p: Params;

#ifdef STORE
@group(0) @binding(1) var<uniform> dyn: vec4<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> cache: array<u32>;

@compute @workgroup_size(256)
fn kv_store(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let idx = flat_id(wg) * 256u + lid;
    let half = p.d / 2u;
    if (idx >= p.kv_heads * p.tokens * half) {
        return;
    }
    let i = idx % half;
    let t = (idx / half) % p.tokens;
    let h = idx / (half * p.tokens);
    let pos = dyn.x + t;
    if (pos < p.page0 || pos >= p.page0 + p.cap) {
        return;
    }
    cache[(h * p.cap + pos - p.page0) * half + i] = pack2x16float(x[idx]);
}
#endif

#ifdef SPLIT
@group(0) @binding(1) var<uniform> dyn: vec4<u32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> kc: array<u32>;
@group(0) @binding(4) var<storage, read> vc: array<u32>;
@group(0) @binding(5) var<storage, read_write> part: array<f32>;

var<workgroup> qs: array<f32, 256>;
var<workgroup> ps: array<f32, 64>;
var<workgroup> red: array<f32, 64>;

fn reduce(lid: u32, is_max: bool) -> f32 {
    workgroupBarrier();
#unroll k 6
    if (lid < (32u >> ${k}u)) {
        let o = red[lid + (32u >> ${k}u)];
        red[lid] = select(red[lid] + o, max(red[lid], o), is_max);
    }
    workgroupBarrier();
#endunroll
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn decode_split(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let s = wg.id.x;
    let i = wg.id.y;
    let h = wg.id.z;
    let kvh = h / (p.heads / p.kv_heads);
    let half = p.d / 2u;
    let pos = dyn.x + i;
    var lo = 0u;
    if (p.window > 0u && pos + 1u > p.window) {
        lo = pos + 1u - p.window;
    }
    let per = (pos + 1u - lo + p.splits - 1u) / p.splits;
    // The split's keys inside this page.
    let k0 = max(min(pos + 1u, lo + s * per), p.page0);
    let k1 = min(min(pos + 1u, lo + s * per + per), p.page0 + p.cap);
    for (var d = lid; d < p.d; d += 64u) {
        qs[d] = q[(h * p.tokens + i) * p.d + d] * p.scale;
    }
    var m = -1e30;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var kb = k0; kb < k1; kb += 64u) {
        workgroupBarrier();
        let key = kb + lid;
        var sc = -1e30;
        if (key < k1) {
            let row = (kvh * p.cap + key - p.page0) * half;
            var a = 0.0;
            for (var j = 0u; j < half; j++) {
                let kv = unpack2x16float(kc[row + j]);
                a += qs[2u * j] * kv.x + qs[2u * j + 1u] * kv.y;
            }
            sc = a;
        }
        red[lid] = sc;
        let mt = reduce(lid, true);
        let mn = max(m, mt);
        let alpha = exp(m - mn);
        var pj = 0.0;
        if (key < k1) {
            pj = exp(sc - mn);
        }
        ps[lid] = pj;
        red[lid] = pj;
        let lt = reduce(lid, false);
        l = l * alpha + lt;
        acc *= alpha;
        let nk = min(64u, k1 - kb);
        for (var jj = 0u; jj < nk; jj++) {
            let row = (kvh * p.cap + kb + jj - p.page0) * half;
            let pw = ps[jj];
#unroll e 4
            {
                let d = lid + ${e}u * 64u;
                if (d < p.d) {
                    acc[${e}] += pw * unpack2x16float(vc[row + d / 2u])[d % 2u];
                }
            }
#endunroll
        }
        m = mn;
    }
    let base = (((h * p.tokens + i) * p.pages + p.page) * p.splits + s) * (p.d + 2u);
    if (lid == 0u) {
        part[base] = m;
        part[base + 1u] = l;
    }
#unroll e 4
    {
        let d = lid + ${e}u * 64u;
        if (d < p.d) {
            part[base + 2u + d] = acc[${e}];
        }
    }
#endunroll
}
#endif

#ifdef COMBINE
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn decode_combine(wg: Workgroup, @builtin(local_invocation_index) lid: u32) {
    let i = wg.id.x;
    let h = wg.id.y;
    let n = p.splits * p.pages;
    let row = (h * p.tokens + i) * n;
    var mx = -1e30;
    for (var s = 0u; s < n; s++) {
        mx = max(mx, part[(row + s) * (p.d + 2u)]);
    }
    var l = 0.0;
    for (var s = 0u; s < n; s++) {
        let b = (row + s) * (p.d + 2u);
        l += part[b + 1u] * exp(part[b] - mx);
    }
    for (var d = lid; d < p.d; d += 64u) {
        var a = 0.0;
        for (var s = 0u; s < n; s++) {
            let b = (row + s) * (p.d + 2u);
            a += part[b + 2u + d] * exp(part[b] - mx);
        }
        out[(h * p.tokens + i) * p.d + d] = a / l;
    }
}
#endif
