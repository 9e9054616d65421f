//! The Q/K/V file format: what `wgsparse attention --data FILE` reads and what the
//! real-model dumper writes.
//!
//! A file is a [safetensors] file (an 8-byte little-endian header length, a JSON header
//! with each tensor's dtype, shape and byte range, then the raw little-endian arrays)
//! holding three tensors:
//!
//! | name | shape | dtype |
//! |---|---|---|
//! | `q` | `[q_heads, seq_len, head_dim]` | F32, F16 or BF16 |
//! | `k` | `[kv_heads, seq_len, head_dim]` | same as `q` |
//! | `v` | `[kv_heads, seq_len, head_dim]` | same as `q` |
//!
//! Q and K are post-RoPE, as the attention kernel sees them. String metadata in the
//! header says where the data comes from: `source` (`real` or `synthetic`, required),
//! and optionally `model`, `layer`, `text`, `tokens`. Every figure computed from a file
//! is labelled with its `source`, so real-model numbers and synthetic ones never mix.
//!
//! Python writes one with `safetensors.numpy.save_file({"q": q, "k": k, "v": v},
//! path, metadata={"source": "real", ...})`.
//!
//! [safetensors]: https://huggingface.co/docs/safetensors

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

use crate::attention::AttentionShape;
use crate::error::{Error, Result};
use crate::runtime::tensor::DType;

/// Q, K and V of one attention (one layer of one prompt), on the host as f32.
#[derive(Clone, Debug, PartialEq)]
pub struct QkvFile {
    /// Heads, length and head dimension.
    pub shape: AttentionShape,
    /// `[q_heads, seq_len, head_dim]`.
    pub q: Vec<f32>,
    /// `[kv_heads, seq_len, head_dim]`.
    pub k: Vec<f32>,
    /// `[kv_heads, seq_len, head_dim]`.
    pub v: Vec<f32>,
    /// Header metadata (`source` is always present after [`QkvFile::load`]).
    pub meta: HashMap<String, String>,
}

impl QkvFile {
    /// Where the data comes from: `real` or `synthetic` (`unknown` if unset).
    pub fn source(&self) -> &str {
        self.meta.get("source").map_or("unknown", String::as_str)
    }

    /// A one-line description for reports: source, model, layer, tokens.
    pub fn describe(&self) -> String {
        let mut s = format!("{} Q/K/V", self.source());
        for key in ["model", "layer", "text"] {
            if let Some(v) = self.meta.get(key) {
                s.push_str(&format!(", {key} {v}"));
            }
        }
        s.push_str(&format!(
            ", {} q / {} kv heads, {} tokens, d {}",
            self.shape.q_heads, self.shape.kv_heads, self.shape.seq_len, self.shape.head_dim
        ));
        s
    }

    /// Reads a file. Errors (never panics) on a malformed header, missing tensors,
    /// shapes that do not agree, or a missing `source`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |m: String| Error::BadFile {
            path: path.display().to_string(),
            message: m,
        };
        let bytes = std::fs::read(path)?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
        if !meta.contains_key("source") {
            return Err(bad(
                "metadata has no `source` (real or synthetic): figures from it could not be labelled"
                    .into(),
            ));
        }
        let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let t = st
                .tensor(name)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            if t.shape().len() != 3 {
                return Err(bad(format!(
                    "tensor `{name}` has shape {:?}, expected [heads, seq_len, head_dim]",
                    t.shape()
                )));
            }
            Ok((t.shape().to_vec(), to_f32(&t).map_err(bad)?))
        };
        let (qs, q) = get("q")?;
        let (ks, k) = get("k")?;
        let (vs, v) = get("v")?;
        if ks != vs || qs[1] != ks[1] || qs[2] != ks[2] {
            return Err(bad(format!(
                "shapes do not agree: q {qs:?}, k {ks:?}, v {vs:?}"
            )));
        }
        let shape = AttentionShape::new(qs[0], ks[0], qs[1], qs[2]);
        shape.validate(true).map_err(|e| bad(e.to_string()))?;
        Ok(QkvFile {
            shape,
            q,
            k,
            v,
            meta,
        })
    }

    /// Writes the file with the given storage dtype (F32 or F16).
    pub fn save(&self, path: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let (st_dtype, enc): (Dtype, Encoder) = match dtype {
            DType::F32 => (Dtype::F32, |x| bytemuck::cast_slice(x).to_vec()),
            DType::F16 => (Dtype::F16, |x| {
                x.iter()
                    .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                    .collect()
            }),
            other => return Err(Error::UnsupportedDtype(other, "Q/K/V files")),
        };
        let s = &self.shape;
        let (qb, kb, vb) = (enc(&self.q), enc(&self.k), enc(&self.v));
        let dims = |heads: usize| vec![heads, s.seq_len, s.head_dim];
        let bad =
            |e: safetensors::SafeTensorError| Error::InvalidArgument(format!("Q/K/V file: {e}"));
        let tensors = vec![
            (
                "q",
                TensorView::new(st_dtype, dims(s.q_heads), &qb).map_err(bad)?,
            ),
            (
                "k",
                TensorView::new(st_dtype, dims(s.kv_heads), &kb).map_err(bad)?,
            ),
            (
                "v",
                TensorView::new(st_dtype, dims(s.kv_heads), &vb).map_err(bad)?,
            ),
        ];
        let mut meta = self.meta.clone();
        meta.entry("source".into())
            .or_insert_with(|| "unknown".into());
        safetensors::serialize_to_file(tensors, Some(meta), path.as_ref())
            .map_err(|e| Error::InvalidArgument(format!("Q/K/V file: {e}")))
    }
}

/// Turns f32 values into the stored little-endian bytes.
type Encoder = fn(&[f32]) -> Vec<u8>;

fn to_f32(t: &TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    let b = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => return Err(format!("dtype {other:?} (expected F32, F16 or BF16)")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QkvFile {
        let shape = AttentionShape::new(4, 2, 37, 64);
        let n = |h: usize| h * 37 * 64;
        let f = |i: usize| ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
        QkvFile {
            shape,
            q: (0..n(4)).map(f).collect(),
            k: (0..n(2)).map(|i| f(i + 3)).collect(),
            v: (0..n(2)).map(|i| f(i + 11)).collect(),
            meta: [("source".to_string(), "synthetic".to_string())].into(),
        }
    }

    #[test]
    fn round_trips_f32_exactly_and_f16_within_rounding() {
        let dir = std::env::temp_dir().join(format!("wgsparse-qkv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = sample();
        a.save(dir.join("a.safetensors"), DType::F32).unwrap();
        assert_eq!(QkvFile::load(dir.join("a.safetensors")).unwrap(), a);
        a.save(dir.join("b.safetensors"), DType::F16).unwrap();
        let b = QkvFile::load(dir.join("b.safetensors")).unwrap();
        assert_eq!(b.shape, a.shape);
        let err =
            a.q.iter()
                .zip(&b.q)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
        assert!(err <= 1e-3, "{err}");
        assert_eq!(b.source(), "synthetic");
    }

    #[test]
    fn malformed_files_are_typed_errors() {
        let dir = std::env::temp_dir().join(format!("wgsparse-qkv-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("junk.safetensors");
        std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
        assert!(matches!(QkvFile::load(&p), Err(Error::BadFile { .. })));
        let mut a = sample();
        a.meta.clear();
        a.save(&p, DType::F32).unwrap(); // save fills source = unknown
        let mut nosrc = std::fs::read(&p).unwrap();
        // Truncate the data: the header promises more bytes than exist.
        nosrc.truncate(nosrc.len() - 5);
        std::fs::write(&p, &nosrc).unwrap();
        assert!(matches!(QkvFile::load(&p), Err(Error::BadFile { .. })));
        assert!(matches!(
            QkvFile::load(dir.join("missing")),
            Err(Error::Io(_))
        ));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(96))]
            /// Random byte changes (mostly in the JSON header) and truncations of a valid
            /// file: `load` returns a typed error or a file, never panics.
            #[test]
            fn mutated_files_never_panic(
                edits in proptest::collection::vec((0usize..400, any::<u8>()), 1..6),
                cut in proptest::option::of(any::<prop::sample::Index>()),
                case in 0u64..u64::MAX,
            ) {
                let dir = std::env::temp_dir()
                    .join(format!("wgsparse-qkv-fuzz-{}-{case}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let path = dir.join("f.safetensors");
                sample().save(&path, DType::F16).unwrap();
                let b = crate::runtime::test_util::mutated(std::fs::read(&path).unwrap(), &edits, cut);
                std::fs::write(&path, &b).unwrap();
                let r = QkvFile::load(&path);
                std::fs::remove_dir_all(&dir).ok();
                if let Err(e) = r {
                    prop_assert!(matches!(e, Error::BadFile { .. } | Error::Io(_)), "{e}");
                }
            }
        }
    }
}
