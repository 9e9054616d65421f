// What the two flash-attention kernels (flash.wgsl: portable; flash_coop.wgsl: matrix
// units) share: bindings, tensor indexing, the key sources of the dense, block-sparse
// and stripe modes, and the visibility rule. The including kernel defines BK (keys per
// tile) and includes common/storage.wgsl first.

var<workgroup> row_m: array<f32, BQ>;
var<workgroup> row_l: array<f32, BQ>;
var<workgroup> row_alpha: array<f32, BQ>;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q_buf: array<Store4>;
@group(0) @binding(2) var<storage, read> k_buf: array<Store4>;
@group(0) @binding(3) var<storage, read> v_buf: array<Store4>;
@group(0) @binding(4) var<storage, read_write> o_buf: array<Store4>;
@group(0) @binding(5) var<storage, read_write> ml_buf: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> acc_buf: array<vec4<f32>>;
#ifdef SPARSE_KEYS
@group(0) @binding(7) var<storage, read> lut_ranges: array<vec2<u32>>;
@group(0) @binding(8) var<storage, read> lut_idx: array<u32>;
var<workgroup> wg_first: u32;
var<workgroup> wg_count: u32;
#endif
const INVALID_KEY: u32 = 0xffffffffu;
// This workgroup's LUT entries [lut_e0, lut_e1) (sparse modes).
var<private> lut_e0: u32;
var<private> lut_e1: u32;


fn q_row_vec4(h: u32, r: u32) -> u32 {
    return (p.q_base + (h - p.h0) * p.q_head_stride + (r - p.r0) * D) / 4u;
}
fn kv_row_vec4(base: u32, kvh: u32, j: u32) -> u32 {
    return (base + (kvh - p.kv0) * p.kv_head_stride + (j - p.c0) * D) / 4u;
}
fn acc_row_vec4(h: u32, r: u32) -> u32 {
    return (p.acc_base + (h - p.h0) * p.q_head_stride + (r - p.r0) * D) / 4u;
}
fn o_row_vec4(h: u32, r: u32) -> u32 {
    return (p.o_base + (h - p.h0) * p.q_head_stride + (r - p.r0) * D) / 4u;
}
fn ml_index(h: u32, r: u32) -> u32 {
    return p.ml_base + (h - p.h0) * p.ml_head_stride + (r - p.r0);
}

// Position of key `slot` of key tile `it`, or INVALID_KEY (always >= key_end).
fn tile_key(it: u32, slot: u32) -> u32 {
#ifdef KEYS_BLOCKS
    let tiles_per_block = p.lut_key_block / BK;
    return lut_idx[lut_e0 + it / tiles_per_block] * p.lut_key_block
        + (it % tiles_per_block) * BK + slot;
#else
#ifdef KEYS_GATHER
    let e = lut_e0 + it * BK + slot;
    if e < lut_e1 {
        return lut_idx[e];
    }
    return INVALID_KEY;
#else
    return p.c0 + it * BK + slot;
#endif
#endif
}

#ifdef SPARSE_KEYS
// Entries of [first, end) whose key (block start, or position) is below key_end: a
// binary search, the entries being ascending.
fn entries_below(first: u32, end: u32, key_end: u32) -> u32 {
    var lo = first;
    var hi = end;
    while lo < hi {
        let mid = (lo + hi) / 2u;
#ifdef KEYS_BLOCKS
        let key = lut_idx[mid] * p.lut_key_block;
#else
        let key = lut_idx[mid];
#endif
        if key < key_end {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    return lo - first;
}
#endif

// Visibility of key `key` to row `r` (key_end already covers the causal horizon of the
// block and the end of the keys).
fn key_visible(r: u32, key: u32, key_end: u32) -> bool {
    var live = r < p.r1 && key < key_end;
    if p.causal != 0u {
        live = live && key <= r + p.causal_shift;
    }
    if p.window != 0u {
        live = live && (key + p.window > r + p.causal_shift || key < p.sinks);
    }
    return live;
}

// Keys this workgroup can see (key_end) and the key tiles it visits; every thread
// calls this in uniform control flow (the sparse modes read the LUT range through
// workgroup memory).
fn key_plan(h: u32, row0: u32, row_end: u32, lid: u32) -> vec2<u32> {
    var key_end = p.c1;
    if p.causal != 0u {
        key_end = min(key_end, row_end + p.causal_shift);
    }
#ifdef SPARSE_KEYS
    if lid == 0u {
        let range = lut_ranges[h * p.lut_rows + row0 / p.lut_q_block];
        wg_first = range.x;
        wg_count = entries_below(range.x, max(range.x, range.y), key_end);
    }
    lut_e0 = workgroupUniformLoad(&wg_first);
    let entries = workgroupUniformLoad(&wg_count);
    lut_e1 = lut_e0 + entries;
#ifdef KEYS_BLOCKS
    let n_tiles = entries * (p.lut_key_block / BK);
#else
    let n_tiles = (entries + BK - 1u) / BK;
#endif
#else
    var n_tiles = 0u;
    if key_end > p.c0 {
        n_tiles = (key_end - p.c0 + BK - 1u) / BK;
    }
#endif
    return vec2<u32>(key_end, n_tiles);
}

// Starts the row state of row r of the workgroup (query row row0 + r of head h): from
// the imported (m, l) with IMPORT_STATE, else empty.
fn init_row_state(h: u32, row0: u32, r: u32) {
    var m = NEG_BIG;
    var l = 0.0;
#ifdef IMPORT_STATE
    if row0 + r < p.r1 {
        let s = ml_buf[ml_index(h, row0 + r)];
        m = m_from_natural(s.x);
        l = s.y;
    }
#endif
    row_m[r] = m;
    row_l[r] = l;
}
