//! One MoE layer (router, top-k dispatch, expert FFNs, weighted combine) on the best
//! device, checked against the crate's CPU twin.
//!
//! An app builds an [`MoePlan`](wgsparse::moe::plan::MoePlan) once for its sizes and
//! weight format and runs it on `[tokens, hidden]` activations. The weights here are
//! synthetic; an app fills [`MoeWeights`] from its checkpoint.
//!
//! ```text
//! cargo run --release --example moe_layer -- [TOKENS] [f16|q4_0]
//! ```

use wgsparse::moe::cpu::moe_cpu;
use wgsparse::moe::{MoeConfig, MoeWeights, WeightFormat, grid_input};
use wgsparse::{Context, ContextOptions, DType, Error, Result, Tensor};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args
        .next()
        .map_or(Ok(64), |t| t.parse())
        .map_err(|_| Error::InvalidArgument("TOKENS must be a positive integer".into()))?;
    let format: WeightFormat = args.next().as_deref().unwrap_or("q4_0").parse()?;

    // The best adapter (WGSPARSE_BACKEND may name one), else the CPU.
    let ctx = Context::new_blocking(ContextOptions::from_env()?)?;
    // SmallThinker-4B's sizes: width 1536, 32 experts of width 768, top-4 routing.
    let cfg = MoeConfig::new(1536, 32, 4, 768);
    let weights = MoeWeights::random(&cfg, 1);
    let plan = ctx.moe(cfg).tokens(tokens).format(format).build(&weights)?;

    let x = grid_input(tokens * cfg.hidden, 2);
    let xt = Tensor::from_f32(&ctx, &[tokens, cfg.hidden], &x, DType::F32)?;
    let y = plan.run(&xt)?.to_f32_blocking()?;
    let report = plan.report().expect("the plan ran");

    // The CPU twin on the same packed weights (same rounding of f16/Q4_0 weights).
    let want = moe_cpu(&x, &x, &x, &weights.pack(format)?).out;
    let err = wgsparse::attention::metrics::compare(&y, &want);
    println!(
        "MoE on {} ({}): {tokens} tokens, {} weights, {} kernels",
        ctx.adapter_name(),
        ctx.backend(),
        format.name(),
        report.path
    );
    for s in &report.timing.stages {
        let ms = s.ms.map_or("-".into(), |x| format!("{x:.3}"));
        println!("  stage {:<12} {ms:>9} ms", s.name);
    }
    println!(
        "  {:.3} ms, skipped neurons {:.3}, rel L2 error vs CPU twin {:.2e}",
        report.ms, report.experts.skip_frac, err.rel_l2_err
    );
    if err.rel_l2_err > 1e-3 {
        return Err(Error::Mismatch(format!(
            "GPU and CPU disagree: rel L2 error {:.2e}",
            err.rel_l2_err
        )));
    }
    Ok(())
}
