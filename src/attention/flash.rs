//! Launcher of `shaders/flash_attention.wgsl`: picks the variant, cuts the problem into
//! dispatches that respect the binding and grid limits (see [`super::split`]), writes
//! each dispatch's parameters once at plan build time, and records the dispatches.
//!
//! The same launcher runs the two sparse executors (the kernel with another key loop,
//! [`KeyMode`]): block-sparse and stripe (gathered keys), both reading a LUT
//! ([`super::lut::SparseLut`] layout) from GPU buffers the caller binds at record time.

use std::sync::{Arc, OnceLock};

use super::split::{DenseDispatch, SplitLimits, SplitProblem, split_dense, split_sparse};
use super::{AttentionOptions, AttentionShape};
use crate::error::{Error, Result};
use crate::runtime::context::Context;
use crate::runtime::launch::Dispatch;
use crate::runtime::preprocess::Defines;
use crate::runtime::tensor::DType;
use crate::runtime::{BindingKind, Kernel, KernelSpec, Recorder};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters of one dispatch; mirrors `struct Params` in the WGSL.
    pub struct FlashParams {
        q_base: u32,
        k_base: u32,
        v_base: u32,
        o_base: u32,
        ml_base: u32,
        acc_base: u32,
        q_head_stride: u32,
        kv_head_stride: u32,
        ml_head_stride: u32,
        h0: u32,
        kv0: u32,
        group: u32,
        r0: u32,
        r1: u32,
        c0: u32,
        c1: u32,
        causal: u32,
        causal_shift: u32,
        scale: f32,
        lut_q_block: u32,
        lut_key_block: u32,
        lut_rows: u32,
        window: u32,
        sinks: u32,
    }
}

/// Which keys the kernel visits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyMode {
    /// Every key (dense).
    Range,
    /// Key blocks from a LUT of `key_block`-key blocks per `q_block` query rows.
    Blocks {
        /// Query rows per LUT row.
        q_block: usize,
        /// Keys per block (a multiple of 32).
        key_block: usize,
    },
    /// Gathered key positions from a LUT per `q_block` query rows.
    Gather {
        /// Query rows per LUT row.
        q_block: usize,
    },
}

impl KeyMode {
    fn q_block(self) -> Option<usize> {
        match self {
            KeyMode::Range => None,
            KeyMode::Blocks { q_block, .. } | KeyMode::Gather { q_block } => Some(q_block),
        }
    }
}

/// What one executor run computes beyond the shape and options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecConfig {
    /// Key source.
    pub keys: KeyMode,
    /// Sliding window (0 = none).
    pub window: usize,
    /// Sink keys kept despite the window.
    pub sinks: usize,
    /// Runs with a caller's row state write the final state back (off for a last pass
    /// that only needs the output).
    pub export_state: bool,
    /// When not 0, the caller's row state `acc` is held in buffers of this many heads
    /// each (a state over the buffer limit): no dispatch crosses one, and each binds
    /// its own.
    pub state_head_run: usize,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            keys: KeyMode::Range,
            window: 0,
            sinks: 0,
            export_state: true,
            state_head_run: 0,
        }
    }
}

/// A sub-range of a buffer to bind: byte offset, byte size, and the element offset of
/// the wanted start inside the binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SubRange {
    pub offset: u64,
    pub size: u64,
    pub base: u32,
}

/// Binds bytes `start..end`, starting the binding at `start` rounded down to `align`.
/// `unit` is the size of one addressed element (for the base).
pub(crate) fn sub_range(start: u64, end: u64, align: u64, unit: u64) -> SubRange {
    let offset = start / align * align;
    SubRange {
        offset,
        size: (end - offset).div_ceil(4) * 4,
        base: ((start - offset) / unit) as u32,
    }
}

/// The dispatches of one flash pass over `shape` (dense keys: the dense split; a LUT:
/// the sparse split, which never cuts keys) under `lim`: one function for the build and
/// the memory plan.
pub(crate) fn split_for(
    shape: &AttentionShape,
    dtype: DType,
    causal: bool,
    keys: KeyMode,
    lim: &SplitLimits,
) -> Result<Vec<DenseDispatch>> {
    let problem = SplitProblem {
        q_heads: shape.q_heads,
        kv_heads: shape.kv_heads,
        q_len: shape.seq_len,
        kv_len: shape.kv_len,
        head_dim: shape.head_dim,
        elem_bytes: dtype.size(),
        causal,
    };
    if keys == KeyMode::Range {
        return split_dense(&problem, lim);
    }
    if shape.kv_len != shape.seq_len {
        return Err(Error::InvalidShape(format!(
            "sparse attention needs as many keys as queries (prefill), got {} and {}",
            shape.kv_len, shape.seq_len
        )));
    }
    split_sparse(&problem, lim)
}

/// What one dispatch binds: Q (and the output, same layout), K (and V), and the f32
/// row state acc of its rows (the caller's or the sparse executor's).
pub(crate) struct DispatchRanges {
    pub q: SubRange,
    pub k: SubRange,
    pub acc: SubRange,
    /// The buffer of the row state `acc` that `acc` lies in (0 without a head run).
    pub acc_part: usize,
    pub ml: SubRange,
}

/// The byte ranges dispatch `x` binds for a problem of `shape` stored in `elem` bytes
/// per value, with binding offsets aligned to `align`: one function for the build and
/// the memory plan ([`super::plan`]). With a `head_run` (not 0) the row state `acc` is
/// held in buffers of that many heads, and its range is inside buffer `acc_part`.
pub(crate) fn dispatch_ranges(
    x: &DenseDispatch,
    shape: &AttentionShape,
    elem: u64,
    align: u64,
    head_run: usize,
) -> DispatchRanges {
    let (d, n, nk) = (
        shape.head_dim as u64,
        shape.seq_len as u64,
        shape.kv_len as u64,
    );
    let group = (shape.q_heads / shape.kv_heads) as u64;
    let (h0, h1, r0, r1) = (x.h0 as u64, x.h1 as u64, x.r0 as u64, x.r1 as u64);
    let (c0, c1) = (x.c0 as u64, x.c1 as u64);
    let kv0 = h0 / group;
    let kv1 = (h1 - 1) / group + 1;
    let q_start = (h0 * n + r0) * d;
    let q_end = ((h1 - 1) * n + r1) * d;
    let (acc_part, acc_h0) = match head_run as u64 {
        0 => (0, 0),
        run => (h0 / run, h0 / run * run),
    };
    let acc_shift = acc_h0 * n * d;
    DispatchRanges {
        q: sub_range(q_start * elem, q_end * elem, align, elem),
        k: sub_range(
            (kv0 * nk + c0) * d * elem,
            ((kv1 - 1) * nk + c1) * d * elem,
            align,
            elem,
        ),
        acc: sub_range((q_start - acc_shift) * 4, (q_end - acc_shift) * 4, align, 4),
        acc_part: acc_part as usize,
        ml: sub_range((h0 * n + r0) * 8, ((h1 - 1) * n + r1) * 8, align, 8),
    }
}

/// The flags of one dispatch's kernel variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Variant {
    import: bool,
    export: bool,
    write: bool,
}

/// Key-source flag of a variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum KeyFlag {
    Range,
    Blocks,
    Gather,
}

impl From<KeyMode> for KeyFlag {
    fn from(m: KeyMode) -> Self {
        match m {
            KeyMode::Range => KeyFlag::Range,
            KeyMode::Blocks { .. } => KeyFlag::Blocks,
            KeyMode::Gather { .. } => KeyFlag::Gather,
        }
    }
}

/// Where the row state of a run lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StateMode {
    /// The caller's `RowState` tensors (full `[heads, rows, ...]` layout).
    Caller,
    /// The plan's scratch (one chunk of rows), or nothing when a single pass suffices.
    Scratch,
}

struct Prepared {
    dispatch: DenseDispatch,
    bq: usize,
    spec: KernelSpec,
    /// Compiled at build time for the plain runs; for runs with a caller's row state
    /// only on the first such run (most plans never have one).
    kernel: OnceLock<Arc<Kernel>>,
    slot: u64,
    q: SubRange,
    k: SubRange,
    v: SubRange,
    o: SubRange,
    ml: Option<SubRange>,
    acc: Option<SubRange>,
    acc_part: usize,
}

/// The buffers one run binds: inputs, output, and the caller's (ml, acc) state if any.
pub(crate) struct FlashIo<'a> {
    pub q: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub o: &'a wgpu::Buffer,
    /// The caller's row state: `ml` and the buffers of `acc` (one, or one per run of
    /// [`ExecConfig::state_head_run`] heads).
    pub state: Option<(&'a wgpu::Buffer, &'a [wgpu::Buffer])>,
    /// LUT (ranges, indices) of the sparse modes.
    pub lut: Option<(&'a wgpu::Buffer, &'a wgpu::Buffer)>,
}

/// A built dense attention on a GPU context.
pub(crate) struct FlashGpu {
    keys: KeyMode,
    caller: Vec<Prepared>,
    scratch: Vec<Prepared>,
    params: wgpu::Buffer,
    scratch_ml: Option<wgpu::Buffer>,
    scratch_acc: Option<wgpu::Buffer>,
    /// Stand-ins for the unused (ml, acc) bindings: two buffers, because WebGPU forbids
    /// binding one buffer range to two writable bindings of a group (wgpu native does
    /// not check this; Chrome's Dawn does).
    dummy: [wgpu::Buffer; 2],
}

/// Workgroup bytes of the kernel with `bq` query rows: the Q chunk, the K/V tile
/// (padded), the P tile, the row stats and (sparse modes) the LUT slice bounds, each rounded to 16 bytes as drivers may.
/// Independent of head_dim: Q and K/V are staged 32 dimensions at a time.
pub fn dense_workgroup_bytes(bq: usize) -> u32 {
    (bq * 32 * 4 + 32 * 9 * 16 + 32 * bq * 4 + 3 * bq * 4 + 32) as u32
}

/// The tile configuration of the dense kernel for a device: query rows per workgroup,
/// 64 with 128 threads where the device allows it (measured faster on an H200: 10 vs
/// 7 TFLOP/s at d = 128), else 32 with 64 threads, which fits WebGPU's default limits.
///
/// (A variant that kept all of Q resident in workgroup memory was measured slower on
/// the H200, 6.8 TFLOP/s, because its 45 KiB per workgroup cut occupancy; removed.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DenseTiles {
    /// Query rows per workgroup (32 or 64).
    pub bq: usize,
}

impl DenseTiles {
    /// Chooses from the device limits.
    pub fn choose(caps: &crate::runtime::context::Capabilities) -> Self {
        let fits_64 =
            caps.max_invocations >= 128 && dense_workgroup_bytes(64) <= caps.max_workgroup_storage;
        DenseTiles {
            bq: if fits_64 { 64 } else { 32 },
        }
    }

    /// Chooses for a key mode: a workgroup's rows must lie in one LUT row.
    pub fn choose_for(caps: &crate::runtime::context::Capabilities, keys: KeyMode) -> Self {
        let t = Self::choose(caps);
        match keys.q_block() {
            Some(qb) if !qb.is_multiple_of(t.bq) => DenseTiles { bq: 32 },
            _ => t,
        }
    }
}

/// The matrix-unit flash kernel's tiling: cooperative-matrix tile `tile` (8 or 16),
/// `bq` query rows and `bk` keys per step, `wg` threads: `bq / (rt · tile)` subgroups,
/// each owning `rt` row tiles (its Q and output accumulator stay in registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoopTiles {
    /// Square cooperative-matrix tile: 8 or 16.
    pub tile: usize,
    /// Query rows per workgroup (a multiple of `rt · tile`).
    pub bq: usize,
    /// Keys per step (a multiple of `tile` that divides head_dim).
    pub bk: usize,
    /// Threads per workgroup: one subgroup per `rt` row tiles.
    pub wg: usize,
    /// Row tiles per subgroup.
    #[serde(default = "one")]
    pub rt: usize,
}

fn one() -> usize {
    1
}

impl CoopTiles {
    /// The tiling with `bq / (rt · tile)` subgroups of `subgroup` lanes.
    pub fn new(tile: usize, bq: usize, bk: usize, rt: usize, subgroup: usize) -> Self {
        CoopTiles {
            tile,
            bq,
            bk,
            wg: bq / (rt * tile) * subgroup,
            rt,
        }
    }
}

/// Workgroup bytes of the matrix-unit kernel: the K and V tile as f16 (rows padded by 8
/// halves), the f32 scores (rows padded by 4), the f16 weights (padded by 8), the four
/// row stats and the LUT bounds and rescale flag.
pub fn coop_workgroup_bytes(d: usize, bq: usize, bk: usize) -> u32 {
    (2 * bk * (d + 8) * 2 + bq * (bk + 4) * 4 + bq * (bk + 8) * 2 + 4 * bq * 4 + 16) as u32
}

/// Which flash kernel a plan runs: the portable one (any adapter, the browser) or the
/// matrix-unit one where the adapter has f16 cooperative matrices. Chosen in one place,
/// [`FlashKernel::choose`], from the capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kernel")]
pub enum FlashKernel {
    /// Vector FMAs (`shaders/attention/flash.wgsl`).
    Portable(DenseTiles),
    /// Cooperative matrices (`shaders/attention/flash_coop.wgsl`).
    Coop(CoopTiles),
}

impl FlashKernel {
    /// The matrix-unit kernel when the device has it ([`Capabilities::coop_tile`]), the
    /// storage is f16 (its operands are the stored values; f32 inputs would be rounded
    /// to f16, outside the f32 tolerance) and a tiling fits the workgroup memory and the
    /// key mode; else the portable kernel.
    ///
    /// [`Capabilities::coop_tile`]: crate::runtime::context::Capabilities::coop_tile
    pub fn choose(
        caps: &crate::runtime::context::Capabilities,
        keys: KeyMode,
        dtype: DType,
        head_dim: usize,
    ) -> Self {
        Self::choose_tuned(caps, keys, dtype, head_dim, None)
    }

    /// [`FlashKernel::choose`] preferring `tuned` (from [`super::tune`]) when the device
    /// can run it for this key mode (a tuned portable kernel takes the portable tiling
    /// of this key mode).
    pub fn choose_tuned(
        caps: &crate::runtime::context::Capabilities,
        keys: KeyMode,
        dtype: DType,
        head_dim: usize,
        tuned: Option<FlashKernel>,
    ) -> Self {
        let all = Self::candidates(caps, keys, dtype, head_dim);
        match tuned {
            Some(FlashKernel::Portable(_)) => *all.last().expect("the portable kernel"),
            Some(k) if all.contains(&k) => k,
            _ => all[0],
        }
    }

    /// Every kernel the device can run for this problem, the default choice first: the
    /// matrix-unit tilings that fit (largest first), then the portable kernel.
    pub fn candidates(
        caps: &crate::runtime::context::Capabilities,
        keys: KeyMode,
        dtype: DType,
        head_dim: usize,
    ) -> Vec<Self> {
        let mut out = vec![];
        // The kernel sizes its workgroup in subgroups: only a fixed subgroup width.
        let sg = caps.subgroup_max_size as usize;
        if let Some(t) = caps.coop_tile.map(|t| t as usize)
            && dtype == DType::F16
            && head_dim.is_multiple_of(t)
            && sg > 0
            && caps.subgroup_min_size as usize == sg
        {
            let fits = |c: &CoopTiles| {
                c.bq.is_multiple_of(c.rt * t)
                    && c.bk.is_multiple_of(t)
                    && head_dim.is_multiple_of(c.bk)
                    && coop_workgroup_bytes(head_dim, c.bq, c.bk) <= caps.max_workgroup_storage
                    && keys.q_block().is_none_or(|qb| qb.is_multiple_of(c.bq))
                    && match keys {
                        KeyMode::Blocks { key_block, .. } => key_block.is_multiple_of(c.bk),
                        _ => true,
                    }
                    && c.wg > 0
                    && c.wg <= caps.max_invocations as usize
            };
            for rt in [1, 2] {
                for (bq, bk) in [
                    (128, 32),
                    (64, 32),
                    (128, 16),
                    (64, 16),
                    (64, 64),
                    (32, 32),
                    (32, 16),
                    (16, 16),
                    (16, 8),
                    (8, 8),
                ] {
                    let c = CoopTiles::new(t, bq, bk, rt, sg);
                    if bq >= rt * t && fits(&c) {
                        out.push(FlashKernel::Coop(c));
                    }
                }
            }
        }
        out.push(FlashKernel::Portable(DenseTiles::choose_for(caps, keys)));
        out
    }

    /// Query rows per workgroup.
    pub fn bq(&self) -> usize {
        match self {
            FlashKernel::Portable(t) => t.bq,
            FlashKernel::Coop(t) => t.bq,
        }
    }
}

fn kernel_spec(
    d: usize,
    dtype: DType,
    kernel: FlashKernel,
    v: Variant,
    keys: KeyFlag,
) -> KernelSpec {
    let mut bindings = BindingKind::layout("urrrwww");
    if keys != KeyFlag::Range {
        bindings.extend(BindingKind::layout("rr"));
    }
    let defines = match kernel {
        FlashKernel::Portable(tiles) => Defines::new()
            .const_u32("NC", d.div_ceil(32) as u32)
            .flag_if("PARTIAL_CHUNK", !d.is_multiple_of(32))
            .const_u32("BQ", tiles.bq as u32)
            .const_u32("KPT", (32 * 8 / (2 * tiles.bq)) as u32),
        FlashKernel::Coop(t) => Defines::new()
            .flag_if("TILE16", t.tile == 16)
            .const_u32("BQ", t.bq as u32)
            .const_u32("BK", t.bk as u32)
            .const_u32("RTS", t.rt as u32)
            .const_u32("KT", (t.bk / t.tile) as u32)
            .const_u32("DT", (d / t.tile) as u32)
            .const_u32("NCH", (d / t.bk) as u32)
            .const_u32("WG", t.wg as u32)
            .const_u32("PF", (t.bk * d / 4).div_ceil(t.wg) as u32),
    };
    let (file, entry) = match kernel {
        FlashKernel::Portable(_) => ("attention/flash.wgsl", "flash_attention"),
        FlashKernel::Coop(_) => ("attention/flash_coop.wgsl", "flash_attention_coop"),
    };
    KernelSpec {
        file,
        entry,
        defines: defines
            .params::<FlashParams>()
            .const_u32("D", d as u32)
            .flag_if("STORE_F16", dtype == DType::F16)
            .flag_if("IMPORT_STATE", v.import)
            .flag_if("EXPORT_STATE", v.export)
            .flag_if("WRITE_OUTPUT", v.write)
            .flag_if("SPARSE_KEYS", keys != KeyFlag::Range)
            .flag_if("KEYS_BLOCKS", keys == KeyFlag::Blocks)
            .flag_if("KEYS_GATHER", keys == KeyFlag::Gather),
        bindings,
    }
}

/// Every row-state variant a plan can ask for (import, export, write: at least one
/// output) with every key source.
fn run_variants() -> impl Iterator<Item = (Variant, KeyFlag)> {
    (0..8u8)
        .map(|bits| Variant {
            import: bits & 1 != 0,
            export: bits & 2 != 0,
            write: bits & 4 != 0,
        })
        .filter(|v| v.export || v.write)
        .flat_map(|v| [KeyFlag::Range, KeyFlag::Blocks, KeyFlag::Gather].map(|k| (v, k)))
}

/// Every variant the dense family can compile, for the shader dump and portability tests.
/// Each needs [`dense_workgroup_bytes`] of workgroup memory; `BQ=32` fits WebGPU's
/// 16 KiB default (the portable fallback).
pub fn all_flash_variants() -> Vec<KernelSpec> {
    let mut out = vec![];
    let tiles = [32, 64].map(|bq| FlashKernel::Portable(DenseTiles { bq }));
    for (d, tiles) in [64, 128, 256]
        .into_iter()
        .flat_map(|d| tiles.map(move |t| (d, t)))
    {
        for dtype in [DType::F32, DType::F16] {
            for (v, keys) in run_variants() {
                out.push(kernel_spec(d, dtype, tiles, v, keys));
            }
        }
    }
    // A head_dim that is not a multiple of 32 (a half-empty last chunk): every key mode
    // and row-state variant at the browser's tiling.
    let tiles = FlashKernel::Portable(DenseTiles { bq: 32 });
    for dtype in [DType::F32, DType::F16] {
        for (v, keys) in run_variants() {
            out.push(kernel_spec(80, dtype, tiles, v, keys));
        }
    }
    out
}

/// Every matrix-unit variant at tile `tile` (8 or 16): d = 64/80/128/256, each key mode,
/// the row-state variants the plans use. f16 storage only. Translated to SPIR-V (and, at
/// tile 8, MSL) by the portability tests: HLSL and GLSL have no cooperative matrices.
pub fn all_coop_flash_variants(tile: usize) -> Vec<KernelSpec> {
    let mut out = vec![];
    // Subgroups as wide as the tile's device class: 32 lanes for 16x16 tiles, 8 for 8x8.
    let sg = if tile == 16 { 32 } else { 8 };
    for d in [64, 80, 128, 256] {
        let (bq, bk, rt) = match d {
            256 => (64, 16, 1),
            64 => (64, 32, 2),
            80 => (128, 16, 1),
            _ => (128, 32, 1),
        };
        let kernel = FlashKernel::Coop(CoopTiles::new(tile, bq, bk, rt, sg));
        for (v, keys) in run_variants() {
            out.push(kernel_spec(d, DType::F16, kernel, v, keys));
        }
    }
    out
}

impl FlashGpu {
    pub(crate) fn build(
        ctx: &Context,
        shape: &AttentionShape,
        opts: &AttentionOptions,
        exec: &ExecConfig,
    ) -> Result<Self> {
        let g = ctx.gpu().ok_or(Error::WrongContext)?;
        let caps = &g.caps;
        let lim = SplitLimits {
            head_run: exec.state_head_run,
            ..SplitLimits::from(&crate::runtime::memory::DeviceLimits::of(caps))
        };
        let dispatches = split_for(shape, opts.dtype, opts.causal, exec.keys, &lim)?;
        log::debug!("dense attention: {} dispatch(es)", dispatches.len());
        let align = lim.offset_align;
        let (d, n, nk) = (
            shape.head_dim as u64,
            shape.seq_len as u64,
            shape.kv_len as u64,
        );
        let s = opts.dtype.size() as u64;
        let group = (shape.q_heads / shape.kv_heads) as u64;
        let uniform_align = g.device.limits().min_uniform_buffer_offset_alignment as u64;
        let slot_size =
            (std::mem::size_of::<FlashParams>() as u64).div_ceil(uniform_align) * uniform_align;
        let tiles = match opts.kernel {
            Some(k) => {
                let ok = FlashKernel::candidates(caps, exec.keys, opts.dtype, shape.head_dim);
                if !ok.contains(&k) {
                    return Err(Error::InvalidArgument(format!(
                        "flash kernel {k:?} cannot run this plan on this device (possible: {ok:?})"
                    )));
                }
                k
            }
            None => {
                let tuned = super::tune::lookup::<FlashKernel>(&g.info, shape.head_dim);
                FlashKernel::choose_tuned(caps, exec.keys, opts.dtype, shape.head_dim, tuned)
            }
        };
        log::debug!("flash kernel: {tiles:?}");
        let (lut_q_block, lut_key_block) = match exec.keys {
            KeyMode::Range => (1, 32),
            KeyMode::Blocks { q_block, key_block } => (q_block, key_block),
            KeyMode::Gather { q_block } => (q_block, 32),
        };
        let needs_chain = dispatches.iter().any(|x| !(x.first && x.last));
        let scratch_rows = dispatches
            .iter()
            .filter(|x| !(x.first && x.last))
            .map(|x| (x.r1 - x.r0) as u64)
            .max()
            .unwrap_or(0);

        let mut params: Vec<u8> = vec![];
        let mut prepare = |mode: StateMode| -> Result<Vec<Prepared>> {
            let mut out = vec![];
            for x in &dispatches {
                let (h0, r0, r1) = (x.h0 as u64, x.r0 as u64, x.r1 as u64);
                let (c0, c1) = (x.c0 as u64, x.c1 as u64);
                let kv0 = h0 / group;
                let ranges = dispatch_ranges(x, shape, s, align, exec.state_head_run);
                let (q, k) = (ranges.q, ranges.k);
                let o = q;
                let v = k;
                let variant = Variant {
                    import: !x.first || (mode == StateMode::Caller && opts.import_state),
                    export: !x.last || (mode == StateMode::Caller && exec.export_state),
                    write: x.last,
                };
                let uses_state = variant.import || variant.export;
                let (ml, acc) = match (uses_state, mode) {
                    (false, _) => (None, None),
                    (true, StateMode::Caller) => (Some(ranges.ml), Some(ranges.acc)),
                    (true, StateMode::Scratch) => (
                        Some(SubRange {
                            offset: 0,
                            size: (r1 - r0) * 8,
                            base: 0,
                        }),
                        Some(SubRange {
                            offset: 0,
                            size: (r1 - r0) * d * 4,
                            base: 0,
                        }),
                    ),
                };
                let p = FlashParams {
                    q_base: q.base,
                    k_base: k.base,
                    v_base: v.base,
                    o_base: o.base,
                    ml_base: ml.map(|m| m.base).unwrap_or(0),
                    acc_base: acc.map(|a| a.base).unwrap_or(0),
                    q_head_stride: (n * d) as u32,
                    kv_head_stride: (nk * d) as u32,
                    ml_head_stride: n as u32,
                    h0: h0 as u32,
                    kv0: kv0 as u32,
                    group: group as u32,
                    r0: r0 as u32,
                    r1: r1 as u32,
                    c0: c0 as u32,
                    c1: c1 as u32,
                    causal: opts.causal as u32,
                    causal_shift: nk.saturating_sub(n) as u32,
                    scale: opts.scale_for(shape),
                    lut_q_block: lut_q_block as u32,
                    lut_key_block: lut_key_block as u32,
                    lut_rows: shape.seq_len.div_ceil(lut_q_block) as u32,
                    window: exec.window as u32,
                    sinks: exec.sinks as u32,
                };
                let slot = params.len() as u64;
                params.extend_from_slice(bytemuck::bytes_of(&p));
                params.resize((slot + slot_size) as usize, 0);
                let spec =
                    kernel_spec(shape.head_dim, opts.dtype, tiles, variant, exec.keys.into());
                let kernel = OnceLock::new();
                if mode == StateMode::Scratch {
                    let _ = kernel.set(ctx.kernel(&spec)?);
                }
                out.push(Prepared {
                    dispatch: *x,
                    bq: tiles.bq(),
                    spec,
                    kernel,
                    slot,
                    q,
                    k,
                    v,
                    o,
                    ml,
                    acc,
                    acc_part: match mode {
                        StateMode::Caller => ranges.acc_part,
                        StateMode::Scratch => 0,
                    },
                });
            }
            Ok(out)
        };
        let scratch = prepare(StateMode::Scratch)?;
        let caller = prepare(StateMode::Caller)?;
        let params_buf = g.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dense attention params"),
            size: params.len() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        g.queue.write_buffer(&params_buf, 0, &params);
        let storage = |label: &str, size: u64| {
            g.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size.max(16),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        Ok(FlashGpu {
            keys: exec.keys,
            caller,
            scratch,
            params: params_buf,
            scratch_ml: needs_chain
                .then(|| storage("dense attention scratch ml", scratch_rows * 8)),
            scratch_acc: needs_chain
                .then(|| storage("dense attention scratch acc", scratch_rows * d * 4)),
            dummy: [
                storage("dense attention unused ml binding", 16),
                storage("dense attention unused acc binding", 16),
            ],
        })
    }

    /// Number of dispatches a run records.
    pub(crate) fn dispatch_count(&self) -> usize {
        self.scratch.len()
    }

    /// Records the dense stage. `state` is the caller's (ml, acc) buffers, if any.
    pub(crate) fn record(
        &self,
        ctx: &Context,
        rec: &mut Recorder<'_>,
        stage: &str,
        io: &FlashIo<'_>,
    ) -> Result<()> {
        let g = rec.gpu();
        let (q, k, v, o) = (io.q, io.k, io.v, io.o);
        let scratch_acc = self.scratch_acc.as_slice();
        let (prepared, ml_buf, acc_bufs) = match io.state {
            Some((ml, acc)) => (&self.caller, Some(ml), acc),
            None => (&self.scratch, self.scratch_ml.as_ref(), scratch_acc),
        };
        let [dummy_ml, dummy_acc] = &self.dummy;
        let lut = match (self.keys, io.lut) {
            (KeyMode::Range, _) => None,
            (_, Some(l)) => Some(l),
            (_, None) => {
                return Err(Error::InvalidArgument(
                    "sparse executor recorded without its LUT buffers".into(),
                ));
            }
        };
        let list = prepared
            .iter()
            .map(|x| {
                let kernel = match x.kernel.get() {
                    Some(k) => k.clone(),
                    None => {
                        let k = ctx.kernel(&x.spec)?;
                        let _ = x.kernel.set(k.clone());
                        k
                    }
                };
                let ml = ml_buf.unwrap_or(dummy_ml);
                let acc = acc_bufs.get(x.acc_part).unwrap_or(dummy_acc);
                let entries = [
                    wgpu::BufferBinding {
                        buffer: &self.params,
                        offset: x.slot,
                        size: wgpu::BufferSize::new(std::mem::size_of::<FlashParams>() as u64),
                    },
                    bind_range(q, x.q),
                    bind_range(k, x.k),
                    bind_range(v, x.v),
                    bind_range(o, x.o),
                    x.ml.map_or(dummy_ml.as_entire_buffer_binding(), |r| bind_range(ml, r)),
                    x.acc
                        .map_or(dummy_acc.as_entire_buffer_binding(), |r| bind_range(acc, r)),
                ];
                let lut_entries =
                    lut.map(|(r, i)| [r.as_entire_buffer_binding(), i.as_entire_buffer_binding()]);
                let (gx, gy) = x.dispatch.grid(x.bq);
                let bindings = entries.into_iter().chain(lut_entries.into_iter().flatten());
                Ok(Dispatch::ranges(g, kernel, bindings, (gx, gy, 1)))
            })
            .collect::<Result<Vec<_>>>()?;
        rec.dispatch_stage(stage, &list);
        Ok(())
    }
}

fn bind_range(buf: &wgpu::Buffer, r: SubRange) -> wgpu::BufferBinding<'_> {
    wgpu::BufferBinding {
        buffer: buf,
        offset: r.offset,
        size: wgpu::BufferSize::new(r.size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::context::Capabilities;

    #[test]
    fn sub_range_aligns_down_and_keeps_the_residual_as_base() {
        let r = sub_range(1000, 2000, 256, 4);
        assert_eq!(
            r,
            SubRange {
                offset: 768,
                size: 1232,
                base: 58
            }
        );
        let r = sub_range(512, 514, 256, 2);
        assert_eq!(
            r,
            SubRange {
                offset: 512,
                size: 4,
                base: 0
            }
        );
    }

    #[test]
    fn variants_cover_dims_and_dtypes() {
        // d 64/128/256 at two tilings, and d 80 at the browser's: 2 dtypes, 6 row-state
        // variants, 3 key sources each.
        assert_eq!(all_flash_variants().len(), (3 * 2 + 1) * 2 * 6 * 3);
    }

    /// The one place the attention kernel is chosen: matrix units only with a coop tile,
    /// f16 storage, a head_dim the tile divides and a tiling that fits the workgroup
    /// memory and the key mode; the portable kernel otherwise (browsers, DX12, GL and
    /// f32 plans never get the coop kernel).
    #[test]
    fn kernel_choice_follows_the_capabilities() {
        let range = KeyMode::Range;
        let h200 = Capabilities::fake(Some(16), 48 * 1024, 32);
        let lvp = Capabilities::fake(Some(8), 32 * 1024, 8);
        fn coop(
            caps: &crate::runtime::context::Capabilities,
            keys: KeyMode,
            dtype: DType,
            d: usize,
        ) -> Option<(usize, usize, usize)> {
            match FlashKernel::choose(caps, keys, dtype, d) {
                FlashKernel::Coop(t) => Some((t.tile, t.bq, t.bk)),
                FlashKernel::Portable(_) => None,
            }
        }
        assert_eq!(coop(&h200, range, DType::F16, 128), Some((16, 128, 32)));
        assert_eq!(coop(&h200, range, DType::F16, 64), Some((16, 128, 32)));
        assert_eq!(coop(&lvp, range, DType::F16, 128), Some((8, 128, 16)));
        assert_eq!(coop(&lvp, range, DType::F16, 256), Some((8, 64, 16)));
        assert_eq!(coop(&h200, range, DType::F32, 128), None);
        assert_eq!(coop(&h200, range, DType::F16, 72), None);
        assert_eq!(
            coop(
                &Capabilities::fake(None, 48 * 1024, 32),
                range,
                DType::F16,
                128
            ),
            None
        );
        // 16 KiB of workgroup memory (WebGPU's default): a smaller tiling that fits.
        assert_eq!(
            coop(
                &Capabilities::fake(Some(16), 16 * 1024, 32),
                range,
                DType::F16,
                128
            ),
            Some((16, 32, 16))
        );
        assert!(coop_workgroup_bytes(128, 32, 16) <= 16 * 1024);
        // A workgroup's rows lie in one LUT row; LUT key blocks hold whole key steps.
        let blocks = KeyMode::Blocks {
            q_block: 64,
            key_block: 32,
        };
        assert_eq!(coop(&h200, blocks, DType::F16, 128), Some((16, 64, 32)));
        let narrow = KeyMode::Blocks {
            q_block: 16,
            key_block: 16,
        };
        assert_eq!(coop(&h200, narrow, DType::F16, 128), Some((16, 16, 16)));
        // The workgroup is sized in subgroups: a device whose subgroup width varies
        // (16 to 64 lanes) gets the portable kernel.
        let mut varying = h200.clone();
        varying.subgroup_min_size = 16;
        varying.subgroup_max_size = 64;
        assert_eq!(coop(&varying, range, DType::F16, 128), None);
        // Every tiling offered sizes its workgroup as its subgroups need.
        for k in FlashKernel::candidates(&h200, range, DType::F16, 128) {
            if let FlashKernel::Coop(t) = k {
                assert_eq!(t.wg, t.bq / (t.rt * t.tile) * 32, "{t:?}");
            }
        }
    }

    /// A tuned choice wins when the device can run it for the plan; otherwise (or
    /// without one) the default.
    #[test]
    fn tuned_kernels_are_preferred_when_they_fit() {
        let caps = Capabilities::fake(Some(16), 48 * 1024, 32);
        let range = KeyMode::Range;
        let small = FlashKernel::Coop(CoopTiles::new(16, 16, 16, 1, 32));
        let pick = |t| FlashKernel::choose_tuned(&caps, range, DType::F16, 128, t);
        assert_eq!(pick(Some(small)), small);
        assert_eq!(
            pick(None),
            FlashKernel::choose(&caps, range, DType::F16, 128)
        );
        let portable = FlashKernel::Portable(DenseTiles { bq: 32 });
        assert!(matches!(pick(Some(portable)), FlashKernel::Portable(_)));
        let too_big = FlashKernel::Coop(CoopTiles::new(16, 128, 64, 1, 32));
        assert_eq!(pick(Some(too_big)), pick(None));
        // A tiling whose rows straddle the LUT rows of a block-sparse plan is not used.
        let blocks = KeyMode::Blocks {
            q_block: 16,
            key_block: 16,
        };
        let wide = FlashKernel::Coop(CoopTiles::new(16, 32, 32, 1, 32));
        let got = FlashKernel::choose_tuned(&caps, blocks, DType::F16, 128, Some(wide));
        assert_ne!(got, wide);
    }
}
