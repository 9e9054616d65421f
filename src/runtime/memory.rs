//! Buffers as a plan describes them before allocating: size and how the kernels bind
//! them (whole, or by ranges across dispatches). The memory plans
//! ([`crate::attention::plan`]) list these and check them against a device's limits.

use serde::Serialize;

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
