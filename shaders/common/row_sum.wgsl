// The sums of 8 rows of a 256-thread workgroup whose 32 lanes per row (thread `lid`,
// lane `lid % 32`) each hold a partial sum: `row_sum(v, lid)` returns the row's total to
// every lane 0 (other lanes get partial values). Call from uniform control flow (it
// holds barriers). The matrix-vector kernels (ops/gemv.wgsl, moe/experts_ggml.wgsl).

var<workgroup> row_part: array<f32, 256>;

fn row_sum(v: f32, lid: u32) -> f32 {
    let lane = lid % 32u;
    row_part[lid] = v;
    workgroupBarrier();
#unroll s 5
    if (lane < (16u >> ${s}u)) {
        row_part[lid] += row_part[lid + (16u >> ${s}u)];
    }
    workgroupBarrier();
#endunroll
    return row_part[lid];
}
