//! Weight formats, in one place for every layer above: the GGUF block formats and their
//! CPU dequantizers ([`ggml`]), Q4_0 quantization and its GPU repacking ([`q4_0`]), and
//! the packed matrices the GPU kernels read ([`packed`], decoded on the GPU by the one
//! WGSL include `shaders/quant/weights.wgsl`). Used by the MoE layer, `ops::linear` and
//! the GGUF decoder.

pub mod ggml;
pub mod gpu;
pub mod packed;
pub mod q4_0;
pub mod qmat;
pub mod rows8;

pub use ggml::{GgmlType, dequantize};
pub use packed::{PackedMatrix, WeightFormat};
pub use qmat::QMat;
