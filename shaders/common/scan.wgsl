// A workgroup's exclusive scan of one u32 per thread. Needs `const WG: u32` (threads
// per workgroup); call from uniform control flow.

var<workgroup> topk_red: array<u32, WG>;

// The sum of `v` over the threads before this one, and over all (exclusive scan).
fn scan_u32(lid: u32, v: u32) -> vec2<u32> {
    topk_red[lid] = v;
    workgroupBarrier();
    var before = 0u;
    var total = 0u;
    for (var t = 0u; t < WG; t++) {
        let x = topk_red[t];
        before += select(0u, x, t < lid);
        total += x;
    }
    workgroupBarrier();
    return vec2<u32>(before, total);
}
