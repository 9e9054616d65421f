//! Attention over host data in head groups: when a problem's tensors do not fit the
//! device's buffers (a browser's 256 MiB holds no 1 GiB Q), the plan from
//! [`super::plan::plan_groups`] cuts it into groups of whole kv-heads with their q-heads;
//! each group's slices of Q, K and V are uploaded, run and read back by themselves, so
//! only one group's tensors are on the device at a time. Groups hold whole units of the
//! method ([`Method::head_unit`]: ProxyAttn pools the q-heads of a proxy group), so the
//! output is the whole problem's.

use std::sync::Mutex;
use std::time::Instant;

use super::plan::{DeviceLimits, GroupedPlan, group_heads, plan_groups};
use super::{
    AttentionOptions, AttentionPlan, AttentionPlanBuilder, AttentionReport, AttentionShape, Method,
    MethodStats, RowState, upload_qkv,
};
use crate::error::{Error, Result};
use crate::runtime::recorder::Report;
use crate::runtime::tensor::Tensor;

/// An attention problem planned as head groups over host data; see the module docs.
pub struct GroupedAttention {
    shape: AttentionShape,
    group: AttentionShape,
    groups: usize,
    /// One plan for every group, or one per group (a fixed LUT differs per group).
    plans: Vec<AttentionPlan>,
    last: Mutex<Option<AttentionReport>>,
}

impl AttentionPlanBuilder {
    /// Builds the plan for host data in the fewest head groups the device's limits
    /// allow (the CPU path and a problem that fits run as one group). A group that does
    /// not fit even at one kv-head is refused with the build's typed error.
    pub fn build_grouped(self) -> Result<GroupedAttention> {
        self.shape.validate(self.opts.causal)?;
        if self.opts.import_state {
            return Err(Error::InvalidArgument(
                "grouped attention over host data starts from an empty row state".into(),
            ));
        }
        let shape = self.shape;
        let qp = match self.ctx.gpu() {
            None => shape.q_heads,
            Some(_) => {
                let lim = DeviceLimits::of(self.ctx.capabilities());
                let opts = &self.opts;
                plan_groups(&shape, &self.method, opts.dtype, opts.causal, &lim)?.q_heads_per_group
            }
        };
        let groups = shape.q_heads / qp;
        let group = GroupedPlan::group_shape(&shape, qp);
        let each = groups > 1 && matches!(self.method, Method::BlockSparse(_) | Method::Stripes(_));
        // (ProxyAttn's groups are whole proxy groups: one configuration fits them all.)
        let mut plans = vec![];
        for i in 0..if each { groups } else { 1 } {
            let (q, _) = group_heads(&shape, qp, i);
            plans.push(
                AttentionPlanBuilder {
                    ctx: self.ctx.clone(),
                    shape: group,
                    method: self.method.for_heads(shape.q_heads, q.start, q.end)?,
                    opts: self.opts.clone(),
                }
                .build()?,
            );
        }
        Ok(GroupedAttention {
            shape,
            group,
            groups,
            plans,
            last: Mutex::new(None),
        })
    }
}

impl GroupedAttention {
    /// The whole problem.
    pub fn shape(&self) -> &AttentionShape {
        &self.shape
    }

    /// Groups run one after the other (1: the whole problem at once).
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The shape of one group.
    pub fn group_shape(&self) -> &AttentionShape {
        &self.group
    }

    /// The plan of the whole problem when it runs as one group (its tensors can then
    /// stay on the device between runs).
    pub fn single(&self) -> Option<&AttentionPlan> {
        (self.groups == 1).then(|| &self.plans[0])
    }

    fn options(&self) -> &AttentionOptions {
        self.plans[0].options()
    }

    /// The report of the last run: the groups' stages in order, their times, pairs
    /// and statistics added into the whole problem's.
    pub fn report(&self) -> Option<AttentionReport> {
        self.last.lock().expect("report lock").clone()
    }

    /// Runs on host Q `[q_heads, seq_len, d]`, K and V `[kv_heads, kv_len, d]` and
    /// returns the output `[q_heads, seq_len, d]` (blocking; not on the web).
    pub fn run_host(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        Ok(pollster::block_on(self.run_host_async(q, k, v, false))?.0)
    }

    /// Like [`GroupedAttention::run_host`], also returning the final `(m, l)` of every
    /// row `[q_heads, seq_len, 2]` (the attention-mass recall's input; blocking).
    pub fn run_host_with_row_stats(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (out, ml) = pollster::block_on(self.run_host_async(q, k, v, true))?;
        Ok((out, ml.expect("asked for")))
    }

    /// The async run behind [`GroupedAttention::run_host`]; with `row_stats` also the
    /// final `(m, l)` of every row.
    pub async fn run_host_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        row_stats: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let s = &self.shape;
        let (qn, kn) = (
            s.q_heads * s.seq_len * s.head_dim,
            s.kv_heads * s.kv_len * s.head_dim,
        );
        if q.len() != qn || k.len() != kn || v.len() != kn {
            return Err(Error::Mismatch(format!(
                "host Q/K/V of {}/{}/{} values, the plan expects {qn}/{kn}/{kn}",
                q.len(),
                k.len(),
                v.len()
            )));
        }
        let g = &self.group;
        let (qs, ks) = (g.seq_len * g.head_dim, g.kv_len * g.head_dim);
        let dtype = self.options().dtype;
        let t0 = Instant::now();
        let mut out = vec![0.0f32; qn];
        let mut ml = vec![
            0.0f32;
            if row_stats {
                s.q_heads * s.seq_len * 2
            } else {
                0
            }
        ];
        let mls = g.seq_len * 2;
        let mut reports = Vec::with_capacity(self.groups);
        for i in 0..self.groups {
            let plan = &self.plans[i.min(self.plans.len() - 1)];
            let ctx = plan.context();
            let (qh, kvh) = group_heads(s, g.q_heads, i);
            let (qr, kr) = (qh.start * qs..qh.end * qs, kvh.start * ks..kvh.end * ks);
            let (qt, kt, vt) = upload_qkv(ctx, g, &q[qr.clone()], &k[kr.clone()], &v[kr], dtype)?;
            // NaN-poisoned: a row the kernels failed to write shows.
            let mut o = Tensor::filled(ctx, &g.q_dims(), dtype, f32::NAN)?;
            // The final (m, l): kept by a two-pass method, else from a caller's state.
            let group_ml = if row_stats && !plan.method().manages_state() {
                let mut st = RowState::empty(ctx, g)?;
                plan.run_async(&qt, &kt, &vt, &mut o, Some(&mut st)).await?;
                Some(st.ml.to_f32().await?)
            } else {
                plan.run_async(&qt, &kt, &vt, &mut o, None).await?;
                if row_stats {
                    plan.row_stats().await?
                } else {
                    None
                }
            };
            if let Some(m) = group_ml {
                ml[qh.start * mls..qh.end * mls].copy_from_slice(&m);
            }
            out[qr].copy_from_slice(&o.to_f32().await?);
            reports.push(plan.report().expect("a run leaves its report"));
        }
        let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
        *self.last.lock().expect("report lock") = Some(merge(reports, g.q_heads, wall_ms));
        Ok((out, row_stats.then_some(ml)))
    }
}

/// The report of the groups' runs as the whole problem's.
fn merge(parts: Vec<AttentionReport>, heads_per_group: usize, wall_ms: f64) -> AttentionReport {
    if parts.len() == 1 {
        return parts.into_iter().next().expect("one part");
    }
    let n = parts.len() as f64;
    let first = &parts[0];
    let (method, backend) = (first.method.clone(), first.backend);
    let dispatches = parts.iter().map(|r| r.dispatches).sum();
    let mean_density = parts.iter().map(|r| r.density).sum::<f64>() / n;
    let stats = parts
        .iter()
        .map(|r| r.stats.clone().map(|s| (heads_per_group, s)))
        .collect::<Option<Vec<_>>>()
        .and_then(MethodStats::concat_heads);
    let timing = Report::concat(parts.into_iter().map(|r| r.timing).collect(), wall_ms);
    AttentionReport {
        method,
        backend,
        timing,
        // Every group has the same causal pairs: the mean is the whole's density.
        density: stats.as_ref().map_or(mean_density, |s| s.density()),
        dispatches,
        stats,
    }
}
