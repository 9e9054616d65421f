//! The weight formats the GPU kernels read ([`WeightFormat`]) and a matrix in that
//! storage layout ([`PackedMatrix`]): f16 two per word, or Q4_0 repacked so that codes
//! and scales are u32-aligned (`shaders/quant/weights.wgsl` decodes both).

use serde::Serialize;

use super::q4_0;
use crate::error::{Error, Result};

/// Storage format of the expert weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum WeightFormat {
    /// IEEE half, two per u32.
    #[default]
    #[serde(rename = "f16")]
    F16,
    /// ggml Q4_0 (32-weight blocks, 4.5 bits per weight), repacked u32-aligned.
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl WeightFormat {
    /// Bytes of a packed `[rows, cols]` matrix (`cols` a multiple of 32): what
    /// [`PackedMatrix::pack`] makes, the Q4_0 scales included (18 bytes per 32 values).
    pub fn packed_bytes(self, rows: usize, cols: usize) -> u64 {
        let n = (rows * cols) as u64;
        match self {
            WeightFormat::F16 => n * 2,
            WeightFormat::Q4_0 => n / 32 * 18,
        }
    }

    /// `f16` or `q4_0`.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F16 => "f16",
            WeightFormat::Q4_0 => "q4_0",
        }
    }
    /// Bytes per stored weight (Q4_0: 18 bytes per 32).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            WeightFormat::F16 => 2.0,
            WeightFormat::Q4_0 => 18.0 / 32.0,
        }
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(WeightFormat::F16),
            "q4_0" | "q4" => Ok(WeightFormat::Q4_0),
            o => Err(Error::InvalidArgument(format!(
                "unknown weight format `{o}` (known: f16, q4_0)"
            ))),
        }
    }
}

/// A weight matrix `[rows, cols]` in its GPU storage layout (u32 words).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedMatrix {
    /// Storage format.
    pub format: WeightFormat,
    /// Rows.
    pub rows: usize,
    /// Columns (a multiple of 32).
    pub cols: usize,
    /// The words the kernels read.
    pub words: Vec<u32>,
    /// Index of the first scale word (Q4_0; 0 for f16).
    pub scale_base: u32,
}

impl PackedMatrix {
    /// Packs row-major f32 values (f16: rounded; Q4_0: quantized per 32-column block).
    pub fn pack(format: WeightFormat, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(Error::Mismatch(format!(
                "{} values for a {rows} x {cols} matrix",
                values.len()
            )));
        }
        if !cols.is_multiple_of(32) {
            return Err(Error::InvalidShape(format!(
                "packed matrices need columns in multiples of 32, got {cols}"
            )));
        }
        let (words, scale_base) = match format {
            WeightFormat::F16 => {
                let halves: Vec<u16> = values
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect();
                let words = halves
                    .chunks(2)
                    .map(|c| c[0] as u32 | ((c.get(1).copied().unwrap_or(0) as u32) << 16))
                    .collect();
                (words, 0)
            }
            WeightFormat::Q4_0 => q4_0::repack(&q4_0::quantize_row(values)?),
        };
        Ok(PackedMatrix {
            format,
            rows,
            cols,
            words,
            scale_base,
        })
    }

    /// Checks that the words hold exactly `rows x cols` weights of the format (the
    /// kernels index them without bounds checks).
    pub fn validate(&self) -> Result<()> {
        let blocks = self.rows * self.cols / 32;
        let (words, scale_ok) = match self.format {
            WeightFormat::F16 => ((self.rows * self.cols).div_ceil(2), true),
            WeightFormat::Q4_0 => (
                4 * blocks + blocks.div_ceil(2),
                self.scale_base as usize == 4 * blocks,
            ),
        };
        if !self.cols.is_multiple_of(32) || self.words.len() != words || !scale_ok {
            return Err(Error::Mismatch(format!(
                "a {} x {} {} matrix needs {words} words (scales at {}), got {} (scales at {})",
                self.rows,
                self.cols,
                self.format.name(),
                4 * blocks,
                self.words.len(),
                self.scale_base
            )));
        }
        Ok(())
    }

    /// Decodes row `r` into `out` (exactly the values the kernels read).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match self.format {
            WeightFormat::F16 => {
                for (j, o) in out.iter_mut().enumerate().take(c) {
                    let e = r * c + j;
                    let w = self.words[e / 2];
                    let bits = if e.is_multiple_of(2) {
                        w & 0xffff
                    } else {
                        w >> 16
                    };
                    *o = half::f16::from_bits(bits as u16).to_f32();
                }
            }
            WeightFormat::Q4_0 => {
                let nb = c / 32;
                for b in 0..nb {
                    let blk = r * nb + b;
                    let s = self.words[self.scale_base as usize + blk / 2];
                    let bits = if blk.is_multiple_of(2) {
                        s & 0xffff
                    } else {
                        s >> 16
                    };
                    let d = half::f16::from_bits(bits as u16).to_f32();
                    for j in 0..32 {
                        let w = self.words[4 * blk + (j % 16) / 4];
                        let q = (w >> (8 * (j % 4) + 4 * (j / 16))) & 0xf;
                        out[32 * b + j] = (q as f32 - 8.0) * d;
                    }
                }
            }
        }
    }

    /// Every value, decoded.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row(r, o);
        }
        out
    }

    /// Bytes on the GPU.
    pub fn bytes(&self) -> u64 {
        self.words.len() as u64 * 4
    }
}
