//! Memory plans without a device: every buffer an attention plan would allocate, its
//! size and how it is bound (whole, or by ranges across dispatches), checked against a
//! device's limits — the H200's, the browser's default WebGPU limits, lavapipe's, or any
//! given ones. `wgsparse attention --dry-run` prints this; the planning tests run it at
//! 128k and 256k tokens for every method.
//!
//! The sizes come from the same functions the builders allocate with (the flash
//! executor's split, the sparse executor's LUT layout, each selector's
//! [`super::select::Selector::plan_buffers`]), so a plan that fits here builds there.

use std::fmt;

use serde::Serialize;

use super::AttentionShape;
use super::flash::{ExecConfig, KeyMode, dispatch_ranges, split_for};
use super::lut::LutUnit;
use super::method::Method;
use super::sparse::SparseSizes;
use crate::error::{Error, Result};
use crate::runtime::dtype::DType;
pub use crate::runtime::memory::{Binding, DeviceLimits, PlannedBuffer};

/// The memory plan of one attention problem on one set of limits.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryPlan {
    /// The method's name.
    pub method: String,
    /// The problem.
    pub shape: AttentionShape,
    /// Storage dtype.
    pub dtype: &'static str,
    /// The limits planned for.
    pub limits: DeviceLimits,
    /// Every buffer: the caller's tensors and the plan's own.
    pub buffers: Vec<PlannedBuffer>,
    /// Dispatches per pass (name, count).
    pub dispatches: Vec<(String, usize)>,
    /// What does not fit (empty when the plan fits): `NAME: …` for a buffer of
    /// [`MemoryPlan::buffers`], `pass NAME: …` for a pass that cannot be split at all
    /// (one tile over a binding).
    pub problems: Vec<String>,
}

impl MemoryPlan {
    /// Whether every buffer fits a buffer and every binding a binding.
    pub fn fits(&self) -> bool {
        self.problems.is_empty()
    }

    /// The plan's own bytes (without the caller's Q, K, V and output).
    pub fn own_bytes(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|b| !is_tensor(&b.name))
            .map(|b| b.bytes)
            .sum()
    }

    fn check(mut self) -> Self {
        let lim = self.limits;
        for b in &self.buffers {
            if b.bytes > lim.max_buffer {
                self.problems.push(format!(
                    "{}: {} bytes, over the buffer limit {}",
                    b.name, b.bytes, lim.max_buffer
                ));
            } else if b.largest_binding() > lim.max_binding {
                self.problems.push(format!(
                    "{}: a binding of {} bytes, over the binding limit {}",
                    b.name,
                    b.largest_binding(),
                    lim.max_binding
                ));
            }
        }
        self
    }
}

fn is_tensor(name: &str) -> bool {
    matches!(name, "Q" | "K" | "V" | "O")
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shape;
        writeln!(
            f,
            "{} attention plan: {} q-heads / {} kv-heads x {} tokens x d={} {}",
            self.method, s.q_heads, s.kv_heads, s.seq_len, s.head_dim, self.dtype
        )?;
        writeln!(
            f,
            "  limits: binding {}, buffer {}, offset alignment {}",
            mib(self.limits.max_binding),
            mib(self.limits.max_buffer),
            self.limits.offset_align
        )?;
        for b in &self.buffers {
            let how = match b.binding {
                Binding::Whole => "bound whole".to_string(),
                Binding::Ranges { largest, pieces } => {
                    format!("bound in {pieces} range(s), largest {}", mib(largest))
                }
            };
            writeln!(f, "  {:<44} {:>12}  {how}", b.name, mib(b.bytes))?;
        }
        let n: usize = self.dispatches.iter().map(|(_, c)| c).sum();
        let per: Vec<String> = self
            .dispatches
            .iter()
            .map(|(p, c)| format!("{p} {c}"))
            .collect();
        writeln!(f, "  dispatches: {n} ({})", per.join(", "))?;
        writeln!(f, "  plan's own memory: {}", mib(self.own_bytes()))?;
        if self.fits() {
            write!(f, "  fits")
        } else {
            write!(f, "  does NOT fit:")?;
            for p in &self.problems {
                write!(f, "\n    {p}")?;
            }
            Ok(())
        }
    }
}

fn mib(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{b} B")
    }
}

/// The bindings of a flash executor pass: Q/O and K/V by ranges, the row state by
/// ranges (the caller's, for a pass that imports or exports it), and the scratch state
/// of chained key chunks.
pub(crate) struct FlashBindings {
    pub dispatches: usize,
    pub q_largest: u64,
    pub kv_largest: u64,
    pub state_largest: u64,
    pub scratch_rows: u64,
}

/// Plans one flash pass (the same split as [`super::flash::FlashGpu`]'s build).
pub(crate) fn plan_flash(
    shape: &AttentionShape,
    dtype: DType,
    causal: bool,
    exec: &ExecConfig,
    lim: &DeviceLimits,
) -> Result<FlashBindings> {
    let dispatches = split_for(shape, dtype, causal, exec.keys, &lim.into())?;
    let mut out = FlashBindings {
        dispatches: dispatches.len(),
        q_largest: 0,
        kv_largest: 0,
        state_largest: 0,
        scratch_rows: 0,
    };
    for x in &dispatches {
        let r = dispatch_ranges(x, shape, dtype.size() as u64, lim.offset_align);
        out.q_largest = out.q_largest.max(r.q.size);
        out.kv_largest = out.kv_largest.max(r.k.size);
        out.state_largest = out.state_largest.max(r.acc.size);
        if !(x.first && x.last) {
            out.scratch_rows = out.scratch_rows.max((x.r1 - x.r0) as u64);
        }
    }
    Ok(out)
}

/// The memory plan of `method` on `shape` with `dtype` storage under `limits`, without
/// a device: every buffer, its binding, and what does not fit. An error only for a
/// problem no limit could fix (a bad shape or configuration) or a split that cannot be
/// made (one tile over a binding).
pub fn plan(
    shape: &AttentionShape,
    method: &Method,
    dtype: DType,
    causal: bool,
    limits: &DeviceLimits,
) -> Result<MemoryPlan> {
    shape.validate(causal)?;
    let (hq, hk, n, nk, d) = (
        shape.q_heads as u64,
        shape.kv_heads as u64,
        shape.seq_len as u64,
        shape.kv_len as u64,
        shape.head_dim as u64,
    );
    let es = dtype.size() as u64;
    let mut buffers = vec![];
    let mut dispatches = vec![];
    let mut problems = vec![];
    // The caller's tensors: bound by the ranges of the passes' dispatches.
    let mut q_largest = 0u64;
    let mut kv_largest = 0u64;
    let mut pieces = 0usize;
    let mut flash =
        |name: &str, exec: &ExecConfig, state: bool, buffers: &mut Vec<_>| match plan_flash(
            shape, dtype, causal, exec, limits,
        ) {
            Ok(fb) => {
                q_largest = q_largest.max(fb.q_largest);
                kv_largest = kv_largest.max(fb.kv_largest);
                pieces = pieces.max(fb.dispatches);
                dispatches.push((name.to_string(), fb.dispatches));
                if fb.scratch_rows > 0 {
                    buffers.push(PlannedBuffer::whole(
                        format!("{name}: chained key chunks' ml"),
                        fb.scratch_rows * 8,
                    ));
                    buffers.push(PlannedBuffer::whole(
                        format!("{name}: chained key chunks' acc"),
                        fb.scratch_rows * d * 4,
                    ));
                }
                if state { Some(fb.state_largest) } else { None }
            }
            Err(e) => {
                problems.push(format!("pass {name}: {e}"));
                None
            }
        };
    let lut_buffers = |name: &str, rows: u64, entries: u64| {
        [
            PlannedBuffer::whole(format!("{name} LUT ranges"), rows * 8),
            PlannedBuffer::whole(format!("{name} LUT indices"), entries.max(1) * 4),
        ]
    };
    match method {
        Method::Dense => {
            flash("dense", &ExecConfig::default(), false, &mut buffers);
        }
        Method::Window(w) => {
            let lut = w.lut(shape.q_heads, shape.seq_len)?;
            let exec = ExecConfig {
                keys: KeyMode::Blocks {
                    q_block: lut.q_block,
                    key_block: 64,
                },
                window: w.window,
                sinks: w.sinks,
                ..Default::default()
            };
            flash("window", &exec, false, &mut buffers);
            buffers.extend(lut_buffers(
                "window",
                lut.ranges.len() as u64,
                lut.indices.len() as u64,
            ));
        }
        Method::BlockSparse(lut) | Method::Stripes(lut) => {
            let keys = match lut.unit {
                LutUnit::Blocks(kb) => KeyMode::Blocks {
                    q_block: lut.q_block,
                    key_block: kb,
                },
                LutUnit::Keys => KeyMode::Gather {
                    q_block: lut.q_block,
                },
            };
            let exec = ExecConfig {
                keys,
                ..Default::default()
            };
            flash(method.name(), &exec, false, &mut buffers);
            buffers.extend(lut_buffers(
                method.name(),
                lut.ranges.len() as u64,
                lut.indices.len() as u64,
            ));
        }
        m => {
            let sel = m.selector().ok_or_else(|| {
                Error::InvalidArgument(format!("{} has no memory plan", m.name()))
            })?;
            sel.validate(shape)?;
            let exact = sel.exact_lut(shape)?;
            let layout = sel.layout(shape)?;
            let (row_base, total) = layout.row_base()?;
            let LutUnit::Blocks(kb) = exact.unit else {
                return Err(Error::InvalidArgument(format!(
                    "{}: the exact pass needs a block LUT",
                    sel.name()
                )));
            };
            let exact_exec = ExecConfig {
                keys: KeyMode::Blocks {
                    q_block: exact.q_block,
                    key_block: kb,
                },
                ..Default::default()
            };
            let sparse_exec = ExecConfig {
                keys: layout.keys(),
                export_state: true,
                ..Default::default()
            };
            let [p0, p1] = sel.pass_names();
            let s0 = flash(p0, &exact_exec, true, &mut buffers);
            let s1 = flash(p1, &sparse_exec, true, &mut buffers);
            let name = sel.name();
            let sz = SparseSizes::of(shape, &exact, row_base.len(), total);
            let whole = |what: &str, bytes| PlannedBuffer::whole(format!("{name} {what}"), bytes);
            buffers.extend([
                whole("exact LUT ranges", sz.exact_ranges),
                whole("exact LUT indices", sz.exact_indices),
                whole("row state ml", sz.ml),
                PlannedBuffer {
                    name: format!("{name} row state acc"),
                    bytes: sz.acc,
                    binding: Binding::Ranges {
                        largest: s0.unwrap_or(sz.acc).max(s1.unwrap_or(sz.acc)),
                        pieces: dispatches.iter().map(|(_, c)| *c).max().unwrap_or(1),
                    },
                },
                whole("selected slice starts", sz.row_base),
                whole("selected LUT ranges", sz.ranges),
                whole("selected LUT indices", sz.indices),
            ]);
            let (own, passes) = sel.plan_buffers(shape, dtype, limits);
            buffers.extend(own);
            dispatches.extend(passes);
        }
    }
    let tensor = |name: &str, bytes: u64, largest: u64| PlannedBuffer {
        name: name.into(),
        bytes,
        binding: if largest == 0 {
            Binding::Whole
        } else {
            Binding::Ranges {
                largest,
                pieces: pieces.max(1),
            }
        },
    };
    let mut all = vec![
        tensor("Q", hq * n * d * es, q_largest),
        tensor("K", hk * nk * d * es, kv_largest),
        tensor("V", hk * nk * d * es, kv_largest),
        tensor("O", hq * n * d * es, q_largest),
    ];
    all.extend(buffers);
    Ok(MemoryPlan {
        method: method.to_string(),
        shape: *shape,
        dtype: dtype.name(),
        limits: *limits,
        buffers: all,
        dispatches,
        problems,
    }
    .check())
}
