//! `wgsparse info`: adapters, the chosen backend, features and limits.

use serde_json::json;
use wgsparse::{Backend, Context, Result};

use crate::device;

pub fn run(json_out: bool, backend: Option<Backend>) -> Result<()> {
    let adapters = pollster::block_on(Context::list_adapters());
    let ctx = device::context(backend, Default::default())?;
    // Which kernel each family runs on the chosen device, and why.
    let caps = ctx.capabilities();
    let attention = if ctx.is_cpu() {
        "cpu (rayon)".to_string()
    } else {
        caps.coop_status()
    };
    // SALE's estimation, the projections and the MoE GEMMs take the same switch (their
    // matrix-unit variants keep the integer and f32 results).
    let split = |tile: Option<usize>, what: &str| match tile {
        _ if ctx.is_cpu() => attention.clone(),
        Some(t) => format!("matrix units ({t}x{t} f16 tiles, split f32 operands{what})"),
        None => caps.coop_status(),
    };
    let q4 = wgsparse::quant::WeightFormat::Q4_0;
    let linear = split(wgsparse::ops::linear::linear_coop_tile(caps, q4), "");
    let moe = split(
        wgsparse::moe::expert_ffn::ffn_coop_tile(caps, q4, 16),
        "; prefill tiles, GEMV decode portable",
    );
    let kernels = json!({
        "attention": attention, "sale_estimate": attention,
        "linear": linear, "moe": moe,
    });
    if json_out {
        let v = json!({
            "chosen": { "backend": ctx.backend(), "adapter": ctx.adapter_name(), "why": ctx.choice(),
                        "capabilities": caps, "kernels": kernels },
            "adapters": adapters,
        });
        println!("{}", serde_json::to_string(&v).expect("serializable"));
        return Ok(());
    }
    println!("adapters:");
    for a in &adapters {
        let c = &a.capabilities;
        println!(
            "  - {} [{}, {}] {}",
            a.name, a.backend, a.device_type, a.driver
        );
        if a.backend != Backend::Cpu {
            println!(
                "      f16={} subgroups={} ({}..{}) coop_matrix={} timestamps={}",
                c.f16,
                c.subgroups,
                c.subgroup_min_size,
                c.subgroup_max_size,
                c.coop_matrix
                    .iter()
                    .map(|s| format!("{}x{}x{} {}->{}", s.m, s.n, s.k, s.ab, s.cr))
                    .collect::<Vec<_>>()
                    .join(", "),
                c.timestamps
            );
            println!(
                "      max_storage_binding={} max_buffer={} workgroup_storage={} invocations={} storage_buffers/stage={}",
                c.adapter_max_storage_binding,
                c.max_buffer,
                c.max_workgroup_storage,
                c.max_invocations,
                c.max_storage_buffers_per_stage
            );
        }
    }
    println!("chosen: {} on {}", ctx.adapter_name(), ctx.backend());
    println!("  why: {}", ctx.choice());
    println!("  attention and SALE estimation kernels: {attention}");
    println!("  linear (projection) kernels: {linear}");
    println!("  MoE kernels: {moe}");
    Ok(())
}
