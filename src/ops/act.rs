//! The gated activations of a feed-forward block (`shaders/ops/act.wgsl`): SwiGLU's
//! `SiLU(g) · u` and GeGLU's `GELU_tanh(g) · u`, in place on the gate; launcher and CPU
//! twin.

use crate::error::Result;
use crate::runtime::context::{Context, GpuDevice};
use crate::runtime::launch::{Dispatch, Step};
use crate::runtime::preprocess::Defines;
use crate::runtime::{BindingKind, KernelSpec};

crate::runtime::preprocess::wgsl_params! {
    /// Uniform parameters; mirrors `struct Params` in the WGSL.
    pub struct ActParams {
        count: u32,
        _pad: [u32; 3],
    }
}

/// Which gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gate {
    /// SiLU (SwiGLU: llama, qwen2).
    Silu,
    /// GELU, tanh form (GeGLU: gemma3).
    GeluTanh,
}

impl Gate {
    /// The activation of one value.
    pub fn apply(self, g: f32) -> f32 {
        match self {
            Gate::Silu => g / (1.0 + (-g).exp()),
            Gate::GeluTanh => 0.5 * g * (1.0 + (0.797_884_6 * (g + 0.044_715 * g * g * g)).tanh()),
        }
    }
}

/// The kernel of a gate.
pub fn act_spec(gate: Gate) -> KernelSpec {
    KernelSpec {
        file: "ops/act.wgsl",
        entry: "act",
        defines: Defines::new()
            .params::<ActParams>()
            .flag_if("GELU", gate == Gate::GeluTanh),
        bindings: BindingKind::layout("uwr"),
    }
}

/// Every activation variant.
pub fn all_act_variants() -> Vec<KernelSpec> {
    vec![act_spec(Gate::Silu), act_spec(Gate::GeluTanh)]
}

/// CPU twin: `g = act(g) · u`.
pub fn act_cpu(gate: Gate, g: &mut [f32], u: &[f32]) {
    g.iter_mut()
        .zip(u)
        .for_each(|(g, &u)| *g = gate.apply(*g) * u);
}

/// A built activation over `count` values.
pub struct ActGpu {
    step: Step<ActParams>,
}

impl ActGpu {
    /// Compiles for `count` values.
    pub fn build(ctx: &Context, gate: Gate, count: usize) -> Result<Self> {
        let p = ActParams {
            count: count as u32,
            _pad: [0; 3],
        };
        Ok(ActGpu {
            step: Step::flat(ctx, &act_spec(gate), &p, count.div_ceil(256) as u64)?,
        })
    }

    /// The dispatch over the gate (rewritten) and the up values.
    pub fn dispatch(&self, g: &GpuDevice, gate: &wgpu::Buffer, up: &wgpu::Buffer) -> Dispatch {
        self.step.dispatch(g, &[gate, up])
    }
}
