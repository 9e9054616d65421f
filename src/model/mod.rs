//! Real models: a GGUF reader with dequantization ([`gguf`], weight formats in [`crate::quant`]), the tokenizer
//! built from a GGUF's vocabulary (`tokenizer`), the CPU decoder for the llama, qwen2,
//! gemma3 and smallthinker architectures ([`decoder`]) whose attention runs through the
//! crate's [`AttentionPlan`](crate::AttentionPlan) and that dumps real post-RoPE Q/K/V,
//! the GPU decoder ([`gpu`]: the whole forward pass on a GPU), the choice between them
//! ([`engine`]), structured cropping of FFN channels ([`crop`]), and evaluation
//! (`passkey` retrieval, [`eval`]).

pub mod bench;
pub mod crop;
pub mod decoder;
pub mod engine;
pub mod eval;
pub mod gguf;
pub mod gpu;
#[cfg(all(feature = "tokenizers", not(target_arch = "wasm32")))]
pub mod passkey;
pub mod sample;
pub mod smallthinker;
pub mod spm;
pub mod synth;
#[cfg(feature = "tokenizers")]
pub mod tokenizer;
