//! Checking a device against the CPU twin: the routine the tests, the bench's
//! `--check-len` and the CLI share.

use crate::attention::flash_cpu::dense_attention_cpu;
use crate::attention::metrics::{ErrorStats, compare};
use crate::attention::synthetic::qkv_host;
use crate::attention::{AttentionReport, AttentionShape, Method, upload_qkv};
use crate::error::Result;
use crate::runtime::context::Context;
use crate::runtime::tensor::{DType, Tensor};

/// What a verification found.
#[derive(Clone, Debug)]
pub struct Verification {
    /// Device output vs the CPU twin.
    pub errors: ErrorStats,
    /// The device run's report.
    pub report: AttentionReport,
}

/// Runs dense attention on `ctx` with synthetic inputs (seed `seed`) and a NaN-poisoned
/// output, so an element the kernel does not write shows as an infinite error, and
/// compares it with the CPU twin on the same dtype-rounded inputs.
pub fn dense_against_cpu_twin(
    ctx: &Context,
    shape: AttentionShape,
    dtype: DType,
    causal: bool,
    seed: u64,
) -> Result<Verification> {
    let (q, k, v) = qkv_host(&shape, seed);
    let (q, k, v) = (
        dtype.round_trip(&q),
        dtype.round_trip(&k),
        dtype.round_trip(&v),
    );
    let plan = ctx.attention(shape).causal(causal).dtype(dtype).build()?;
    let want = dense_attention_cpu(
        &shape,
        causal,
        plan.options().scale_for(&shape),
        &q,
        &k,
        &v,
        None,
    );
    let (qt, kt, vt) = upload_qkv(ctx, &shape, &q, &k, &v, dtype)?;
    let mut out = Tensor::filled(ctx, &shape.q_dims(), dtype, f32::NAN)?;
    plan.run_into(&qt, &kt, &vt, &mut out)?;
    let got = out.to_f32_blocking()?;
    Ok(Verification {
        errors: compare(&got, &want),
        report: plan.report().expect("the plan ran"),
    })
}

/// Runs `method` on `ctx` and on the CPU (the twin: the same plan on a CPU context) with
/// the same dtype-rounded inputs `(q, k, v)` and a NaN-poisoned device output, and
/// compares. Returns the device's and the CPU's reports too.
pub fn method_against_cpu_twin(
    ctx: &Context,
    shape: AttentionShape,
    method: &Method,
    dtype: DType,
    causal: bool,
    qkv: (&[f32], &[f32], &[f32]),
) -> Result<(Verification, AttentionReport)> {
    let (q, k, v) = (
        dtype.round_trip(qkv.0),
        dtype.round_trip(qkv.1),
        dtype.round_trip(qkv.2),
    );
    let cpu = Context::cpu();
    let twin = cpu
        .attention(shape)
        .method(method.clone())
        .causal(causal)
        .build()?;
    let (qc, kc, vc) = upload_qkv(&cpu, &shape, &q, &k, &v, DType::F32)?;
    let want = twin.run(&qc, &kc, &vc)?.to_f32_blocking()?;
    let plan = ctx
        .attention(shape)
        .method(method.clone())
        .causal(causal)
        .dtype(dtype)
        .build()?;
    let (qt, kt, vt) = upload_qkv(ctx, &shape, &q, &k, &v, dtype)?;
    let mut out = Tensor::filled(ctx, &shape.q_dims(), dtype, f32::NAN)?;
    plan.run_into(&qt, &kt, &vt, &mut out)?;
    let got = out.to_f32_blocking()?;
    Ok((
        Verification {
            errors: compare(&got, &want),
            report: plan.report().expect("the plan ran"),
        },
        twin.report().expect("the twin ran"),
    ))
}

/// The stated GPU-vs-CPU-twin tolerance (max abs error on unit-variance inputs): f32
/// storage agrees to float rounding; f16 storage adds the rounding of the f16 output.
pub fn dense_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 4e-3,
        _ => 2e-5,
    }
}

/// [`dense_tolerance`] for rows of `keys` keys: f32 rounding grows with the number of
/// terms (seen: 2.01e-5 at 4,300 keys), so the bound doubles every 4,096 keys past the
/// first (f16 storage rounding dominates and does not grow).
pub fn dense_tolerance_for(dtype: DType, keys: usize) -> f64 {
    match dtype {
        DType::F16 => dense_tolerance(dtype),
        _ => dense_tolerance(dtype) * (1.0 + keys as f64 / 4096.0),
    }
}

/// A method measured against dense attention on the same inputs and device.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Density, attention-mass recall, output errors, tolerance recalls.
    pub quality: crate::attention::metrics::Quality,
    /// The method's run.
    pub report: AttentionReport,
    /// The dense run.
    pub dense_report: AttentionReport,
}

/// Runs `method` and dense attention on `ctx` with the same Q/K/V (host f32, stored as
/// `dtype`), both exporting their final row state, and measures the method against
/// dense ([`crate::attention::metrics::Quality`]).
pub fn evaluate(
    ctx: &Context,
    shape: AttentionShape,
    method: &Method,
    dtype: DType,
    qkv: (&[f32], &[f32], &[f32]),
) -> Result<Evaluation> {
    // In head groups when the tensors are over the device's buffer limit.
    let run = |m: &Method| -> Result<(Vec<f32>, Vec<f32>, AttentionReport)> {
        let plan = ctx
            .attention(shape)
            .method(m.clone())
            .dtype(dtype)
            .build_grouped()?;
        let (out, ml) = plan.run_host_with_row_stats(qkv.0, qkv.1, qkv.2)?;
        Ok((out, ml, plan.report().expect("the plan ran")))
    };
    let (dense_out, dense_ml, dense_report) = run(&Method::Dense)?;
    let (out, ml, report) = run(method)?;
    Ok(Evaluation {
        quality: crate::attention::metrics::Quality::measure(
            report.density,
            &out,
            &ml,
            &dense_out,
            &dense_ml,
        ),
        report,
        dense_report,
    })
}
