//! Buffers as a plan describes them before allocating: size and how the kernels bind
//! them (whole, or by ranges across dispatches). The memory plans
//! ([`crate::attention::plan`]) list these and check them against a device's limits.

use serde::Serialize;

use crate::error::{Error, Result};

/// How a buffer is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "bound")]
pub enum Binding {
    /// One binding over the whole buffer.
    Whole,
    /// Bound by ranges, one per dispatch: the largest range and how many.
    Ranges {
        /// Bytes of the largest range bound.
        largest: u64,
        /// Number of ranges.
        pieces: usize,
    },
}

/// One buffer of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedBuffer {
    /// What it holds.
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// How the kernels bind it.
    pub binding: Binding,
}

impl PlannedBuffer {
    /// A buffer bound whole.
    pub fn whole(name: impl Into<String>, bytes: u64) -> Self {
        PlannedBuffer {
            name: name.into(),
            bytes,
            binding: Binding::Whole,
        }
    }

    /// The largest binding it takes.
    pub fn largest_binding(&self) -> u64 {
        match self.binding {
            Binding::Whole => self.bytes,
            Binding::Ranges { largest, .. } => largest,
        }
    }
}

/// The limits a plan must fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceLimits {
    /// Bytes one storage binding may cover.
    pub max_binding: u64,
    /// Bytes one buffer may hold.
    pub max_buffer: u64,
    /// Alignment of binding offsets.
    pub offset_align: u64,
    /// Workgroups per grid axis.
    pub max_groups: u32,
}

impl DeviceLimits {
    /// An NVIDIA H200 through Vulkan (wgpu 30): 2 GiB − 4 per binding, 4 GiB buffers.
    pub const H200: DeviceLimits = DeviceLimits {
        max_binding: (2 << 30) - 4,
        max_buffer: 4 << 30,
        offset_align: 64,
        max_groups: 65535,
    };
    /// WebGPU's default limits (what a browser gives without asking for more): 128 MiB
    /// per binding, 256 MiB buffers.
    pub const WEBGPU_DEFAULT: DeviceLimits = DeviceLimits {
        max_binding: 128 << 20,
        max_buffer: 256 << 20,
        offset_align: 256,
        max_groups: 65535,
    };
    /// Mesa's lavapipe (CI): 128 MiB per binding, 2 GiB − 1 buffers.
    pub const LAVAPIPE: DeviceLimits = DeviceLimits {
        max_binding: 128 << 20,
        max_buffer: (2 << 30) - 1,
        offset_align: 32,
        max_groups: 65535,
    };

    /// The limits of a context's device (the CPU path has none).
    pub fn of(caps: &crate::runtime::context::Capabilities) -> Self {
        DeviceLimits {
            max_binding: caps.max_storage_binding,
            max_buffer: caps.max_buffer,
            offset_align: caps.storage_offset_alignment.max(1) as u64,
            max_groups: caps.max_workgroups_per_dim,
        }
    }
}

/// What of `buffers` does not fit `limits`: `NAME: …` for each buffer over the buffer
/// limit or with a binding over the binding limit.
pub fn problems_of(buffers: &[PlannedBuffer], limits: &DeviceLimits) -> Vec<String> {
    let mut out = vec![];
    for b in buffers {
        if b.bytes > limits.max_buffer {
            out.push(format!(
                "{}: {} bytes, over the buffer limit {}",
                b.name, b.bytes, limits.max_buffer
            ));
        } else if b.largest_binding() > limits.max_binding {
            out.push(format!(
                "{}: a binding of {} bytes, over the binding limit {}",
                b.name,
                b.largest_binding(),
                limits.max_binding
            ));
        }
    }
    out
}

/// Bytes as `12.5 MiB`, or `300 B` under a MiB.
pub fn mib(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{b} B")
    }
}

/// Writes one line per buffer: name, size, how it is bound.
pub fn write_buffers(
    f: &mut std::fmt::Formatter<'_>,
    buffers: &[PlannedBuffer],
) -> std::fmt::Result {
    for b in buffers {
        let how = match b.binding {
            Binding::Whole => "bound whole".to_string(),
            Binding::Ranges { largest, pieces } => {
                format!("bound in {pieces} range(s), largest {}", mib(largest))
            }
        };
        writeln!(f, "  {:<44} {:>12}  {how}", b.name, mib(b.bytes))?;
    }
    Ok(())
}

/// Writes `fits`, or `does NOT fit:` and the problems one per line.
pub fn write_verdict(f: &mut std::fmt::Formatter<'_>, problems: &[String]) -> std::fmt::Result {
    if problems.is_empty() {
        return write!(f, "  fits");
    }
    write!(f, "  does NOT fit:")?;
    for p in problems {
        write!(f, "\n    {p}")?;
    }
    Ok(())
}

/// One part of a `[heads, rows, d]` tensor bound by itself: heads `h0..h1`, the byte
/// range that holds them (its start aligned down) and `base`, the element offset of
/// head `h0` inside that range in units of `unit` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadChunk {
    /// First head.
    pub h0: usize,
    /// One past the last head.
    pub h1: usize,
    /// Byte offset of the binding.
    pub offset: u64,
    /// Byte size of the binding.
    pub size: u64,
    /// Offset of head `h0` inside the binding, in `unit`s.
    pub base: u32,
}

/// Cuts `heads` heads of `head_bytes` each into the fewest runs of whole heads whose
/// bindings (start aligned down to `align`) fit `max_binding`; `unit` is the size the
/// kernel addresses in (4 elements of the storage dtype). A typed error when one head
/// alone does not fit.
pub fn head_chunks(
    heads: usize,
    head_bytes: u64,
    unit: u64,
    max_binding: u64,
    align: u64,
) -> Result<Vec<HeadChunk>> {
    // Runs start at multiples of `head_bytes`: aligned (no slack) when it is.
    let slack = if head_bytes.is_multiple_of(align.max(1)) {
        0
    } else {
        align.max(1) - 1
    };
    let budget = max_binding.saturating_sub(slack);
    let per = (budget / head_bytes.max(1)) as usize;
    if per == 0 {
        return Err(Error::too_large(
            "one head of a tensor bound by heads",
            head_bytes,
            max_binding,
        ));
    }
    let align = align.max(1);
    Ok((0..heads)
        .step_by(per)
        .map(|h0| {
            let h1 = (h0 + per).min(heads);
            let start = h0 as u64 * head_bytes;
            let offset = start / align * align;
            HeadChunk {
                h0,
                h1,
                offset,
                size: (h1 as u64 * head_bytes - offset).div_ceil(4) * 4,
                base: ((start - offset) / unit) as u32,
            }
        })
        .collect())
}

impl PlannedBuffer {
    /// A `[heads, rows, d]` tensor bound one run of whole heads at a time
    /// ([`head_chunks`]); bound whole (and so reported over the limit) when one head
    /// alone is over it.
    pub fn by_heads(
        name: impl Into<String>,
        heads: usize,
        head_bytes: u64,
        unit: u64,
        limits: &DeviceLimits,
    ) -> Self {
        let bytes = heads as u64 * head_bytes;
        let binding = match head_chunks(
            heads,
            head_bytes,
            unit,
            limits.max_binding,
            limits.offset_align,
        ) {
            Ok(c) => Binding::Ranges {
                largest: c.iter().map(|c| c.size).max().unwrap_or(0),
                pieces: c.len(),
            },
            Err(_) => Binding::Whole,
        };
        PlannedBuffer {
            name: name.into(),
            bytes,
            binding,
        }
    }
}
