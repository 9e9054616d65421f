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
use super::split::SplitLimits;
use crate::error::{Error, Result};
use crate::runtime::dtype::DType;
pub use crate::runtime::memory::{Binding, DeviceLimits, PlannedBuffer};
use crate::runtime::memory::{mib, problems_of, write_buffers, write_verdict};

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
        let found = problems_of(&self.buffers, &self.limits);
        self.problems.extend(found);
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
        write_buffers(f, &self.buffers)?;
        let n: usize = self.dispatches.iter().map(|(_, c)| c).sum();
        let per: Vec<String> = self
            .dispatches
            .iter()
            .map(|(p, c)| format!("{p} {c}"))
            .collect();
        writeln!(f, "  dispatches: {n} ({})", per.join(", "))?;
        writeln!(f, "  plan's own memory: {}", mib(self.own_bytes()))?;
        write_verdict(f, &self.problems)
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
    let split = SplitLimits {
        head_run: exec.state_head_run,
        ..lim.into()
    };
    let dispatches = split_for(shape, dtype, causal, exec.keys, &split)?;
    let mut out = FlashBindings {
        dispatches: dispatches.len(),
        q_largest: 0,
        kv_largest: 0,
        state_largest: 0,
        scratch_rows: 0,
    };
    for x in &dispatches {
        let r = dispatch_ranges(
            x,
            shape,
            dtype.size() as u64,
            lim.offset_align,
            exec.state_head_run,
        );
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
    let mut late_problems = vec![];
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
            let sz = SparseSizes::of(shape, &exact, row_base.len(), total);
            let head_run = match sz.acc_head_run(limits.max_buffer) {
                Ok(r) => r,
                Err(e) => {
                    late_problems.push(format!("pass {}: {e}", sel.pass_names()[0]));
                    0
                }
            };
            let exact_exec = ExecConfig {
                keys: KeyMode::Blocks {
                    q_block: exact.q_block,
                    key_block: kb,
                },
                state_head_run: head_run,
                ..Default::default()
            };
            let sparse_exec = ExecConfig {
                keys: layout.keys(),
                export_state: true,
                state_head_run: head_run,
                ..Default::default()
            };
            let [p0, p1] = sel.pass_names();
            let s0 = flash(p0, &exact_exec, true, &mut buffers);
            let s1 = flash(p1, &sparse_exec, true, &mut buffers);
            let name = sel.name();
            let whole = |what: &str, bytes| PlannedBuffer::whole(format!("{name} {what}"), bytes);
            buffers.extend([
                whole("exact LUT ranges", sz.exact_ranges),
                whole("exact LUT indices", sz.exact_indices),
                whole("row state ml", sz.ml),
            ]);
            let parts = sz.acc_parts(head_run);
            let pieces = dispatches.iter().map(|(_, c)| *c).max().unwrap_or(1);
            for (i, &bytes) in parts.iter().enumerate() {
                buffers.push(PlannedBuffer {
                    name: match parts.len() {
                        1 => format!("{name} row state acc"),
                        n => format!("{name} row state acc {}/{n} ({head_run} heads)", i + 1),
                    },
                    bytes,
                    binding: Binding::Ranges {
                        largest: s0.unwrap_or(bytes).max(s1.unwrap_or(bytes)),
                        pieces,
                    },
                });
            }
            buffers.extend([
                whole("selected slice starts", sz.row_base),
                whole("selected LUT ranges", sz.ranges),
                whole("selected LUT indices", sz.indices),
            ]);
            let (own, passes) = sel.plan_buffers(shape, dtype, limits);
            buffers.extend(own);
            dispatches.extend(passes);
        }
    }
    problems.extend(late_problems);
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

/// A problem cut into head groups that run one after the other from host memory
/// ([`super::GroupedAttention`]): runs of whole kv-heads with their q-heads, or runs of
/// the q-heads of one kv-head, always whole units of the method
/// ([`Method::head_unit`]: ProxyAttn's proxy groups). No tensor of the whole problem is allocated, so a prompt
/// whose Q alone is over a device's buffer limit (a browser's 256 MiB at 128k tokens ×
/// 32 heads) still runs.
#[derive(Clone, Debug, Serialize)]
pub struct GroupedPlan {
    /// Groups run one after the other (1: the whole problem at once).
    pub groups: usize,
    /// q-heads per group: a multiple of the q-heads per kv-head (whole kv-heads) or a
    /// divisor of it (q-heads of one kv-head).
    pub q_heads_per_group: usize,
    /// The plan of one group (the one with the most own memory, or one that does not
    /// fit): its tensors are the group's slices of Q, K, V and the output.
    pub plan: MemoryPlan,
}

/// Group `i` of a problem cut into groups of `q_per_group` q-heads: its q-heads and
/// kv-heads.
pub fn group_heads(
    shape: &AttentionShape,
    q_per_group: usize,
    i: usize,
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let g = shape.q_heads / shape.kv_heads;
    let (q0, q1) = (i * q_per_group, (i + 1) * q_per_group);
    let kv0 = q0 / g;
    (q0..q1, kv0..(q1 / g).max(kv0 + 1))
}

impl GroupedPlan {
    /// Whether every group fits.
    pub fn fits(&self) -> bool {
        self.plan.fits()
    }

    /// The shape of one group of `q_per_group` q-heads.
    pub fn group_shape(shape: &AttentionShape, q_per_group: usize) -> AttentionShape {
        let (q, kv) = group_heads(shape, q_per_group, 0);
        AttentionShape {
            q_heads: q.len(),
            kv_heads: kv.len(),
            ..*shape
        }
    }
}

impl fmt::Display for GroupedPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.groups > 1 {
            writeln!(
                f,
                "runs in {} head groups of {} q-head(s) / {} kv-head(s), one after the other from host memory (no tensor of the whole problem is allocated); one group:",
                self.groups, self.plan.shape.q_heads, self.plan.shape.kv_heads
            )?;
        }
        self.plan.fmt(f)
    }
}

/// The plan with the fewest head groups that fits `limits`: the whole problem when it
/// fits ([`plan`]), else runs of whole kv-heads (a divisor of them), else runs of one
/// kv-head's q-heads (a divisor of them), in whole units of the method
/// ([`Method::head_unit`]); when even the smallest group does not fit, its plan with
/// its problems.
pub fn plan_groups(
    shape: &AttentionShape,
    method: &Method,
    dtype: DType,
    causal: bool,
    limits: &DeviceLimits,
) -> Result<GroupedPlan> {
    shape.validate(causal)?;
    let g = shape.q_heads / shape.kv_heads;
    let divisors = |n: usize| (1..=n).filter(move |c| n.is_multiple_of(*c));
    // q-heads per group, largest first.
    let unit = method.head_unit(shape).max(1);
    let sizes: Vec<usize> = divisors(shape.kv_heads)
        .map(|c| shape.kv_heads / c * g)
        .chain(divisors(g).skip(1).map(|c| g / c))
        .filter(|qp| qp % unit == 0)
        .collect();
    // A fixed LUT differs per group: plan each; other methods plan one group.
    let each = matches!(method, Method::BlockSparse(_) | Method::Stripes(_));
    let mut last = None;
    for qp in sizes {
        let groups = shape.q_heads / qp;
        let sub = GroupedPlan::group_shape(shape, qp);
        let mut worst: Option<MemoryPlan> = None;
        for i in 0..if each { groups } else { 1 } {
            let (q, _) = group_heads(shape, qp, i);
            let m = method.for_heads(shape.q_heads, q.start, q.end)?;
            let mut p = plan(&sub, &m, dtype, causal, limits)?;
            p.method = method.to_string();
            worst = match worst {
                Some(w) if !w.fits() || (p.fits() && p.own_bytes() <= w.own_bytes()) => Some(w),
                _ => Some(p),
            };
        }
        let gp = GroupedPlan {
            groups,
            q_heads_per_group: qp,
            plan: worst.expect("one group at least"),
        };
        if gp.fits() {
            return Ok(gp);
        }
        last = Some(gp);
    }
    let mut gp = last.expect("kv_heads >= 1");
    if unit > g && gp.q_heads_per_group == unit {
        gp.plan.problems.push(format!(
            "pass groups: {} pools {unit} q-heads into one selection, so they run together (ProxyAttn: proxy_groups={} lets each kv-head run apart)",
            method.name(),
            shape.kv_heads
        ));
    }
    Ok(gp)
}
