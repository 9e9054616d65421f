// Matrix-vector product for one token (decode): y[n] = Σ_k x[k] · W[n, k] (+ res[n])
// (+ bias[n]), any weight format of linear.wgsl. Memory-bound: every weight is read
// once, four consecutive values per thread and step, the 32 threads of a row striding
// over it together; 8 rows per workgroup of 256 threads, partial sums reduced in
// workgroup memory. With one token the head-major layouts equal the token-major ones.

#include "common/invocation.wgsl"
#include "quant/weights.wgsl"

// `struct Params` comes from the launcher (wgsl_params!: one field list for Rust and WGSL).

#include "ops/linear_common.wgsl"
#include "common/row_sum.wgsl"

const ROWS: u32 = 8u;
const LANES: u32 = 32u;

@compute @workgroup_size(256)
fn gemv(wg: WorkgroupN, @builtin(local_invocation_index) lid: u32) {
    let r = lid / LANES;
    let lane = lid % LANES;
    let n = flat_id(wg) * ROWS + r;
    var acc = 0.0;
    if (n < p.n) {
        for (var k = lane * 4u; k < p.k; k += LANES * 4u) {
            acc += dot(wload4(n, k), x[k / 4u]);
        }
    }
    let total = row_sum(acc, lid);
    if (lane == 0u && n < p.n) {
        store_y(0u, n, total);
    }
}
