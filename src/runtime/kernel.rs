//! Kernels: what to compile ([`KernelSpec`]: a shader file, an entry point, a variant's
//! defines and its bindings), the compiled pipeline ([`Kernel`]) and the per-device cache
//! that compiles each variant once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::runtime::preprocess::{Defines, preprocess, validate_wgsl};

/// How a kernel binds one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindingKind {
    /// `var<uniform>` parameters.
    Uniform,
    /// `var<storage, read>`.
    StorageRead,
    /// `var<storage, read_write>`.
    StorageReadWrite,
}

impl BindingKind {
    /// Binding kinds from a compact layout, one letter per binding in order: `u` a
    /// uniform, `r` read-only storage, `w` read-write storage (`"urrw"`: parameters,
    /// two inputs, one output).
    ///
    /// # Panics
    /// On any other letter: layouts are literals next to their kernels, and the
    /// portability tests compile every variant.
    pub fn layout(letters: &str) -> Vec<BindingKind> {
        letters
            .chars()
            .map(|c| match c {
                'u' => BindingKind::Uniform,
                'r' => BindingKind::StorageRead,
                'w' => BindingKind::StorageReadWrite,
                _ => panic!("binding layout `{letters}`: `{c}` is not u, r or w"),
            })
            .collect()
    }
}

/// Which kernel to compile: a shader file, an entry point, a variant and its bindings
/// (binding `i` of group 0 has kind `bindings[i]`).
#[derive(Clone, Debug)]
pub struct KernelSpec {
    /// File under `shaders/`.
    pub file: &'static str,
    /// Entry point.
    pub entry: &'static str,
    /// Flags and constants of this variant.
    pub defines: Defines,
    /// Binding kinds in order.
    pub bindings: Vec<BindingKind>,
}

impl KernelSpec {
    /// The final WGSL of this variant.
    pub fn source(&self) -> Result<String> {
        preprocess(self.file, &self.defines)
    }
    /// Human-readable name (`file:entry[variant]`).
    pub fn label(&self) -> String {
        format!("{}:{}[{}]", self.file, self.entry, self.defines.signature())
    }
}

type PipelineKey = (&'static str, &'static str, Defines);

/// Compiled kernels of one device, one per (file, entry, variant).
#[derive(Default)]
pub(crate) struct KernelCache {
    pipelines: Mutex<HashMap<PipelineKey, Arc<Kernel>>>,
}

impl KernelCache {
    /// The compiled kernel of `spec`, compiling it on the first request.
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        checked: bool,
        spec: &KernelSpec,
    ) -> Result<Arc<Kernel>> {
        let key: PipelineKey = (spec.file, spec.entry, spec.defines.clone());
        if let Some(k) = self
            .pipelines
            .lock()
            .expect("pipeline cache lock")
            .get(&key)
        {
            return Ok(k.clone());
        }
        let kernel = Arc::new(compile(device, checked, spec)?);
        self.pipelines
            .lock()
            .expect("pipeline cache lock")
            .insert(key, kernel.clone());
        Ok(kernel)
    }

    /// Number of kernels compiled so far.
    pub(crate) fn len(&self) -> usize {
        self.pipelines.lock().expect("pipeline cache lock").len()
    }
}

/// A compiled compute pipeline and its bind-group layout.
pub struct Kernel {
    /// The pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Layout of bind group 0.
    pub layout: wgpu::BindGroupLayout,
    /// `file:entry[variant]`.
    pub label: String,
    /// The entry point (names the kernel family: `flash_attention_coop`, ...).
    pub entry: &'static str,
}

fn compile(device: &wgpu::Device, checked: bool, spec: &KernelSpec) -> Result<Kernel> {
    let label = spec.label();
    let source = spec.source()?;
    // naga first: a bad variant becomes a typed error with a readable message.
    validate_wgsl(&label, &source)?;
    // Natively a compile error is caught here. On the web an error scope can only be
    // popped asynchronously, and this function is synchronous: there an invalid
    // pipeline shows up as a validation error at the first submission instead (the
    // `Recorder`'s error scope), so no scope is pushed.
    #[cfg(not(target_arch = "wasm32"))]
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some(&label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    };
    // The browser always applies its own robustness checks; natively wgpu's are optional.
    let module = if checked || cfg!(target_arch = "wasm32") {
        device.create_shader_module(desc)
    } else {
        // SAFETY: every kernel guards its storage accesses against the ranges the launcher
        // binds (tested against the CPU twins with NaN-poisoned outputs and with
        // `WGSPARSE_CHECKED_SHADERS=1`), indexes its private and workgroup arrays with
        // in-range constants or loop counters, and bounds its loops by uniform values.
        // Without this, naga clamps every index and adds a counter to every loop.
        unsafe { device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
    };
    let entries: Vec<wgpu::BindGroupLayoutEntry> = spec
        .bindings
        .iter()
        .enumerate()
        .map(|(i, kind)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: match kind {
                BindingKind::Uniform => wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                BindingKind::StorageRead | BindingKind::StorageReadWrite => {
                    wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: *kind == BindingKind::StorageRead,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    }
                }
            },
            count: None,
        })
        .collect();
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&label),
        entries: &entries,
    });
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&label),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&label),
        layout: Some(&pl),
        module: &module,
        entry_point: Some(spec.entry),
        compilation_options: Default::default(),
        cache: None,
    });
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(crate::error::Error::Shader {
            name: label,
            message: e.to_string(),
        });
    }
    log::debug!("compiled {label}");
    Ok(Kernel {
        pipeline,
        layout,
        label,
        entry: spec.entry,
    })
}
