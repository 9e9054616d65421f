//! Real models: a GGUF reader with dequantization ([`gguf`], weight formats in [`crate::quant`]), the tokenizer
//! built from a GGUF's vocabulary ([`tokenizer`]), and a small decoder for the llama,
//! qwen2 and gemma3 architectures ([`decoder`]) whose attention runs through the crate's
//! [`AttentionPlan`](crate::AttentionPlan), and that dumps real post-RoPE Q/K/V.

pub mod bench;
pub mod decoder;
pub mod eval;
pub mod gguf;
pub mod gpu;
pub mod sample;
pub mod smallthinker;
pub mod spm;
pub mod synth;
#[cfg(all(feature = "tokenizers", not(target_arch = "wasm32")))]
pub mod tokenizer;
