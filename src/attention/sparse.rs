//! The two-pass sparse executor every data-dependent method runs on:
//!
//! 1. **exact pass**: the flash kernel over a fixed block LUT of the selector (sinks,
//!    local band, own group…), exporting the row state `(m, l, acc)`;
//! 2. **selection**: the selector's kernels read Q, K and the exported `(m, l)` and write
//!    one flag per candidate, compacted on the GPU into a LUT (one fixed-capacity slice
//!    of an index buffer per LUT row, starts in `row_base`);
//! 3. **sparse pass**: the flash kernel over that LUT (key blocks or gathered keys),
//!    importing the row state and writing the output.
//!
//! All of it is recorded into one submission. The CPU twin [`two_pass_cpu`] runs the same
//! three steps on the host. A method is a [`Selector`]; nothing here knows which one.

use std::sync::Arc;

use super::flash::{ExecConfig, FlashGpu, FlashIo, KeyMode};
use super::flash_cpu::{CpuAttention, HostRowState, attention_cpu};
use super::lut::{LutUnit, SparseLut};
use super::select::{GpuSelection, MethodStats, SelectBuild, SelectInput, SelectIo, Selector};
pub use super::select::{PassPairs, SelectionLayout};
use super::{AttentionOptions, AttentionShape};
use crate::error::{Error, Result};
use crate::runtime::Recorder;
use crate::runtime::context::{Context, GpuDevice};
use crate::runtime::launch::{storage, storage_init, storage_ranged};
use crate::runtime::tensor::read_buffer;

/// What [`two_pass_cpu`] returns: the output, the selected LUT, what the selection
/// returned beside it, and the final `(m, l)` of every row.
#[derive(Clone, Debug)]
pub struct TwoPassRun<S> {
    /// `[q_heads, seq_len, head_dim]`.
    pub out: Vec<f32>,
    /// The LUT of the sparse pass.
    pub selected: SparseLut,
    /// The selection's own details (margins, quantized data…).
    pub detail: S,
    /// Final `(m, l)` per row, `[q_heads, seq_len, 2]`.
    pub ml: Vec<f32>,
    /// Pair counts of both passes.
    pub pairs: PassPairs,
    /// Milliseconds of the exact pass, the selection and the sparse pass (wall clock).
    pub ms: [f64; 3],
}

/// The two-pass executor on the host: exact pass over `exact`, `select(ml)` on its row
/// state (a LUT in `layout`), sparse pass over the returned LUT continuing the state.
pub fn two_pass_cpu<S>(
    shape: &AttentionShape,
    (exact, layout): (&SparseLut, &SelectionLayout),
    scale: f32,
    (q, k, v): (&[f32], &[f32], &[f32]),
    select: impl FnOnce(&[f32]) -> Result<(SparseLut, S)>,
) -> Result<TwoPassRun<S>> {
    let mut st = HostRowState::empty(shape);
    let exec = |lut| CpuAttention::sparse(scale, lut);
    let clock = crate::runtime::Instant::now();
    let since = |t: &crate::runtime::Instant| t.elapsed().as_secs_f64() * 1e3;
    attention_cpu(shape, &exec(exact), q, k, v, Some(&mut st));
    let exact_ms = since(&clock);
    let (selected, detail) = select(&st.ml)?;
    let select_ms = since(&clock) - exact_ms;
    let out = attention_cpu(shape, &exec(&selected), q, k, v, Some(&mut st));
    let sparse_ms = since(&clock) - exact_ms - select_ms;
    let pairs = PassPairs::new(shape, exact, layout, &selected.counts());
    Ok(TwoPassRun {
        out,
        selected,
        detail,
        ml: st.ml,
        pairs,
        ms: [exact_ms, select_ms, sparse_ms],
    })
}

/// A selector's run on the host through the plan: output, the exact and the selected
/// LUTs, statistics, final `(m, l)` and the stage times (the exact pass, the selection
/// as `estimate`, the sparse pass).
pub(crate) struct CpuSparseRun {
    pub out: Vec<f32>,
    pub luts: Vec<SparseLut>,
    pub stats: MethodStats,
    pub ml: Vec<f32>,
    pub stages: Vec<crate::runtime::StageTime>,
}

/// Runs `selector` on the host (the plan's CPU path).
pub(crate) fn run_cpu(
    selector: &dyn Selector,
    shape: &AttentionShape,
    scale: f32,
    qkv: (&[f32], &[f32], &[f32]),
) -> Result<CpuSparseRun> {
    let exact = selector.exact_lut(shape)?;
    let layout = selector.layout(shape)?;
    let run = two_pass_cpu(shape, (&exact, &layout), scale, qkv, |ml| {
        let input = SelectInput {
            shape,
            scale,
            q: qkv.0,
            k: qkv.1,
            ml,
        };
        let sel = selector.select_cpu(&input)?;
        Ok((sel.lut, sel.detail))
    })?;
    let stats = selector.stats(shape, run.pairs, &run.selected.counts(), &run.detail);
    let [exact_name, sparse_name] = selector.pass_names();
    let stages = [exact_name, "estimate", sparse_name]
        .into_iter()
        .zip(run.ms)
        .map(|(name, ms)| crate::runtime::StageTime::host(name, ms))
        .collect();
    Ok(CpuSparseRun {
        out: run.out,
        luts: vec![exact, run.selected],
        stats,
        ml: run.ml,
        stages,
    })
}

/// Buffers of one sparse plan: the exact LUT, the row state, the selected LUT.
struct SparseBuffers {
    exact_ranges: wgpu::Buffer,
    exact_idx: wgpu::Buffer,
    ml: wgpu::Buffer,
    /// One buffer, or one per run of [`SparseSizes::acc_head_run`] heads.
    acc: Vec<wgpu::Buffer>,
    row_base: wgpu::Buffer,
    ranges: wgpu::Buffer,
    indices: wgpu::Buffer,
}

/// The bytes of the two-pass executor's own buffers: one list for its build and the
/// memory plan ([`super::plan`]). The row state `acc` is bound by the flash passes' row
/// ranges (and held in several buffers when it is over the buffer limit); the others
/// whole.
pub(crate) struct SparseSizes {
    pub exact_ranges: u64,
    pub exact_indices: u64,
    pub ml: u64,
    pub acc: u64,
    pub row_base: u64,
    pub ranges: u64,
    pub indices: u64,
    q_heads: usize,
}

impl SparseSizes {
    /// For `shape` with the exact pass's LUT `exact` and a selection of `rows` LUT rows
    /// holding `total` entries.
    pub(crate) fn of(shape: &AttentionShape, exact: &SparseLut, rows: usize, total: u64) -> Self {
        let (h, n, d) = (
            shape.q_heads as u64,
            shape.seq_len as u64,
            shape.head_dim as u64,
        );
        SparseSizes {
            exact_ranges: exact.ranges.len() as u64 * 8,
            exact_indices: exact.indices.len().max(1) as u64 * 4,
            ml: h * n * 8,
            acc: h * n * d * 4,
            row_base: rows as u64 * 4,
            ranges: rows as u64 * 8,
            indices: total.max(1) * 4,
            q_heads: shape.q_heads,
        }
    }

    /// Heads per buffer of the row state `acc` under a buffer limit: 0 when it fits
    /// one buffer, else the most whole heads a buffer holds (a typed error when one
    /// head is over the limit).
    pub(crate) fn acc_head_run(&self, max_buffer: u64) -> Result<usize> {
        if self.acc <= max_buffer {
            return Ok(0);
        }
        let head = self.acc / self.q_heads.max(1) as u64;
        match (max_buffer / head.max(1)) as usize {
            0 => Err(Error::too_large(
                "one head of the two-pass row state acc (one buffer)",
                head,
                max_buffer,
            )),
            run => Ok(run),
        }
    }

    /// The bytes of each buffer of the row state `acc` for a head run.
    pub(crate) fn acc_parts(&self, head_run: usize) -> Vec<u64> {
        if head_run == 0 {
            return vec![self.acc];
        }
        let head = self.acc / self.q_heads.max(1) as u64;
        (0..self.q_heads)
            .step_by(head_run)
            .map(|h0| (head_run.min(self.q_heads - h0)) as u64 * head)
            .collect()
    }
}

/// A selector on the two-pass executor, on a GPU context.
pub(crate) struct SparseGpu {
    selector: Arc<dyn Selector>,
    shape: AttentionShape,
    exact_lut: SparseLut,
    layout: SelectionLayout,
    exact_exec: FlashGpu,
    sparse_exec: FlashGpu,
    select: Box<dyn GpuSelection>,
    bufs: SparseBuffers,
}

impl SparseGpu {
    /// Builds the passes and the selector's kernels. The plan builder has checked the
    /// selector against the shape and the options (causal, square, no imported state).
    pub(crate) fn build(
        ctx: &Context,
        shape: &AttentionShape,
        opts: &AttentionOptions,
        selector: Arc<dyn Selector>,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let exact_lut = selector.exact_lut(shape)?;
        let layout = selector.layout(shape)?;
        let (row_base, total) = layout.row_base()?;
        let name = selector.name();
        // `storage` checks each buffer against the binding limit (a typed TooLarge
        // names it); the accumulator only against the buffer limit: the flash passes
        // bind it by row ranges, split like Q and the output (at 128k × 32 heads × d 128
        // it is 2 GiB, over an H200's 2 GiB − 4 binding).
        let sizes = SparseSizes::of(shape, &exact_lut, row_base.len(), total);
        let head_run = sizes.acc_head_run(g.caps.max_buffer)?;
        let exact_exec = FlashGpu::build(
            ctx,
            shape,
            &AttentionOptions {
                import_state: false,
                ..opts.clone()
            },
            &ExecConfig {
                keys: KeyMode::Blocks {
                    q_block: exact_lut.q_block,
                    key_block: match exact_lut.unit {
                        LutUnit::Blocks(kb) => kb,
                        LutUnit::Keys => {
                            return Err(Error::InvalidArgument(format!(
                                "{name}: the exact pass needs a block LUT"
                            )));
                        }
                    },
                },
                state_head_run: head_run,
                ..Default::default()
            },
        )?;
        // The final (m, l) gives the attention-mass recall: the sparse pass exports it.
        let sparse_exec = FlashGpu::build(
            ctx,
            shape,
            &AttentionOptions {
                import_state: true,
                ..opts.clone()
            },
            &ExecConfig {
                keys: layout.keys(),
                export_state: true,
                state_head_run: head_run,
                ..Default::default()
            },
        )?;
        let label = |what: &str| format!("{name} {what}");
        let bufs = SparseBuffers {
            exact_ranges: storage_init(
                g,
                &label("exact lut ranges"),
                bytemuck::cast_slice(&exact_lut.ranges),
            )?,
            exact_idx: storage_init(
                g,
                &label("exact lut indices"),
                bytemuck::cast_slice(&exact_lut.indices),
            )?,
            ml: storage(g, &label("row state ml"), sizes.ml)?,
            acc: sizes
                .acc_parts(head_run)
                .into_iter()
                .map(|b| storage_ranged(g, &label("row state acc"), b))
                .collect::<Result<_>>()?,
            row_base: storage_init(
                g,
                &label("selected slice starts"),
                bytemuck::cast_slice(&row_base),
            )?,
            ranges: storage(g, &label("selected lut ranges"), sizes.ranges)?,
            indices: storage(g, &label("selected lut indices"), sizes.indices)?,
        };
        let select = selector.build_gpu(&SelectBuild {
            ctx,
            shape,
            opts,
            layout: &layout,
        })?;
        Ok(SparseGpu {
            selector,
            shape: *shape,
            exact_lut,
            layout,
            exact_exec,
            sparse_exec,
            select,
            bufs,
        })
    }

    /// Timed stages a run records.
    pub(crate) fn stage_count(&self) -> u32 {
        2 + self.select.counts().0
    }

    /// Dispatches a run records.
    pub(crate) fn dispatch_count(&self) -> usize {
        self.exact_exec.dispatch_count()
            + self.select.counts().1
            + self.sparse_exec.dispatch_count()
    }

    /// The selector's GPU part (tests downcast it to inspect selector state).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn selection_gpu(&self) -> &dyn GpuSelection {
        &*self.select
    }

    /// The row state `(m, l)` buffer.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn ml_buffer(&self) -> &wgpu::Buffer {
        &self.bufs.ml
    }

    /// Records exact pass, selection and sparse pass.
    pub(crate) fn record(
        &self,
        ctx: &Context,
        rec: &mut Recorder<'_>,
        [q, k, v, out]: [&wgpu::Buffer; 4],
    ) -> Result<()> {
        let b = &self.bufs;
        let io = SelectIo {
            q,
            k,
            ml: &b.ml,
            row_base: &b.row_base,
            ranges: &b.ranges,
            indices: &b.indices,
        };
        self.select.record_before(rec, &io)?;
        let [exact_name, sparse_name] = self.selector.pass_names();
        let pass = |ranges, indices| FlashIo {
            q,
            k,
            v,
            o: out,
            state: Some((&b.ml, b.acc.as_slice())),
            lut: Some((ranges, indices)),
        };
        let exact = pass(&b.exact_ranges, &b.exact_idx);
        self.exact_exec.record(ctx, rec, exact_name, &exact)?;
        self.select.record(rec, &io)?;
        let sparse = pass(&b.ranges, &b.indices);
        self.sparse_exec.record(ctx, rec, sparse_name, &sparse)
    }

    async fn read_ranges(&self, g: &GpuDevice) -> Result<Vec<[u32; 2]>> {
        let rows = self.layout.capacity.len();
        let bytes = read_buffer(g, &self.bufs.ranges, 0, (rows * 8) as u64).await?;
        let words: &[u32] = bytemuck::cast_slice(&bytes);
        Ok(words.chunks_exact(2).map(|c| [c[0], c[1]]).collect())
    }

    /// Statistics of the last run (reads the selected LUT's ranges back).
    pub(crate) async fn stats(&self, ctx: &Context) -> Result<MethodStats> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let counts: Vec<u32> = self
            .read_ranges(g)
            .await?
            .iter()
            .map(|[a, b]| b - a)
            .collect();
        let pairs = PassPairs::new(&self.shape, &self.exact_lut, &self.layout, &counts);
        let detail = match self.select.detail() {
            Some(buf) => {
                let bytes = read_buffer(g, buf, 0, buf.size()).await?;
                bytemuck::cast_slice(&bytes).to_vec()
            }
            None => vec![],
        };
        Ok(self.selector.stats(&self.shape, pairs, &counts, &detail))
    }

    /// Final `(m, l)` of every row of the last run, `[q_heads, seq_len, 2]`.
    pub(crate) async fn row_stats(&self, ctx: &Context) -> Result<Vec<f32>> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let size = (self.shape.q_heads * self.shape.seq_len * 8) as u64;
        let bytes = read_buffer(g, &self.bufs.ml, 0, size).await?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    /// The exact pass's LUT and the LUT the last run selected (read back).
    pub(crate) async fn selection(&self, ctx: &Context) -> Result<(SparseLut, SparseLut)> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let ranges = self.read_ranges(g).await?;
        let size = self.bufs.indices.size();
        let bytes = read_buffer(g, &self.bufs.indices, 0, size).await?;
        let idx: &[u32] = bytemuck::cast_slice(&bytes);
        let rows = self.shape.seq_len.div_ceil(self.layout.q_block);
        let selected = SparseLut::from_fn(
            self.shape.q_heads,
            self.shape.seq_len,
            self.layout.q_block,
            self.layout.unit,
            |h, r| {
                let [a, b] = ranges[h * rows + r];
                idx[a as usize..b as usize].to_vec()
            },
        )?;
        Ok((self.exact_lut.clone(), selected))
    }
}
