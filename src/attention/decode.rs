//! Attention of a few query tokens over a layer's KV cache on the GPU
//! (`shaders/attention/decode.wgsl`): the GPU decoder's decode steps and chunked prefill
//! continuations. Its CPU twin is [`crate::attention::decode_cpu::CacheAttention`].
//!
//! The cache ([`GpuKvLayer`]) holds K and V in f16, in pages of `page_len` positions
//! (`[kv_heads, page_len, head_dim]` each, in their own buffers, so that a 128k context
//! of any model fits under the storage-binding limit; one page when the whole cache
//! fits): room for a whole context is reserved once, new rows are stored at their
//! positions ([`DecodeAttentionGpu::store`]) and a step reads only the keys it needs.
//! The position of the first query token is a uniform written per call (`start`,
//! [`DecodePos`]), so the dispatches are built once per token count and recorded step
//! after step.
//!
//! Split-K: each (query head, query token) is cut into `splits` key ranges, each a
//! workgroup with an online softmax leaving `(m, l, acc)`; a second kernel merges them
//! exactly. A long cache thus keeps the GPU busy even with one query token.

use crate::error::{Error, Result};
use crate::runtime::context::{Context, GpuDevice};
use crate::runtime::launch::{Dispatch, Step, check_axis, storage};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct DecodeParams {
        heads: u32,
        kv_heads: u32,
        tokens: u32,
        d: u32,
        cap: u32,
        splits: u32,
        window: u32,
        scale: f32,
        page0: u32,
        page: u32,
        pages: u32,
        _pad: u32,
    }
}

/// The three kernels: store rows into the cache, the split pass, the merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeKernel {
    /// New K or V rows into the cache.
    Store,
    /// One key range of one query row.
    Split,
    /// The ranges merged.
    Combine,
}

/// The kernel spec of one of the three.
pub fn decode_spec(k: DecodeKernel) -> KernelSpec {
    let (entry, flag, layout) = match k {
        DecodeKernel::Store => ("kv_store", "STORE", "uurw"),
        DecodeKernel::Split => ("decode_split", "SPLIT", "uurrrw"),
        DecodeKernel::Combine => ("decode_combine", "COMBINE", "urw"),
    };
    KernelSpec {
        file: "attention/decode.wgsl",
        entry,
        defines: Defines::new()
            .params::<DecodeParams>()
            .flag(flag)
            .flag("F16_CACHE"),
        bindings: BindingKind::layout(layout),
    }
}

/// Every decode-attention variant.
pub fn all_decode_variants() -> Vec<KernelSpec> {
    [
        DecodeKernel::Store,
        DecodeKernel::Split,
        DecodeKernel::Combine,
    ]
    .map(decode_spec)
    .to_vec()
}

/// One layer's cached keys and values on the GPU, f16, in pages of `page_len`
/// positions: page `p` holds positions `p · page_len ..` as `[kv_heads, page_len,
/// head_dim]` (the last page may hold fewer).
pub struct GpuKvLayer {
    /// Each page's keys and values.
    pub pages: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    /// Positions per page.
    pub page_len: usize,
}

impl GpuKvLayer {
    /// Room for `capacity` positions of `kv_heads` heads of `head_dim` (even), in pages
    /// as large as the device's binding limit allows.
    pub fn new(ctx: &Context, kv_heads: usize, capacity: usize, head_dim: usize) -> Result<Self> {
        Self::with_page_bytes(ctx, kv_heads, capacity, head_dim, None)
    }

    /// [`GpuKvLayer::new`] with pages of at most `max_page` bytes (tests of the paging;
    /// `None`: the binding limit).
    pub fn with_page_bytes(
        ctx: &Context,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        max_page: Option<u64>,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        if !head_dim.is_multiple_of(2) || head_dim > 256 || capacity == 0 || kv_heads == 0 {
            return Err(Error::InvalidShape(format!(
                "a GPU KV cache needs kv heads, an even head_dim ≤ 256 (got {head_dim}) and \
                 room for a token"
            )));
        }
        let limit = max_page
            .unwrap_or(g.caps.max_storage_binding)
            .min(g.caps.max_storage_binding)
            .min(g.caps.max_buffer);
        let per_pos = (kv_heads * head_dim * 2) as u64;
        let page_len = ((limit / per_pos) as usize).min(capacity);
        if page_len == 0 {
            return Err(Error::too_large("one KV cache position", per_pos, limit));
        }
        let pages = (0..capacity.div_ceil(page_len))
            .map(|p| {
                let n = page_len.min(capacity - p * page_len);
                let bytes = per_pos * n as u64;
                Ok((
                    storage(g, "kv cache keys", bytes)?,
                    storage(g, "kv cache values", bytes)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuKvLayer { pages, page_len })
    }

    /// Bytes of its buffers.
    pub fn bytes(&self) -> u64 {
        self.pages.iter().map(|(k, v)| k.size() + v.size()).sum()
    }
}

/// The uniform holding the position of a call's first query token.
pub struct DecodePos {
    buf: wgpu::Buffer,
}

impl DecodePos {
    /// A new position uniform (0).
    pub fn new(ctx: &Context) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        Ok(DecodePos {
            buf: crate::runtime::launch::uniform(g, "decode position", &[0u8; 16]),
        })
    }

    /// Writes `start` (queued before the next submission).
    pub fn set(&self, g: &GpuDevice, start: usize) {
        let v = [start as u32, 0, 0, 0];
        g.queue.write_buffer(&self.buf, 0, bytemuck::cast_slice(&v));
    }

    /// The buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buf
    }
}

/// A built cache attention for `tokens` query tokens of `heads` heads over a cache of
/// `capacity` positions in pages of `page_len` (a store and a split step per page).
pub struct DecodeAttentionGpu {
    shape: DecodeShape,
    splits: usize,
    store: Vec<Step<DecodeParams>>,
    split: Vec<Step<DecodeParams>>,
    combine: Step<DecodeParams>,
    part: wgpu::Buffer,
}

/// The shape of a cache attention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Query tokens per call.
    pub tokens: usize,
    /// Head dimension (even, ≤ 256).
    pub head_dim: usize,
    /// Cache positions.
    pub capacity: usize,
    /// Positions per cache page ([`GpuKvLayer::page_len`]; `capacity` for one page).
    pub page_len: usize,
    /// Sliding window (keys `pos − window < j ≤ pos`), if any.
    pub window: Option<usize>,
    /// Softmax scale.
    pub scale: f32,
}

impl DecodeAttentionGpu {
    /// Compiles the three kernels; `splits` key ranges per query row (1 ..= 1024).
    pub fn build(ctx: &Context, s: DecodeShape, splits: usize) -> Result<Self> {
        Self::build_on(ctx, s, splits, None)
    }

    /// The same attention with a sliding window of `window` keys, sharing this one's
    /// partial-state buffer (the two never run at once).
    pub fn with_window(&self, ctx: &Context, window: usize) -> Result<Self> {
        let s = DecodeShape {
            window: Some(window),
            ..self.shape
        };
        Self::build_on(ctx, s, self.splits, Some(self.part.clone()))
    }

    /// [`DecodeAttentionGpu::build`] on a given partial-state buffer, else a new one.
    fn build_on(
        ctx: &Context,
        s: DecodeShape,
        splits: usize,
        part: Option<wgpu::Buffer>,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        if s.heads == 0
            || s.kv_heads == 0
            || !s.heads.is_multiple_of(s.kv_heads)
            || s.tokens == 0
            || !s.head_dim.is_multiple_of(2)
            || s.head_dim > 256
            || !(1..=1024).contains(&splits)
            || s.capacity == 0
            || s.page_len == 0
        {
            return Err(Error::InvalidShape(format!(
                "cache attention {s:?} with {splits} splits: heads must be a multiple of \
                 kv_heads, head_dim even and ≤ 256, splits 1 ..= 1024, room and pages"
            )));
        }
        let pages = s.capacity.div_ceil(s.page_len);
        let p = DecodeParams {
            heads: s.heads as u32,
            kv_heads: s.kv_heads as u32,
            tokens: s.tokens as u32,
            d: s.head_dim as u32,
            cap: s.capacity as u32,
            splits: splits as u32,
            window: s.window.unwrap_or(0) as u32,
            scale: s.scale,
            page0: 0,
            page: 0,
            pages: pages as u32,
            _pad: 0,
        };
        let page = |i: usize| DecodeParams {
            page0: (i * s.page_len) as u32,
            page: i as u32,
            cap: s.page_len.min(s.capacity - i * s.page_len) as u32,
            ..p
        };
        let max = g.caps.max_workgroups_per_dim;
        let pairs = (s.kv_heads * s.tokens * s.head_dim / 2) as u64;
        let what = "cache attention";
        let split_grid = (
            splits as u32,
            check_axis(s.tokens as u64, max, what)?,
            check_axis(s.heads as u64, max, what)?,
        );
        let part = match part {
            Some(b) => b,
            None => {
                let bytes = (s.heads * s.tokens * pages * splits * (s.head_dim + 2) * 4) as u64;
                storage(g, "cache attention partial states", bytes)?
            }
        };
        Ok(DecodeAttentionGpu {
            shape: s,
            splits,
            store: (0..pages)
                .map(|i| {
                    let spec = decode_spec(DecodeKernel::Store);
                    Step::flat(ctx, &spec, &page(i), pairs.div_ceil(256))
                })
                .collect::<Result<_>>()?,
            split: (0..pages)
                .map(|i| Step::new(ctx, &decode_spec(DecodeKernel::Split), &page(i), split_grid))
                .collect::<Result<_>>()?,
            combine: Step::new(
                ctx,
                &decode_spec(DecodeKernel::Combine),
                &p,
                (split_grid.1, split_grid.2, 1),
            )?,
            part,
        })
    }

    /// Checks that `layer` has this attention's pages.
    fn check(&self, layer: &GpuKvLayer) -> Result<()> {
        if layer.page_len != self.shape.page_len || layer.pages.len() != self.split.len() {
            return Err(Error::Mismatch(format!(
                "a cache of {} pages of {} positions for an attention built for {} of {}",
                layer.pages.len(),
                layer.page_len,
                self.split.len(),
                self.shape.page_len
            )));
        }
        Ok(())
    }

    /// The dispatches (one per page) storing new rows `k` and `v` (`[kv_heads, tokens,
    /// head_dim]` f32) into `layer` at positions `start ..`.
    pub fn store(
        &self,
        g: &GpuDevice,
        pos: &DecodePos,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        layer: &GpuKvLayer,
    ) -> Result<Vec<Dispatch>> {
        self.check(layer)?;
        Ok(self
            .store
            .iter()
            .zip(&layer.pages)
            .flat_map(|(step, (kc, vc))| {
                [
                    step.dispatch(g, &[pos.buffer(), k, kc]),
                    step.dispatch(g, &[pos.buffer(), v, vc]),
                ]
            })
            .collect())
    }

    /// The dispatches of the attention of `q` (`[heads, tokens, head_dim]` f32) over
    /// `layer` into `out` (`[heads, tokens, head_dim]`): a split pass per page, then the
    /// merge.
    pub fn attend(
        &self,
        g: &GpuDevice,
        pos: &DecodePos,
        q: &wgpu::Buffer,
        layer: &GpuKvLayer,
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        self.check(layer)?;
        let mut list: Vec<Dispatch> = self
            .split
            .iter()
            .zip(&layer.pages)
            .map(|(step, (kc, vc))| step.dispatch(g, &[pos.buffer(), q, kc, vc, &self.part]))
            .collect();
        list.push(self.combine.dispatch(g, &[&self.part, out]));
        Ok(list)
    }
}
