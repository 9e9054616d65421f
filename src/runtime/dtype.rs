//! [`DType`]: the element types of tensors (its parser lives with [`super::tensor`], as
//! it returns the crate's error, which names a dtype: this file imports nothing).

use half::f16;
use serde::Serialize;

/// Element type of a tensor. f16 is stored as IEEE half (two per `u32` on the GPU, read
/// with `unpack2x16float`, so it works without the `shader-f16` feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 32-bit unsigned integer (indices).
    U32,
    /// 32-bit signed integer.
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            _ => 4,
        }
    }
    /// `values` as this dtype stores them, back in f32 (f16 rounds; others unchanged).
    /// Gives a CPU reference exactly the inputs a GPU kernel reads.
    pub fn round_trip(self, values: &[f32]) -> Vec<f32> {
        match self {
            DType::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            _ => values.to_vec(),
        }
    }
    /// Lower-case name (`f32`, `f16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::U32 => "u32",
            DType::I32 => "i32",
        }
    }
}
