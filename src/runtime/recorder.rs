//! The recorder: puts a plan's stages into one command submission, timing each stage
//! with GPU timestamp queries where the adapter has them (wall clock for the whole
//! submission otherwise), and the typed [`Report`] of a run.

/// The host clock: `std::time::Instant` natively; on wasm32 (where it panics) the
/// browser's `performance.now()` through `web-time`.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use std::time::Instant;
#[cfg(target_arch = "wasm32")]
pub(crate) use web_time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::runtime::context::{Context, GpuDevice};

/// Time of one stage of a plan run.
#[derive(Clone, Debug, Serialize)]
pub struct StageTime {
    /// Stage name.
    pub name: String,
    /// GPU time in milliseconds from timestamp queries (None without them).
    pub ms: Option<f64>,
    /// Dispatches recorded in the stage.
    pub dispatches: u32,
    /// The kernel(s) the stage ran, by entry point (`flash_attention_coop` is the
    /// matrix-unit attention kernel); `None` for host stages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl StageTime {
    /// A stage the host ran (the CPU path), timed by the host clock.
    pub fn host(name: &str, ms: f64) -> Self {
        StageTime {
            name: name.to_string(),
            ms: Some(ms),
            dispatches: 1,
            variant: Some("cpu".into()),
        }
    }
}

/// Timing report of one submission.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Per-stage times.
    pub stages: Vec<StageTime>,
    /// Wall time from submission to completion, in milliseconds (host clock).
    pub wall_ms: f64,
    /// Sum of stage GPU times when timestamps exist.
    pub gpu_ms: Option<f64>,
    /// `"timestamp"` or `"wall"`.
    pub timing: String,
}

impl Report {
    /// The best time we have: summed GPU time, else wall time.
    pub fn ms(&self) -> f64 {
        self.gpu_ms.unwrap_or(self.wall_ms)
    }

    /// One report for consecutive submissions of one run: their stages in order, GPU
    /// time summed when every part has it, and `wall_ms` measured by the caller over
    /// the whole run.
    pub fn concat(parts: Vec<Report>, wall_ms: f64) -> Report {
        let gpu_ms = parts.iter().map(|r| r.gpu_ms).sum::<Option<f64>>();
        Report {
            timing: if gpu_ms.is_some() {
                "timestamp"
            } else {
                "wall"
            }
            .into(),
            stages: parts.into_iter().flat_map(|r| r.stages).collect(),
            wall_ms,
            gpu_ms,
        }
    }
}

/// Records the stages of a plan into one command encoder and submits them once.
pub struct Recorder<'a> {
    g: &'a GpuDevice,
    encoder: wgpu::CommandEncoder,
    stages: Vec<StageTime>,
    queries: Option<wgpu::QuerySet>,
    max_stages: u32,
    /// The out-of-memory and validation error scopes around the recording, in the order
    /// they must be popped (a recording dropped unsubmitted pops them by dropping the
    /// tuple, first field first).
    scope: Option<(Option<wgpu::ErrorScopeGuard>, wgpu::ErrorScopeGuard)>,
}

impl<'a> Recorder<'a> {
    /// Starts a recording with room for `max_stages` timed stages.
    pub fn new(ctx: &'a Context, label: &str, max_stages: u32) -> Result<Self> {
        let g = ctx
            .gpu()
            .ok_or_else(|| Error::InvalidArgument("recording needs a GPU context".into()))?;
        g.check()?;
        let scope = g.device.push_error_scope(wgpu::ErrorFilter::Validation);
        // (Natively: in a browser the recordings keep the one validation scope they had.)
        #[cfg(not(target_arch = "wasm32"))]
        let oom_scope = Some(g.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory));
        #[cfg(target_arch = "wasm32")]
        let oom_scope = None;
        let queries = (g.caps.timestamps && max_stages > 0).then(|| {
            g.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some(&format!("{label} timestamps")),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * max_stages,
            })
        });
        let encoder = g
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        Ok(Recorder {
            g,
            encoder,
            stages: vec![],
            queries,
            max_stages,
            scope: Some((oom_scope, scope)),
        })
    }

    /// The device being recorded for.
    pub fn gpu(&self) -> &GpuDevice {
        self.g
    }

    /// The encoder, for copies between stages.
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        &mut self.encoder
    }

    /// Records one stage: a compute pass (timed when possible) in which `f` dispatches.
    /// `f` returns how many dispatches it recorded.
    pub fn stage(&mut self, name: &str, f: impl FnOnce(&mut wgpu::ComputePass<'_>) -> u32) {
        let i = self.stages.len() as u32;
        let timestamp_writes = match &self.queries {
            Some(q) if i < self.max_stages => Some(wgpu::ComputePassTimestampWrites {
                query_set: q,
                beginning_of_pass_write_index: Some(2 * i),
                end_of_pass_write_index: Some(2 * i + 1),
            }),
            _ => None,
        };
        let mut pass = self
            .encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(name),
                timestamp_writes,
            });
        let dispatches = f(&mut pass);
        drop(pass);
        self.stages.push(StageTime {
            name: name.to_string(),
            ms: None,
            dispatches,
            variant: None,
        });
    }

    /// Records one timed stage of prepared dispatches ([`crate::runtime::launch::Dispatch`]),
    /// in order.
    pub fn dispatch_stage(&mut self, name: &str, list: &[crate::runtime::launch::Dispatch]) {
        let mut entries: Vec<&str> = list.iter().map(|d| d.kernel.entry).collect();
        entries.dedup();
        let variant = (!entries.is_empty()).then(|| entries.join("+"));
        self.stage(name, |pass| {
            for d in list {
                let (x, y, z) = d.grid;
                pass.set_pipeline(&d.kernel.pipeline);
                pass.set_bind_group(0, &d.bind_group, &[]);
                pass.dispatch_workgroups(x, y, z);
            }
            list.len() as u32
        });
        if let Some(s) = self.stages.last_mut() {
            s.variant = variant;
        }
    }

    /// Records one [`crate::runtime::launch::Step`] over `buffers` as stage `name`.
    pub fn step<P: bytemuck::Pod>(
        &mut self,
        name: &str,
        step: &crate::runtime::launch::Step<P>,
        buffers: &[&wgpu::Buffer],
    ) {
        let d = step.dispatch(self.gpu(), buffers);
        self.dispatch_stage(name, &[d]);
    }

    /// Submits everything recorded, waits for it and returns the timing report.
    pub async fn submit(self) -> Result<Report> {
        self.submit_deferred().await?.report().await
    }

    /// Submits everything recorded without waiting for the GPU: validation errors are
    /// returned now, the timing later from [`Submitted::report`]. Lets a plan queue
    /// more work (or do host work, such as uploading streamed weights) while this
    /// submission runs.
    pub async fn submit_deferred(mut self) -> Result<Submitted<'a>> {
        let n = (self.stages.len() as u32).min(self.max_stages);
        let readback = match (&self.queries, n) {
            (Some(q), n) if n > 0 => {
                let size = 16 * n as u64;
                let resolve = self.g.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("timestamp resolve"),
                    size,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                self.encoder.resolve_query_set(q, 0..2 * n, &resolve, 0);
                Some(resolve)
            }
            _ => None,
        };
        let start = Instant::now();
        let index = self.g.queue.submit([self.encoder.finish()]);
        let (oom, validation) = self.scope.take().expect("scopes pushed in new");
        let oom = match oom {
            Some(s) => s.pop().await,
            None => None,
        };
        let validation = validation.pop().await;
        // A lost device turns every call into an error: report the loss itself.
        self.g.check()?;
        if let Some(e) = oom {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        if let Some(e) = validation {
            return Err(Error::Gpu(e.to_string()));
        }
        Ok(Submitted {
            g: self.g,
            index,
            stages: self.stages,
            n,
            readback,
            start,
        })
    }

    /// Blocking [`Recorder::submit`] (not on the web).
    pub fn submit_blocking(self) -> Result<Report> {
        pollster::block_on(self.submit())
    }
}

/// A submitted recording whose GPU work may still be running (see
/// [`Recorder::submit_deferred`]).
pub struct Submitted<'a> {
    g: &'a GpuDevice,
    index: wgpu::SubmissionIndex,
    stages: Vec<StageTime>,
    n: u32,
    readback: Option<wgpu::Buffer>,
    start: Instant,
}

impl<'a> Submitted<'a> {
    /// Waits for consecutive submissions of one run and joins their reports
    /// ([`Report::concat`]); `start` is when the run began (for the wall clock).
    pub async fn report_all(subs: Vec<Submitted<'a>>, start: Instant) -> Result<Report> {
        let mut parts = Vec::with_capacity(subs.len());
        for s in subs {
            parts.push(s.report().await?);
        }
        Ok(Report::concat(parts, start.elapsed().as_secs_f64() * 1e3))
    }

    /// The queue's index of this submission (to wait for it alone).
    pub fn index(&self) -> &wgpu::SubmissionIndex {
        &self.index
    }

    /// Waits for this submission and returns its timing report (GPU timestamps where
    /// the device has them; else the wall clock from submission to completion).
    pub async fn report(self) -> Result<Report> {
        let mut report = Report {
            stages: self.stages,
            ..Default::default()
        };
        match self.readback {
            Some(resolve) => {
                let bytes =
                    crate::runtime::tensor::read_buffer(self.g, &resolve, 0, resolve.size())
                        .await?;
                report.wall_ms = self.start.elapsed().as_secs_f64() * 1e3;
                let ticks: &[u64] = bytemuck::cast_slice(&bytes);
                let period = self.g.queue.get_timestamp_period() as f64;
                let mut total = 0.0;
                for (i, st) in report.stages.iter_mut().enumerate().take(self.n as usize) {
                    let ms = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period / 1e6;
                    st.ms = Some(ms);
                    total += ms;
                }
                report.gpu_ms = Some(total);
                report.timing = "timestamp".into();
            }
            None => {
                #[cfg(not(target_arch = "wasm32"))]
                self.g
                    .device
                    .poll(wgpu::PollType::Wait {
                        submission_index: Some(self.index),
                        timeout: None,
                    })
                    .map_err(|e| Error::Gpu(e.to_string()))?;
                #[cfg(target_arch = "wasm32")]
                {
                    let (tx, rx) = futures::channel::oneshot::channel();
                    self.g.queue.on_submitted_work_done(move || {
                        let _ = tx.send(());
                    });
                    let _ = rx.await;
                }
                report.wall_ms = self.start.elapsed().as_secs_f64() * 1e3;
                report.timing = "wall".into();
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(names: &[&str], gpu: Option<f64>) -> Report {
        Report {
            stages: names
                .iter()
                .map(|n| StageTime {
                    name: n.to_string(),
                    ms: gpu,
                    dispatches: 1,
                    variant: None,
                })
                .collect(),
            wall_ms: 1.0,
            gpu_ms: gpu.map(|g| g * names.len() as f64),
            timing: if gpu.is_some() { "timestamp" } else { "wall" }.into(),
        }
    }

    #[test]
    fn concatenated_reports_keep_stage_order_and_sum_gpu_time_only_when_complete() {
        let r = Report::concat(
            vec![part(&["a", "b"], Some(0.5)), part(&["c"], Some(2.0))],
            9.0,
        );
        let names: Vec<&str> = r.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(
            (r.gpu_ms, r.wall_ms, r.timing.as_str()),
            (Some(3.0), 9.0, "timestamp")
        );
        assert_eq!(r.ms(), 3.0);
        let r = Report::concat(vec![part(&["a"], Some(1.0)), part(&["b"], None)], 4.0);
        assert_eq!((r.gpu_ms, r.ms(), r.timing.as_str()), (None, 4.0, "wall"));
    }
}
