//! Benchmark models without downloads: GGUF files with a real model's shapes and
//! metadata, random weights and a small valid byte-level BPE tokenizer, readable by this
//! crate's reader and by llama.cpp (`wgsparse synth-gguf`).
//!
//! Every 2-D weight (the token embedding included; the output head is tied) is written
//! in the chosen type (Q4_0, Q8_0 or F16) with values of standard deviation
//! `1/√fan_in`; norms are ones, Qwen2's biases small random values, SmallThinker's router
//! f32. The tokenizer has the 256 byte symbols, two-symbol merges of printable
//! characters, filler tokens `t<i>`, the end-of-text and chat tokens, and padding
//! tokens up to the vocabulary size. Tensors are generated and written one at a time.

use std::io::Write;

use half::f16;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::gguf::{GgufWriter, MetaValue};
use crate::quant::GgmlType;

/// An architecture the writer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SynthArch {
    /// llama (Llama-3.1, SmolLM2).
    Llama,
    /// qwen2 (Qwen2.5).
    Qwen2,
    /// smallthinker (SmallThinker MoE: pre-attention router, ReGLU experts).
    SmallThinker,
}

impl SynthArch {
    /// The GGUF `general.architecture` name.
    pub fn name(self) -> &'static str {
        match self {
            SynthArch::Llama => "llama",
            SynthArch::Qwen2 => "qwen2",
            SynthArch::SmallThinker => "smallthinker",
        }
    }
}

impl std::str::FromStr for SynthArch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "llama" => Ok(SynthArch::Llama),
            "qwen2" => Ok(SynthArch::Qwen2),
            "smallthinker" => Ok(SynthArch::SmallThinker),
            o => Err(Error::InvalidArgument(format!(
                "architecture `{o}`: llama, qwen2 or smallthinker"
            ))),
        }
    }
}

/// A model's shapes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SynthConfig {
    /// Architecture.
    pub arch: SynthArch,
    /// Preset name.
    pub name: String,
    /// Layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Dense FFN width (0 for MoE models).
    pub ffn: usize,
    /// Vocabulary (embedding rows).
    pub vocab: usize,
    /// Trained context length.
    pub ctx: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// Experts per layer (MoE).
    pub experts: usize,
    /// Experts used per token.
    pub top_k: usize,
    /// Expert FFN width.
    pub expert_ffn: usize,
    /// Sliding window of the local layers (SmallThinker-21B: 4096), `None` = all global.
    pub window: Option<usize>,
}

/// The presets: real models' shapes, and a `tiny-*` one per architecture for tests.
pub fn presets() -> Vec<SynthConfig> {
    let dense = |arch, name: &str, l, h, nh, kvh, hd, ffn, vocab, ctx, theta| SynthConfig {
        arch,
        name: name.into(),
        layers: l,
        hidden: h,
        heads: nh,
        kv_heads: kvh,
        head_dim: hd,
        ffn,
        vocab,
        ctx,
        rope_theta: theta,
        experts: 0,
        top_k: 0,
        expert_ffn: 0,
        window: None,
    };
    let moe = |name: &str, l, h, nh, kvh, experts, top_k, vocab, window| SynthConfig {
        experts,
        top_k,
        expert_ffn: 768,
        window,
        ..dense(
            SynthArch::SmallThinker,
            name,
            l,
            h,
            nh,
            kvh,
            128,
            0,
            vocab,
            32768,
            1.5e6,
        )
    };
    use SynthArch::*;
    vec![
        dense(
            Qwen2,
            "qwen2.5-1.5b",
            28,
            1536,
            12,
            2,
            128,
            8960,
            151936,
            32768,
            1e6,
        ),
        dense(
            Qwen2,
            "qwen2.5-7b",
            28,
            3584,
            28,
            4,
            128,
            18944,
            152064,
            32768,
            1e6,
        ),
        dense(
            Llama,
            "llama-3.1-8b",
            32,
            4096,
            32,
            8,
            128,
            14336,
            128256,
            131072,
            5e5,
        ),
        dense(
            Llama,
            "smollm2-135m",
            30,
            576,
            9,
            3,
            64,
            1536,
            49152,
            8192,
            1e5,
        ),
        moe(
            "smallthinker-4b-a0.6b",
            32,
            1536,
            12,
            2,
            32,
            4,
            151936,
            None,
        ),
        moe(
            "smallthinker-21b-a3b",
            52,
            2560,
            20,
            4,
            64,
            6,
            151936,
            Some(4096),
        ),
        dense(Qwen2, "tiny-qwen2", 2, 128, 4, 2, 32, 96, 400, 2048, 1e6),
        dense(Llama, "tiny-llama", 2, 128, 4, 1, 32, 96, 400, 2048, 1e4),
        SynthConfig {
            expert_ffn: 64,
            ..moe("tiny-smallthinker", 2, 128, 4, 2, 8, 2, 400, None)
        },
    ]
}

/// The default preset of an architecture: the model the benchmarks use.
pub fn default_preset(arch: SynthArch) -> &'static str {
    match arch {
        SynthArch::Qwen2 => "qwen2.5-1.5b",
        SynthArch::Llama => "llama-3.1-8b",
        SynthArch::SmallThinker => "smallthinker-4b-a0.6b",
    }
}

/// The preset called `name` (typed error listing them otherwise).
pub fn preset(name: &str) -> Result<SynthConfig> {
    let all = presets();
    all.iter().find(|p| p.name == name).cloned().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "no preset `{name}`: {}",
            all.iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// What [`write_synth`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SynthReport {
    /// The shapes.
    pub config: SynthConfig,
    /// Weight type name.
    pub weights: String,
    /// Tensors.
    pub tensors: usize,
    /// Parameters.
    pub params: u64,
    /// Bytes of the file.
    pub bytes: u64,
}

impl std::fmt::Display for SynthReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}), {}: {} tensors, {:.3} B parameters, {:.1} MiB",
            self.config.name,
            self.config.arch.name(),
            self.weights,
            self.tensors,
            self.params as f64 / 1e9,
            self.bytes as f64 / (1 << 20) as f64
        )
    }
}

/// The synthetic tokenizer.
struct Vocabulary {
    tokens: Vec<String>,
    /// 1 normal, 3 control, 5 unused.
    types: Vec<i32>,
    merges: Vec<String>,
    /// The end-of-text id.
    eos: u32,
}

fn vocabulary(vocab: usize) -> Result<Vocabulary> {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    if vocab < 256 + specials.len() {
        return Err(Error::InvalidArgument(format!(
            "a vocabulary of {vocab} tokens has no room for 256 byte symbols and 3 specials"
        )));
    }
    // GPT-2's byte-level alphabet, in byte order.
    let printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut symbol = vec![' '; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        symbol[b as usize] = char::from_u32(c).expect("valid code point");
    }
    let mut tokens: Vec<String> = symbol.iter().map(|c| c.to_string()).collect();
    let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    let regular = vocab - specials.len();
    // Merges of two printable symbols ('Ġ' = space first), while room is left for a
    // quarter of the regular tokens.
    let alpha: Vec<char> = std::iter::once(symbol[32])
        .chain((b'a'..=b'z').map(|b| symbol[b as usize]))
        .chain((b'A'..=b'Z').map(|b| symbol[b as usize]))
        .chain((b'0'..=b'9').map(|b| symbol[b as usize]))
        .collect();
    let budget = (regular - 256) / 4;
    let mut merges = Vec::new();
    'outer: for &a in &alpha {
        for &b in &alpha[1..] {
            if merges.len() >= budget.min(20_000) {
                break 'outer;
            }
            let t = format!("{a}{b}");
            if seen.insert(t.clone()) {
                tokens.push(t);
                merges.push(format!("{a} {b}"));
            }
        }
    }
    let mut i = tokens.len();
    while tokens.len() < regular.min(151_643) {
        let t = format!("t{i}");
        if seen.insert(t.clone()) {
            tokens.push(t);
        }
        i += 1;
    }
    let mut types = vec![1i32; tokens.len()];
    let eos = tokens.len() as u32;
    for s in specials {
        tokens.push(s.into());
        types.push(3);
    }
    while tokens.len() < vocab {
        tokens.push(format!("[PAD{}]", tokens.len()));
        types.push(5);
    }
    Ok(Vocabulary {
        tokens,
        types,
        merges,
        eos,
    })
}

/// Random bytes of a `[rows, cols]` weight of `ty` with standard deviation `std`.
fn weight(rng: &mut StdRng, ty: GgmlType, rows: usize, cols: usize, std: f32) -> Vec<u8> {
    let n = rows * cols;
    match ty {
        GgmlType::F32 => (0..n)
            .flat_map(|_| (std * rng.random_range(-1.732f32..1.732)).to_le_bytes())
            .collect(),
        GgmlType::F16 => (0..n)
            .flat_map(|_| f16::from_f32(std * rng.random_range(-1.732f32..1.732)).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => {
            // Uniform codes in −127..=127 (standard deviation ≈ 73.3).
            let d = f16::from_f32(std / 73.3).to_le_bytes();
            (0..n / 32)
                .flat_map(|_| {
                    let mut b = d.to_vec();
                    b.extend((0..32).map(|_| rng.random_range(-127i8..=127) as u8));
                    b
                })
                .collect()
        }
        _ => {
            // Q4_0: nibbles uniform in 1..=15, values −7..=7 (mean 0, standard
            // deviation ≈ 4.32). Uniform 0..=15 would give every weight a mean of −d/2:
            // all rows of a matrix would share a bias along the activations' sum, which
            // decides the sign of most gate outputs and router logits at once.
            let d = f16::from_f32(std / 4.32).to_le_bytes();
            let mut nib = || rng.random_range(1u8..=15);
            (0..n / 32)
                .flat_map(|_| {
                    let mut b = d.to_vec();
                    b.extend((0..16).map(|_| nib() | nib() << 4));
                    b
                })
                .collect()
        }
    }
}

/// Writes a synthetic model of `cfg` with weights in `ty` (Q4_0, Q8_0 or F16) to `out`.
pub fn write_synth(
    cfg: &SynthConfig,
    ty: GgmlType,
    seed: u64,
    out: &mut impl Write,
) -> Result<SynthReport> {
    if !matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::F16) {
        return Err(Error::InvalidArgument(format!(
            "synthetic weights are Q4_0, Q8_0 or F16, not {ty:?}"
        )));
    }
    let a = cfg.arch.name();
    let moe = cfg.arch == SynthArch::SmallThinker;
    if !cfg.hidden.is_multiple_of(32)
        || cfg.heads == 0
        || cfg.kv_heads == 0
        || !cfg.heads.is_multiple_of(cfg.kv_heads)
        || (moe && (cfg.experts == 0 || cfg.top_k == 0 || cfg.top_k > cfg.experts))
    {
        return Err(Error::InvalidArgument(format!(
            "inconsistent synthetic shapes {cfg:?}"
        )));
    }
    let Vocabulary {
        tokens,
        types,
        merges,
        eos,
    } = vocabulary(cfg.vocab)?;
    let mut w = GgufWriter::new();
    let u = |x: usize| MetaValue::U32(x as u32);
    w.meta("general.architecture", MetaValue::Str(a.into()))
        .meta(
            "general.name",
            MetaValue::Str(format!("{}-synthetic-{ty:?}", cfg.name)),
        )
        .meta("general.type", MetaValue::Str("model".into()))
        .meta("general.quantization_version", u(2))
        .meta(
            "general.file_type",
            u(match ty {
                GgmlType::F16 => 1,
                GgmlType::Q8_0 => 7,
                _ => 2,
            }),
        )
        .meta(&format!("{a}.context_length"), u(cfg.ctx))
        .meta(&format!("{a}.embedding_length"), u(cfg.hidden))
        .meta(&format!("{a}.block_count"), u(cfg.layers))
        .meta(
            &format!("{a}.feed_forward_length"),
            u(if moe { cfg.expert_ffn } else { cfg.ffn }),
        )
        .meta(&format!("{a}.attention.head_count"), u(cfg.heads))
        .meta(&format!("{a}.attention.head_count_kv"), u(cfg.kv_heads))
        .meta(&format!("{a}.attention.key_length"), u(cfg.head_dim))
        .meta(&format!("{a}.attention.value_length"), u(cfg.head_dim))
        .meta(
            &format!("{a}.rope.freq_base"),
            MetaValue::F32(cfg.rope_theta),
        )
        .meta(
            &format!("{a}.attention.layer_norm_rms_epsilon"),
            MetaValue::F32(1e-6),
        );
    if cfg.arch == SynthArch::Llama {
        w.meta(&format!("{a}.rope.dimension_count"), u(cfg.head_dim))
            .meta(&format!("{a}.vocab_size"), u(cfg.vocab));
    }
    if moe {
        w.meta(&format!("{a}.expert_count"), u(cfg.experts))
            .meta(&format!("{a}.expert_used_count"), u(cfg.top_k))
            .meta(
                &format!("{a}.expert_feed_forward_length"),
                u(cfg.expert_ffn),
            )
            // llama.cpp's gating functions: 1 softmax, 2 sigmoid (SmallThinker's).
            .meta(&format!("{a}.expert_gating_func"), u(2));
        if let Some(win) = cfg.window {
            w.meta(&format!("{a}.attention.sliding_window"), u(win));
        }
    }
    w.meta("tokenizer.ggml.model", MetaValue::Str("gpt2".into()))
        .meta(
            "tokenizer.ggml.pre",
            MetaValue::Str(
                if cfg.arch == SynthArch::Llama {
                    "llama-bpe"
                } else {
                    "qwen2"
                }
                .into(),
            ),
        )
        .meta("tokenizer.ggml.tokens", MetaValue::Strs(tokens))
        .meta("tokenizer.ggml.token_type", MetaValue::I32s(types))
        .meta("tokenizer.ggml.merges", MetaValue::Strs(merges))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(eos))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(eos))
        .meta("tokenizer.ggml.padding_token_id", MetaValue::U32(eos))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));

    // (name, ggml dims, type, fan-in for the scale; 0 = ones, 1 = small bias)
    let (h, q, kv) = (
        cfg.hidden,
        cfg.heads * cfg.head_dim,
        cfg.kv_heads * cfg.head_dim,
    );
    let d2 = |r: usize, c: usize| vec![c as u64, r as u64];
    let mut plan: Vec<(String, Vec<u64>, GgmlType, usize)> =
        vec![("token_embd.weight".into(), d2(cfg.vocab, h), ty, h)];
    for l in 0..cfg.layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        plan.push((n("attn_norm.weight"), vec![h as u64], GgmlType::F32, 0));
        plan.push((n("attn_q.weight"), d2(q, h), ty, h));
        plan.push((n("attn_k.weight"), d2(kv, h), ty, h));
        plan.push((n("attn_v.weight"), d2(kv, h), ty, h));
        if cfg.arch == SynthArch::Qwen2 {
            for (s, rows) in [("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
                plan.push((n(s), vec![rows as u64], GgmlType::F32, 1));
            }
        }
        plan.push((n("attn_output.weight"), d2(h, q), ty, q));
        plan.push((n("ffn_norm.weight"), vec![h as u64], GgmlType::F32, 0));
        if moe {
            let (e, f) = (cfg.experts as u64, cfg.expert_ffn as u64);
            plan.push((
                n("ffn_gate_inp.weight"),
                d2(cfg.experts, h),
                GgmlType::F32,
                h,
            ));
            plan.push((n("ffn_gate_exps.weight"), vec![h as u64, f, e], ty, h));
            plan.push((n("ffn_up_exps.weight"), vec![h as u64, f, e], ty, h));
            plan.push((
                n("ffn_down_exps.weight"),
                vec![f, h as u64, e],
                ty,
                f as usize,
            ));
        } else {
            plan.push((n("ffn_gate.weight"), d2(cfg.ffn, h), ty, h));
            plan.push((n("ffn_up.weight"), d2(cfg.ffn, h), ty, h));
            plan.push((n("ffn_down.weight"), d2(h, cfg.ffn), ty, cfg.ffn));
        }
    }
    plan.push((
        "output_norm.weight".into(),
        vec![h as u64],
        GgmlType::F32,
        0,
    ));
    for (name, dims, t, _) in &plan {
        w.tensor(name, dims, *t)?;
    }
    let params: u64 = plan
        .iter()
        .map(|(_, d, _, _)| d.iter().product::<u64>())
        .sum();
    let mut rng = StdRng::seed_from_u64(seed);
    let bytes = w.write(out, |i, buf| {
        let (_, dims, t, fan_in) = &plan[i];
        let n: u64 = dims.iter().product();
        match fan_in {
            0 => buf.extend((0..n).flat_map(|_| 1f32.to_le_bytes())),
            1 => buf.extend(weight(&mut rng, GgmlType::F32, 1, n as usize, 0.02)),
            &f => {
                let cols = dims[0] as usize;
                let rows = n as usize / cols;
                buf.extend(weight(&mut rng, *t, rows, cols, 1.0 / (f as f32).sqrt()));
            }
        }
        Ok(())
    })?;
    Ok(SynthReport {
        config: cfg.clone(),
        weights: format!("{ty:?}"),
        tensors: plan.len(),
        params,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Method;
    use crate::model::decoder::{Config, Decoder};
    use crate::model::gguf::Gguf;
    use crate::runtime::context::Context;

    #[test]
    fn tiny_dense_files_read_back_and_run() {
        for name in ["tiny-qwen2", "tiny-llama"] {
            for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::F16] {
                let cfg = preset(name).unwrap();
                let mut bytes = Vec::new();
                let r = write_synth(&cfg, ty, 7, &mut bytes).unwrap();
                assert_eq!(r.bytes as usize, bytes.len());
                let g = Gguf::from_bytes(bytes).unwrap();
                assert_eq!(g.str("general.architecture").unwrap(), cfg.arch.name());
                let c = Config::from_gguf(&g).unwrap();
                assert_eq!(
                    (
                        c.n_layer,
                        c.d_model,
                        c.n_head,
                        c.n_kv_head,
                        c.head_dim,
                        c.ffn_dim,
                        c.vocab
                    ),
                    (
                        cfg.layers,
                        cfg.hidden,
                        cfg.heads,
                        cfg.kv_heads,
                        cfg.head_dim,
                        cfg.ffn,
                        cfg.vocab
                    )
                );
                assert_eq!(g.tensor("token_embd.weight").unwrap().ty, ty);
                let dec = Decoder::load(&g, &Context::cpu(), Method::Dense).unwrap();
                let out = dec.generate(&[1, 2, 3], 4, &[], &mut |_| {}).unwrap();
                assert_eq!(out.len(), 4);
                assert!(out.iter().all(|&t| (t as usize) < cfg.vocab));
            }
        }
    }

    #[test]
    fn the_tokenizer_is_a_valid_bpe_vocabulary() {
        let Vocabulary {
            tokens,
            types,
            merges,
            eos,
        } = vocabulary(400).unwrap();
        assert_eq!(tokens.len(), 400);
        assert_eq!(types.len(), 400);
        assert_eq!(tokens[eos as usize], "<|endoftext|>");
        let set: std::collections::HashSet<&String> = tokens.iter().collect();
        assert_eq!(set.len(), tokens.len(), "tokens are unique");
        for m in &merges {
            let (a, b) = m.split_once(' ').unwrap();
            assert!(set.contains(&format!("{a}{b}")) && set.contains(&a.to_string()));
        }
        assert!(vocabulary(100).is_err());
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        assert!(matches!(preset("nope"), Err(Error::InvalidArgument(_))));
        let cfg = preset("tiny-qwen2").unwrap();
        let mut sink = Vec::new();
        assert!(matches!(
            write_synth(&cfg, GgmlType::Q4K, 1, &mut sink),
            Err(Error::InvalidArgument(_))
        ));
        let bad = SynthConfig { kv_heads: 3, ..cfg };
        assert!(matches!(
            write_synth(&bad, GgmlType::Q4_0, 1, &mut sink),
            Err(Error::InvalidArgument(_))
        ));
    }
}
