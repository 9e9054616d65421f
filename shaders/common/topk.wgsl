// The k largest keys of one row, chosen by one workgroup: the block selections of
// ProxyAttn (fixed or estimated budgets) and of SALE under per-head budgets share it.
//
// Needs, in the including kernel: `const WG: u32` (threads per workgroup),
// "common/scan.wgsl" included, and `fn topk_key(i: u32) -> u32`, the key of the row's
// candidate i, ordered as unsigned integers (non-negative f32 bits as they are; signed
// f32 mapped to keep their order).
// Larger keys are kept first, equal keys lowest index first. Thread `lid` owns the
// contiguous candidates `topk_span(lid, count)`; call every function from uniform
// control flow. `topk_select` also needs `fn topk_entry(i: u32) -> u32` (candidate i's
// LUT entry, or TOPK_SKIP for one the exact pass already has) and the bindings
// `row_base`, `lut_ranges` and `lut_idx` of the selected LUT.

// Thread lid's candidates [x, y) of `count` (contiguous: ties go to lower indices).
fn topk_span(lid: u32, count: u32) -> vec2<u32> {
    let per = (count + WG - 1u) / WG;
    let lo = min(lid * per, count);
    return vec2<u32>(lo, min(lo + per, count));
}

// The cut of keeping `keep` candidates: keys above `t` are kept, and of the keys equal
// to it the first `need_eq`; `eq_first` is the rank among those equal keys of this
// thread's first one.
struct TopKCut {
    t: u32,
    need_eq: u32,
    eq_first: u32,
}

fn topk_cut(lid: u32, span: vec2<u32>, keep: u32) -> TopKCut {
    // The keep-th largest key: the largest t with at least `keep` keys >= t.
    var t = 0u;
    for (var b = 0u; b < 32u; b++) {
        let cand = t | (1u << (31u - b));
        var mine = 0u;
        for (var i = span.x; i < span.y; i++) {
            mine += select(0u, 1u, topk_key(i) >= cand);
        }
        if scan_u32(lid, mine).y >= keep {
            t = cand;
        }
    }
    var gt = 0u;
    var eq = 0u;
    for (var i = span.x; i < span.y; i++) {
        let a = topk_key(i);
        gt += select(0u, 1u, a > t);
        eq += select(0u, 1u, a == t);
    }
    let need_eq = keep - min(scan_u32(lid, gt).y, keep);
    return TopKCut(t, need_eq, scan_u32(lid, eq).x);
}

// Whether candidate i (its key `a`) is kept; `eq_rank` starts at the cut's `eq_first`
// and is advanced over this thread's candidates in order.
fn topk_kept(a: u32, cut: TopKCut, eq_rank: ptr<function, u32>) -> bool {
    if a == cut.t {
        let kept = *eq_rank < cut.need_eq;
        *eq_rank += 1u;
        return kept;
    }
    return a > cut.t;
}

// A candidate `topk_entry` leaves out of the LUT (it still counts among the kept).
const TOPK_SKIP: u32 = 0xffffffffu;

// Keeps the `keep` largest of the row's `count` candidates and writes their entries,
// ascending, into the slice of LUT row `row` (from row_base[row]) and its range.
fn topk_select(lid: u32, count: u32, keep: u32, row: u32) {
    let span = topk_span(lid, count);
    let cut = topk_cut(lid, span, keep);
    var eq_rank = cut.eq_first;
    var mine = 0u;
    for (var i = span.x; i < span.y; i++) {
        let kept = topk_kept(topk_key(i), cut, &eq_rank);
        mine += select(0u, 1u, kept && topk_entry(i) != TOPK_SKIP);
    }
    let at = scan_u32(lid, mine);
    let base = row_base[row];
    var pos = base + at.x;
    eq_rank = cut.eq_first;
    for (var i = span.x; i < span.y; i++) {
        let kept = topk_kept(topk_key(i), cut, &eq_rank);
        let e = topk_entry(i);
        if kept && e != TOPK_SKIP {
            lut_idx[pos] = e;
            pos += 1u;
        }
    }
    if lid == 0u {
        lut_ranges[row] = vec2<u32>(base, base + at.y);
    }
}
