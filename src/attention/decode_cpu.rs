//! Attention of a few new query rows against a KV cache on the CPU: the decode step of
//! the CPU decoder (one query row per head) and short continuations after cached tokens.
//!
//! The cache is held token after token (`[n, kv_heads, d]`, f16 or f32), the way a
//! decoder appends to it, and the queries and the output are token-major too
//! (`[t, heads, d]`, the projections' layout), so nothing is transposed or copied
//! around the call. Query `i` sits at position `n - t + i` and sees keys `j ≤` its
//! position (and, with a window `w`, `j > pos − w`).
//!
//! Work is split like flash-decoding: a task is one query token, one kv-head (all
//! `heads / kv_heads` query heads of its group share each key and value row it
//! converts to f32) and one chunk of keys; each task leaves a partial softmax state
//! `(m, l, acc)` per query head, and the chunks are merged exactly. Long caches thus
//! keep every thread busy even at one query token and one kv-head.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::flash_cpu::exp_fast;
use crate::error::{Error, Result};
use crate::ops::linear::dot;

/// Keys per chunk of a task (a chunk's partial state is merged with the others').
const CHUNK: usize = 512;
/// Key rows converted to f32 at a time.
const ROWS: usize = 32;

/// A cache's K or V rows, `[n, kv_heads, d]` token after token.
#[derive(Clone, Copy, Debug)]
pub enum CacheRows<'a> {
    /// Half-precision rows (the decoder's default cache).
    F16(&'a [f16]),
    /// Single-precision rows.
    F32(&'a [f32]),
}

impl CacheRows<'_> {
    fn len(&self) -> usize {
        match self {
            CacheRows::F16(x) => x.len(),
            CacheRows::F32(x) => x.len(),
        }
    }

    /// Copies `out.len()` values from element `at` as f32.
    #[inline(always)]
    fn read(&self, at: usize, out: &mut [f32]) {
        match self {
            CacheRows::F16(x) => x[at..at + out.len()].convert_to_f32_slice(out),
            CacheRows::F32(x) => out.copy_from_slice(&x[at..at + out.len()]),
        }
    }
}

/// The shape of a cache attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheAttention {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// New query tokens (the last `tokens` positions of the cache).
    pub tokens: usize,
    /// Cached positions, the new ones included.
    pub keys: usize,
    /// Sliding window: a query at `pos` sees keys `pos − window < j ≤ pos`.
    pub window: Option<usize>,
    /// Softmax scale.
    pub scale: f32,
}

/// Keys `c0..c1` of kv-head `kh`: one task's share.
#[derive(Clone, Copy)]
struct Span {
    kh: usize,
    c0: usize,
    c1: usize,
}

/// Buffers of [`CacheAttention::run_with`], reused from one call to the next (a
/// decode step then allocates nothing once they have grown).
#[derive(Debug, Default)]
pub struct CacheScratch {
    tasks: Vec<(usize, usize, usize, usize)>,
    /// Per task: scores `[group, CHUNK]`.
    scores: Vec<f32>,
    /// Per task: `(m, l)` of each query head of the group.
    ml: Vec<(f32, f32)>,
    /// Per task: unnormalized output rows `[group, d]`.
    acc: Vec<f32>,
    /// Per task: key or value rows converted to f32 `[ROWS, d]`.
    rows: Vec<f32>,
}

/// One task's buffers.
struct TaskBufs<'a> {
    scores: &'a mut [f32],
    ml: &'a mut [(f32, f32)],
    acc: &'a mut [f32],
    rows: &'a mut [f32],
}

impl CacheAttention {
    fn check(&self, q: &[f32], k: &CacheRows, v: &CacheRows, out: &[f32]) -> Result<()> {
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        if h == 0 || kvh == 0 || d == 0 || !h.is_multiple_of(kvh) {
            return Err(Error::InvalidArgument(format!(
                "cache attention: {h} query heads over {kvh} kv-heads of dimension {d}"
            )));
        }
        if self.tokens == 0 || self.tokens > self.keys || self.window == Some(0) {
            return Err(Error::InvalidArgument(format!(
                "cache attention: {} new tokens over {} cached positions, window {:?}",
                self.tokens, self.keys, self.window
            )));
        }
        let (qn, kn) = (self.tokens * h * d, self.keys * kvh * d);
        if q.len() != qn || out.len() != qn || k.len() != kn || v.len() != kn {
            return Err(Error::InvalidArgument(format!(
                "cache attention: q {} / out {} values for {qn}, k {} / v {} for {kn}",
                q.len(),
                out.len(),
                k.len(),
                v.len()
            )));
        }
        Ok(())
    }

    /// Keys visible to new token `i`: `lo..=pos`.
    fn visible(&self, i: usize) -> (usize, usize) {
        let pos = self.keys - self.tokens + i;
        let lo = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        (lo, pos)
    }

    /// `out [tokens, heads, d]` = softmax(scale · q kᵀ) v over the visible keys, for
    /// `q [tokens, heads, d]` and the cache's `k`, `v` `[keys, kv_heads, d]`. Typed
    /// errors for inconsistent sizes.
    pub fn run(&self, q: &[f32], k: CacheRows, v: CacheRows, out: &mut [f32]) -> Result<()> {
        self.run_with(q, k, v, out, &mut CacheScratch::default())
    }

    /// [`CacheAttention::run`] with its buffers in `scratch` (no heap allocation once
    /// they have grown to the call's size).
    pub fn run_with(
        &self,
        q: &[f32],
        k: CacheRows,
        v: CacheRows,
        out: &mut [f32],
        scratch: &mut CacheScratch,
    ) -> Result<()> {
        self.check(q, &k, &v, out)?;
        #[cfg(target_arch = "x86_64")]
        let simd = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        // An f16 cache read in registers (F16C) instead of through f32 row copies.
        #[cfg(target_arch = "x86_64")]
        let f16_direct = simd
            && is_x86_feature_detected!("f16c")
            && matches!((&k, &v), (CacheRows::F16(_), CacheRows::F16(_)))
            && self.head_dim.is_multiple_of(8);
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let group = h / kvh;
        // Tasks: (token, kv-head, chunk), each token's chunks cover its visible keys.
        let CacheScratch {
            tasks,
            scores,
            ml,
            acc,
            rows,
        } = scratch;
        tasks.clear();
        for i in 0..self.tokens {
            let (lo, pos) = self.visible(i);
            for kh in 0..kvh {
                for c0 in (lo..=pos).step_by(CHUNK) {
                    tasks.push((i, kh, c0, (c0 + CHUNK).min(pos + 1)));
                }
            }
        }
        let n = tasks.len();
        scores.resize(n * group * CHUNK, 0.0);
        ml.resize(n * group, (0.0, 0.0));
        acc.resize(n * group * d, 0.0);
        rows.resize(n * ROWS * d, 0.0);
        tasks
            .par_iter()
            .zip(scores.par_chunks_mut(group * CHUNK))
            .zip(ml.par_chunks_mut(group))
            .zip(acc.par_chunks_mut(group * d))
            .zip(rows.par_chunks_mut(ROWS * d))
            .for_each(|((((&(i, kh, c0, c1), scores), ml), acc), rows)| {
                let qg = &q[(i * h + kh * group) * d..(i * h + (kh + 1) * group) * d];
                let bufs = TaskBufs {
                    scores,
                    ml,
                    acc,
                    rows,
                };
                #[cfg(target_arch = "x86_64")]
                if f16_direct && let (CacheRows::F16(k16), CacheRows::F16(v16)) = (k, v) {
                    // SAFETY: AVX2, FMA and F16C were detected; d is a multiple of 8.
                    unsafe { self.chunk_f16_avx2(qg, (k16, v16), Span { kh, c0, c1 }, bufs) };
                    return;
                }
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` is set only where AVX2 and FMA were detected.
                    unsafe { self.chunk_avx2(qg, (&k, &v), Span { kh, c0, c1 }, bufs) };
                    return;
                }
                let _ = simd;
                self.chunk(qg, (&k, &v), Span { kh, c0, c1 }, bufs)
            });
        // Merge each (token, head)'s chunks; tasks of a token and kv-head are adjacent.
        let mut at = 0;
        for i in 0..self.tokens {
            let (lo, pos) = self.visible(i);
            let chunks = (pos + 1 - lo).div_ceil(CHUNK);
            for kh in 0..kvh {
                let parts = at..at + chunks;
                at += chunks;
                for g in 0..group {
                    let m = parts
                        .clone()
                        .map(|p| ml[p * group + g].0)
                        .fold(f32::MIN, f32::max);
                    let o = &mut out[(i * h + kh * group + g) * d..][..d];
                    o.fill(0.0);
                    let mut l = 0f32;
                    for p in parts.clone() {
                        let (pm, pl) = ml[p * group + g];
                        let w = (pm - m).exp();
                        l += w * pl;
                        let a = &acc[(p * group + g) * d..(p * group + g + 1) * d];
                        for (o, a) in o.iter_mut().zip(a) {
                            *o += w * a;
                        }
                    }
                    let inv = 1.0 / l;
                    o.iter_mut().for_each(|x| *x *= inv);
                }
            }
        }
        Ok(())
    }

    /// [`CacheAttention::chunk`] over an f16 cache, each key and value row converted in
    /// registers (`vcvtph2ps`) where it is used.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `head_dim` a multiple of 8.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn chunk_f16_avx2(
        &self,
        qg: &[f32],
        (k, v): (&[f16], &[f16]),
        span: Span,
        bufs: TaskBufs,
    ) {
        use std::arch::x86_64::*;
        let Span { kh, c0, c1 } = span;
        let (kvh, d) = (self.kv_heads, self.head_dim);
        let group = qg.len() / d;
        let n = c1 - c0;
        let TaskBufs {
            scores: s, ml, acc, ..
        } = bufs;
        let row = |src: &[f16], j: usize| -> *const f16 {
            let at = ((c0 + j) * kvh + kh) * d;
            src[at..at + d].as_ptr()
        };
        // SAFETY (all blocks): every pointer covers `d` halfs or floats, d % 8 == 0.
        unsafe {
            for j in 0..n {
                let kr = row(k, j);
                for g in 0..group {
                    let qv = qg[g * d..].as_ptr();
                    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    let mut i = 0;
                    while i + 16 <= d {
                        let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kr.add(i).cast()));
                        let k1 = _mm256_cvtph_ps(_mm_loadu_si128(kr.add(i + 8).cast()));
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qv.add(i)), k0, a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qv.add(i + 8)), k1, a1);
                        i += 16;
                    }
                    if i < d {
                        let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kr.add(i).cast()));
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qv.add(i)), k0, a0);
                    }
                    let a = _mm256_add_ps(a0, a1);
                    let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
                    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
                    s[g * n + j] = self.scale * _mm_cvtss_f32(h);
                }
            }
        }
        for g in 0..group {
            let r = &mut s[g * n..(g + 1) * n];
            let m = r.iter().copied().fold(f32::MIN, f32::max);
            let mut l = 0f32;
            for x in r.iter_mut() {
                *x = exp_fast(*x - m);
                l += *x;
            }
            ml[g] = (m, l);
        }
        acc.fill(0.0);
        unsafe {
            for j in 0..n {
                let vr = row(v, j);
                for g in 0..group {
                    let p = _mm256_set1_ps(s[g * n + j]);
                    let a = acc[g * d..].as_mut_ptr();
                    for i in (0..d).step_by(8) {
                        let x = _mm256_cvtph_ps(_mm_loadu_si128(vr.add(i).cast()));
                        _mm256_storeu_ps(
                            a.add(i),
                            _mm256_fmadd_ps(p, x, _mm256_loadu_ps(a.add(i))),
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk_avx2(
        &self,
        qg: &[f32],
        kv: (&CacheRows, &CacheRows),
        span: Span,
        bufs: TaskBufs,
    ) {
        self.chunk(qg, kv, span, bufs)
    }

    /// The partial state of query heads `qg [group, d]` over a span of one kv-head's keys.
    #[inline(always)]
    fn chunk(&self, qg: &[f32], (k, v): (&CacheRows, &CacheRows), span: Span, bufs: TaskBufs) {
        let Span { kh, c0, c1 } = span;
        let (kvh, d) = (self.kv_heads, self.head_dim);
        let group = qg.len() / d;
        let n = c1 - c0;
        let TaskBufs {
            scores: s,
            ml,
            acc,
            rows,
        } = bufs;
        // Up to ROWS rows of kv-head `kh` from chunk key r0 on, as f32; returns how many.
        let load = |src: &CacheRows, r0: usize, rows: &mut [f32]| {
            let rn = ROWS.min(n - r0);
            for r in 0..rn {
                src.read(
                    ((c0 + r0 + r) * kvh + kh) * d,
                    &mut rows[r * d..(r + 1) * d],
                );
            }
            rn
        };
        // Scores [group, n].
        for r0 in (0..n).step_by(ROWS) {
            let rn = load(k, r0, rows);
            for g in 0..group {
                let qv = &qg[g * d..(g + 1) * d];
                for r in 0..rn {
                    s[g * n + r0 + r] = self.scale * dot(qv, &rows[r * d..(r + 1) * d]);
                }
            }
        }
        for g in 0..group {
            let row = &mut s[g * n..(g + 1) * n];
            let m = row.iter().copied().fold(f32::MIN, f32::max);
            let mut l = 0f32;
            for x in row.iter_mut() {
                *x = exp_fast(*x - m);
                l += *x;
            }
            ml[g] = (m, l);
        }
        acc.fill(0.0);
        for r0 in (0..n).step_by(ROWS) {
            let rn = load(v, r0, rows);
            for g in 0..group {
                let a = &mut acc[g * d..(g + 1) * d];
                for r in 0..rn {
                    let p = s[g * n + r0 + r];
                    for (a, x) in a.iter_mut().zip(&rows[r * d..(r + 1) * d]) {
                        *a += p * x;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::test_util::rnd;
    use proptest::prelude::*;
    use rand::{SeedableRng, rngs::StdRng};

    /// f64 softmax attention over the visible keys, from token-major inputs.
    fn reference(a: &CacheAttention, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (h, kvh, d) = (a.heads, a.kv_heads, a.head_dim);
        let mut out = vec![0f32; a.tokens * h * d];
        for i in 0..a.tokens {
            let (lo, pos) = a.visible(i);
            for hh in 0..h {
                let kh = hh / (h / kvh);
                let qv = &q[(i * h + hh) * d..][..d];
                let s: Vec<f64> = (lo..=pos)
                    .map(|j| {
                        let kr = &k[(j * kvh + kh) * d..][..d];
                        a.scale as f64
                            * qv.iter()
                                .zip(kr)
                                .map(|(x, y)| *x as f64 * *y as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (x, o) in out[(i * h + hh) * d..][..d].iter_mut().enumerate() {
                    *o = (lo..=pos)
                        .zip(&s)
                        .map(|(j, sj)| (sj - m).exp() / z * v[(j * kvh + kh) * d + x] as f64)
                        .sum::<f64>() as f32;
                }
            }
        }
        out
    }

    fn check(a: CacheAttention, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (h, kvh, d) = (a.heads, a.kv_heads, a.head_dim);
        let q = rnd(&mut rng, a.tokens * h * d, 1.0);
        let k = rnd(&mut rng, a.keys * kvh * d, 1.0);
        let v = rnd(&mut rng, a.keys * kvh * d, 1.0);
        // f32 cache: the f64 reference's result.
        let mut out = vec![f32::NAN; q.len()];
        a.run(&q, CacheRows::F32(&k), CacheRows::F32(&v), &mut out)
            .unwrap();
        let want = reference(&a, &q, &k, &v);
        for (x, y) in out.iter().zip(&want) {
            assert!((x - y).abs() <= 2e-5 + 1e-4 * y.abs(), "{a:?}: {x} vs {y}");
        }
        // f16 cache: the reference over the f16-rounded keys and values.
        let (k16, v16): (Vec<f16>, Vec<f16>) = (
            k.iter().map(|&x| f16::from_f32(x)).collect(),
            v.iter().map(|&x| f16::from_f32(x)).collect(),
        );
        let round = |x: &[f16]| x.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let mut out = vec![f32::NAN; q.len()];
        a.run(&q, CacheRows::F16(&k16), CacheRows::F16(&v16), &mut out)
            .unwrap();
        let want = reference(&a, &q, &round(&k16), &round(&v16));
        for (x, y) in out.iter().zip(&want) {
            assert!(
                (x - y).abs() <= 2e-5 + 1e-4 * y.abs(),
                "{a:?} f16: {x} vs {y}"
            );
        }
    }

    #[test]
    fn matches_the_f64_reference_with_chunks_windows_and_gqa() {
        for (i, (heads, kv_heads, head_dim, tokens, keys, window)) in [
            (9, 3, 64, 1, 1, None),
            (12, 2, 128, 1, 1500, None),
            (4, 1, 40, 3, 1100, Some(700)),
            (8, 8, 16, 5, 9, Some(2)),
            (6, 2, 24, 1, 2049, Some(1)),
        ]
        .into_iter()
        .enumerate()
        {
            check(
                CacheAttention {
                    heads,
                    kv_heads,
                    head_dim,
                    tokens,
                    keys,
                    window,
                    scale: 1.0 / (head_dim as f32).sqrt(),
                },
                i as u64,
            );
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let a = CacheAttention {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            tokens: 1,
            keys: 3,
            window: None,
            scale: 1.0,
        };
        let (q, kv) = (vec![0.5f32; 32], vec![0.5f32; 48]);
        let mut out = vec![0f32; 32];
        assert!(
            a.run(&q, CacheRows::F32(&kv), CacheRows::F32(&kv), &mut out)
                .is_ok()
        );
        for bad in [
            CacheAttention { heads: 3, ..a },
            CacheAttention { tokens: 4, ..a },
            CacheAttention { keys: 4, ..a },
            CacheAttention {
                window: Some(0),
                ..a
            },
        ] {
            assert!(matches!(
                bad.run(&q, CacheRows::F32(&kv), CacheRows::F32(&kv), &mut out),
                Err(Error::InvalidArgument(_))
            ));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn random_shapes_match(
            kv_heads in 1usize..4,
            group in 1usize..4,
            head_dim in 1usize..40,
            keys in 1usize..1200,
            tokens in 1usize..4,
            window in proptest::option::of(1usize..900),
            seed in 0u64..1000,
        ) {
            check(
                CacheAttention {
                    heads: kv_heads * group,
                    kv_heads,
                    head_dim,
                    tokens: tokens.min(keys),
                    keys,
                    window,
                    scale: 0.3,
                },
                seed,
            );
        }
    }
}
