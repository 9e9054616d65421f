// The compaction step every selector shares: a row's selected entries are written to
// its slice of the LUT index buffer (starting at `base`), chunk by chunk, each chunk's
// workgroup placing its entries after those of the row's earlier chunks.
//
// Needs `const COMPACT_WG: u32` (the workgroup size, a power of two) and the binding
// `lut_ranges: array<vec2<u32>>` in the including kernel. Call it from uniform control
// flow with `mine` = this thread's share of the kept entries of chunks `0..upto` (upto
// = chunk, or all chunks of the row for chunk 0).

var<workgroup> partial: array<u32, COMPACT_WG>;

// Sums `mine` over the workgroup; chunk 0 writes the row's range `[base, base + total)`.
// Returns where this chunk's entries start within the row's slice.
fn compact_offset(lid: u32, mine: u32, chunk: u32, row: u32, base: u32) -> u32 {
    partial[lid] = mine;
    workgroupBarrier();
    for (var stride = COMPACT_WG / 2u; stride > 0u; stride /= 2u) {
        if lid < stride {
            partial[lid] += partial[lid + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    if chunk == 0u {
        if lid == 0u {
            lut_ranges[row] = vec2<u32>(base, base + total);
        }
        return 0u;
    }
    return total;
}
