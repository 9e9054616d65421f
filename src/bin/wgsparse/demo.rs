//! `wgsparse` without a subcommand: dense attention at a few lengths on the best device.

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use wgsparse::{Method, Result};

use crate::attention::{AttentionArgs, measure};

pub fn run() -> Result<()> {
    let ctx = crate::device::context(None, Default::default())?;
    println!(
        "wgsparse demo: dense causal attention on {} ({}), synthetic Q/K/V, 32 q-heads / 8 kv-heads, d=128, f16",
        ctx.adapter_name(),
        ctx.backend()
    );
    let lens: &[usize] = if ctx.is_cpu()
        || ctx
            .gpu()
            .is_some_and(|g| g.info.device_type == wgpu::DeviceType::Cpu)
    {
        &[256, 512, 1024]
    } else {
        &[1024, 4096, 16384]
    };
    let bar = ProgressBar::new(lens.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"),
    );
    let mut rows = vec![];
    for &n in lens {
        bar.set_message(format!("{n} tokens"));
        let a = AttentionArgs::parse_from([
            "attention",
            "--seq-len",
            &n.to_string(),
            "--synthetic",
            "gaussian",
        ]);
        let (shape, qkv, _, _) = a.data()?;
        let m = measure(&ctx, &a, &Method::Dense, shape, &qkv, 1)?;
        rows.push((
            n,
            m.ms,
            shape.flops(true) / m.ms / 1e9,
            m.report.timing.timing.clone(),
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("| tokens | ms | TFLOP/s | timing |\n|---:|---:|---:|---|");
    for (n, ms, tf, t) in rows {
        println!("| {n} | {ms:.3} | {tf:.3} | {t} |");
    }
    println!("(try `wgsparse info`, `wgsparse attention --check`, `wgsparse --help`)");
    Ok(())
}
