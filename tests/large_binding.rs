//! A prompt whose Q tensor is larger than one storage binding of the adapter runs with
//! the adapter's real limits (on lavapipe: 128 MiB) and agrees with the CPU twin.

mod common;

use wgsparse::attention::flash_cpu::dense_attention_cpu;
use wgsparse::attention::metrics::compare;
use wgsparse::attention::synthetic::qkv_host;
use wgsparse::attention::upload_qkv;
use wgsparse::{AttentionShape, DType, Tensor};

#[test]
fn q_larger_than_one_binding_runs_and_matches_cpu() {
    let Some(ctx) = common::gpu(None) else { return };
    // 1,024 q-heads x 136 tokens x 256 dims x f32 = 136 MiB (over lavapipe's 128 MiB):
    // many bytes, few FLOPs.
    let shape = AttentionShape::new(1024, 8, 136, 256);
    let q_bytes = (shape.q_heads * shape.seq_len * shape.head_dim * 4) as u64;
    let limit = ctx.capabilities().max_storage_binding;
    eprintln!("Q = {q_bytes} bytes, binding limit = {limit} bytes");
    if limit >= q_bytes {
        // Only a device with small bindings (lavapipe, many browsers) exercises this.
        eprintln!("binding limit is large enough: the split is covered by the lowered-limit tests");
    }
    let seed = common::seed();
    let (q, k, v) = qkv_host(&shape, seed);
    let want = dense_attention_cpu(&shape, true, 1.0 / 16.0, &q, &k, &v, None);
    let plan = ctx.attention(shape).dtype(DType::F32).build().unwrap();
    let (qt, kt, vt) = upload_qkv(&ctx, &shape, &q, &k, &v, DType::F32).unwrap();
    let mut out = Tensor::filled(&ctx, &shape.q_dims(), DType::F32, f32::NAN).unwrap();
    plan.run_into(&qt, &kt, &vt, &mut out).unwrap();
    let report = plan.report().unwrap();
    if limit < q_bytes {
        assert!(
            report.dispatches > 1,
            "a Q over the binding limit must be split"
        );
    }
    let err = compare(&out.to_f32_blocking().unwrap(), &want);
    eprintln!(
        "{} dispatches, {:.0} ms, {err:?}",
        report.dispatches,
        report.ms()
    );
    assert!(err.max_abs_err < 2e-5, "{err:?}");
}
