//! Portability of every kernel variant, without any GPU: each variant is preprocessed,
//! parsed and validated by naga with no optional capabilities (the WebGPU baseline), then
//! translated to every shading language wgpu targets: SPIR-V (Vulkan), MSL (Metal), HLSL
//! (DX12, shader model 5.1 for FXC and 6.0 for DXC) and GLSL (GLES 3.1 and GL 4.3
//! compute). A translation error fails the test; nothing is skipped.
//!
//! A second group checks limits: every variant stays within WebGPU's default invocation
//! and binding limits (256 invocations, 8 storage buffers per stage); the host's
//! workgroup-memory estimate never undercounts a variant; the tile configuration the
//! launcher chooses for a device fits that device, in particular WebGPU's default 16 KiB
//! of workgroup memory (the browser variant); no `enable` of optional features; and the
//! bindings the shader declares agree with the launcher's `KernelSpec` and uniform struct.

use std::sync::OnceLock;

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities as NagaCaps, ModuleInfo, ValidationFlags, Validator};
use naga::{AddressSpace, Module, ResourceBinding, ShaderStage, StorageAccess};
use wgsparse::attention::flash::{DenseTiles, dense_workgroup_bytes};
use wgsparse::runtime::{BindingKind, KernelSpec};
use wgsparse::{Capabilities, Context};

/// WebGPU's default `maxComputeInvocationsPerWorkgroup`.
const WEB_INVOCATIONS: u32 = 256;
/// WebGPU's default `maxComputeWorkgroupSizeX/Y/Z`.
const WEB_WORKGROUP_DIMS: [u32; 3] = [256, 256, 64];
/// WebGPU's default `maxStorageBuffersPerShaderStage`.
const WEB_STORAGE_BUFFERS: usize = 8;
/// WebGPU's default `maxUniformBuffersPerShaderStage`.
const WEB_UNIFORM_BUFFERS: usize = 12;

/// One compiled-to-IR kernel variant.
struct Compiled {
    spec: KernelSpec,
    label: String,
    source: String,
    module: Module,
    info: ModuleInfo,
}

fn validate(label: &str, source: &str, module: &Module, caps: NagaCaps) -> ModuleInfo {
    Validator::new(ValidationFlags::all(), caps)
        .validate(module)
        .unwrap_or_else(|e| {
            panic!(
                "{label}: naga validation failed:\n{}",
                e.emit_to_string(source)
            )
        })
}

/// What naga may assume on every WebGPU implementation: wgpu's mapping of no optional
/// features and the fully compliant downlevel flags. `SHADER_FLOAT16_IN_FLOAT32` is
/// `pack2x16float` / `unpack2x16float`, core WGSL, which the f16-storage variants use.
fn webgpu_baseline() -> NagaCaps {
    NagaCaps::SHADER_FLOAT16_IN_FLOAT32
        | NagaCaps::MULTISAMPLED_SHADING
        | NagaCaps::CUBE_ARRAY_TEXTURES
}

/// Every variant of every kernel family, parsed and validated with the WebGPU baseline
/// (so no subgroups, f16 arithmetic, f64, ...).
fn compiled() -> &'static [Compiled] {
    static ALL: OnceLock<Vec<Compiled>> = OnceLock::new();
    ALL.get_or_init(compile_all)
}

fn compile_all() -> Vec<Compiled> {
    let specs = wgsparse::all_kernel_variants();
    assert!(!specs.is_empty(), "no kernel variants to check");
    specs
        .into_iter()
        .map(|spec| {
            let label = spec.label();
            let source = spec
                .source()
                .unwrap_or_else(|e| panic!("{label}: preprocessing failed: {e}"));
            let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| {
                panic!("{label}: WGSL parse failed:\n{}", e.emit_to_string(&source))
            });
            let info = validate(&label, &source, &module, webgpu_baseline());
            Compiled {
                spec,
                label,
                source,
                module,
                info,
            }
        })
        .collect()
}

/// The bounds-check policies wgpu uses by default (clamp every access).
fn policies() -> naga::proc::BoundsCheckPolicies {
    naga::proc::BoundsCheckPolicies {
        index: naga::proc::BoundsCheckPolicy::Restrict,
        buffer: naga::proc::BoundsCheckPolicy::Restrict,
        image_load: naga::proc::BoundsCheckPolicy::Restrict,
        binding_array: naga::proc::BoundsCheckPolicy::Restrict,
    }
}

/// Resource bindings of a module, in binding order.
fn bindings(module: &Module) -> Vec<(ResourceBinding, AddressSpace)> {
    let mut out: Vec<_> = module
        .global_variables
        .iter()
        .filter_map(|(_, g)| g.binding.map(|b| (b, g.space)))
        .collect();
    out.sort_by_key(|(b, _)| (b.group, b.binding));
    out
}

fn entry(c: &Compiled) -> &naga::EntryPoint {
    let eps: Vec<_> = c
        .module
        .entry_points
        .iter()
        .filter(|e| e.name == c.spec.entry)
        .collect();
    assert_eq!(
        eps.len(),
        1,
        "{}: entry point `{}` not found once",
        c.label,
        c.spec.entry
    );
    assert_eq!(eps[0].stage, ShaderStage::Compute, "{}", c.label);
    eps[0]
}

/// Runs `check` on every variant and fails once, listing every variant that failed.
fn for_all(what: &str, check: impl Fn(&Compiled) -> Result<(), String>) {
    let all = compiled();
    let failures: Vec<String> = all
        .iter()
        .filter_map(|c| check(c).err().map(|e| format!("{}: {e}", c.label)))
        .collect();
    assert!(
        failures.is_empty(),
        "{what}: {} of {} variants failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

#[test]
fn every_variant_validates_with_the_webgpu_baseline() {
    let all = compiled();
    for c in all {
        // f32 storage needs nothing at all; f16 storage only pack/unpack2x16float, which
        // wgpu withholds on llvmpipe without `shader-f16` (DownlevelFlags::SHADER_F16_IN_F32).
        // The MoE / layer kernels read f16 weights and Q4_0 scales the same way, the
        // GGUF-weight kernels their f16 scales, the cache attention its f16 cache.
        let caps = if [
            "STORE_F16",
            "WEIGHTS_F16",
            "WEIGHTS_Q4_0",
            "GGML",
            "F16_CACHE",
        ]
        .iter()
        .any(|f| c.spec.defines.has(f))
        {
            NagaCaps::SHADER_FLOAT16_IN_FLOAT32
        } else {
            NagaCaps::empty()
        };
        validate(&c.label, &c.source, &c.module, caps);
    }
    let mut labels: Vec<&str> = all.iter().map(|c| c.label.as_str()).collect();
    labels.sort();
    labels.dedup();
    assert_eq!(
        labels.len(),
        all.len(),
        "two variants share a label (cache key)"
    );
}

// --- Translation to every backend ----------------------------------------------------

/// Walks SPIR-V instructions: (opcode, operands).
fn spirv_instructions(words: &[u32]) -> Result<Vec<(u16, &[u32])>, String> {
    if words.len() < 5 || words[0] != 0x0723_0203 {
        return Err("missing SPIR-V header / magic number".into());
    }
    let mut out = vec![];
    let mut i = 5;
    while i < words.len() {
        let count = (words[i] >> 16) as usize;
        let opcode = (words[i] & 0xffff) as u16;
        if count == 0 || i + count > words.len() {
            return Err(format!("malformed instruction at word {i}"));
        }
        out.push((opcode, &words[i + 1..i + count]));
        i += count;
    }
    Ok(out)
}

fn spirv_string(words: &[u32]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[test]
fn translates_to_spirv() {
    const OP_ENTRY_POINT: u16 = 15;
    const OP_EXECUTION_MODE: u16 = 16;
    const GL_COMPUTE: u32 = 5;
    const LOCAL_SIZE: u32 = 17;
    for_all("SPIR-V", |c| {
        let wg = entry(c).workgroup_size;
        let mut binding_map = spv::BindingMap::default();
        for (b, _) in bindings(&c.module) {
            binding_map.insert(
                b,
                spv::BindingInfo {
                    descriptor_set: b.group,
                    binding: b.binding,
                    binding_array_size: None,
                },
            );
        }
        for version in [(1, 0), (1, 3)] {
            let options = spv::Options {
                lang_version: version,
                fake_missing_bindings: false,
                binding_map: binding_map.clone(),
                bounds_check_policies: policies(),
                ..Default::default()
            };
            let pipeline = spv::PipelineOptions {
                shader_stage: ShaderStage::Compute,
                entry_point: c.spec.entry.to_string(),
            };
            let words = spv::write_vec(&c.module, &c.info, &options, Some(&pipeline))
                .map_err(|e| format!("SPIR-V {version:?}: {e}"))?;
            let insts = spirv_instructions(&words)?;
            let ep = insts
                .iter()
                .find(|(op, args)| *op == OP_ENTRY_POINT && args[0] == GL_COMPUTE)
                .ok_or("no GLCompute OpEntryPoint")?;
            let name = spirv_string(&ep.1[2..]);
            if name != c.spec.entry {
                return Err(format!("entry point is `{name}`"));
            }
            let ep_id = ep.1[1];
            let local = insts
                .iter()
                .find(|(op, a)| *op == OP_EXECUTION_MODE && a[0] == ep_id && a[1] == LOCAL_SIZE)
                .ok_or("no LocalSize execution mode")?;
            if local.1[2..5] != wg {
                return Err(format!("LocalSize {:?} != {wg:?}", &local.1[2..5]));
            }
        }
        Ok(())
    });
}

#[test]
fn translates_to_msl() {
    for_all("MSL", |c| {
        let mut resources = msl::BindingMap::default();
        for (b, space) in bindings(&c.module) {
            resources.insert(
                b,
                msl::BindTarget {
                    buffer: Some(b.binding as u8),
                    mutable: matches!(space, AddressSpace::Storage { access } if access.contains(StorageAccess::STORE)),
                    ..Default::default()
                },
            );
        }
        let mut per_entry_point_map = msl::EntryPointResourceMap::default();
        per_entry_point_map.insert(
            c.spec.entry.to_string(),
            msl::EntryPointResources {
                resources,
                immediates_buffer: None,
                // Runtime-sized arrays with clamped indexing need the buffer sizes.
                sizes_buffer: Some(30),
            },
        );
        for version in [(2, 0), (2, 4)] {
            let options = msl::Options {
                lang_version: version,
                per_entry_point_map: per_entry_point_map.clone(),
                fake_missing_bindings: false,
                bounds_check_policies: policies(),
                zero_initialize_workgroup_memory: true,
                ..Default::default()
            };
            let pipeline = msl::PipelineOptions {
                entry_point: Some((ShaderStage::Compute, c.spec.entry.to_string())),
                ..Default::default()
            };
            let (text, info) = msl::write_string(&c.module, &c.info, &options, &pipeline)
                .map_err(|e| format!("MSL {version:?}: {e}"))?;
            let name = info
                .entry_point_names
                .first()
                .cloned()
                .ok_or("no entry point written")?
                .map_err(|e| format!("MSL {version:?}: {e}"))?;
            if !text.contains(&format!("kernel void {name}(")) {
                return Err(format!("MSL {version:?}: no `kernel void {name}(`"));
            }
        }
        Ok(())
    });
}

#[test]
fn translates_to_hlsl() {
    for_all("HLSL", |c| {
        let mut binding_map = hlsl::BindingMap::default();
        for (b, _) in bindings(&c.module) {
            binding_map.insert(
                b,
                hlsl::BindTarget {
                    space: b.group as u8,
                    register: b.binding,
                    ..Default::default()
                },
            );
        }
        let [x, y, z] = entry(c).workgroup_size;
        for model in [hlsl::ShaderModel::V5_1, hlsl::ShaderModel::V6_0] {
            let options = hlsl::Options {
                shader_model: model,
                binding_map: binding_map.clone(),
                fake_missing_bindings: false,
                zero_initialize_workgroup_memory: true,
                restrict_indexing: true,
                ..Default::default()
            };
            let pipeline = hlsl::PipelineOptions {
                entry_point: Some((ShaderStage::Compute, c.spec.entry.to_string())),
            };
            let mut text = String::new();
            let info = hlsl::Writer::new(&mut text, &options, &pipeline)
                .write(&c.module, &c.info, None)
                .map_err(|e| format!("HLSL {model:?}: {e}"))?;
            let name = info
                .entry_point_names
                .first()
                .cloned()
                .ok_or("no entry point written")?
                .map_err(|e| format!("HLSL {model:?}: {e}"))?;
            if !text.contains(&format!("[numthreads({x}, {y}, {z})]")) {
                return Err(format!("HLSL {model:?}: no [numthreads({x}, {y}, {z})]"));
            }
            if !text.contains(&format!("void {name}(")) {
                return Err(format!("HLSL {model:?}: no `void {name}(`"));
            }
        }
        Ok(())
    });
}

#[test]
fn translates_to_glsl_es_310_and_430() {
    for_all("GLSL", |c| {
        let mut binding_map = glsl::BindingMap::default();
        for (b, _) in bindings(&c.module) {
            binding_map.insert(b, b.binding as u8);
        }
        let [x, y, z] = entry(c).workgroup_size;
        for version in [glsl::Version::new_gles(310), glsl::Version::Desktop(430)] {
            let options = glsl::Options {
                version,
                writer_flags: glsl::WriterFlags::empty(),
                binding_map: binding_map.clone(),
                zero_initialize_workgroup_memory: true,
            };
            let pipeline = glsl::PipelineOptions {
                shader_stage: ShaderStage::Compute,
                entry_point: c.spec.entry.to_string(),
                multiview: None,
            };
            let mut text = String::new();
            glsl::Writer::new(
                &mut text,
                &c.module,
                &c.info,
                &options,
                &pipeline,
                policies(),
            )
            .and_then(|mut w| w.write())
            .map_err(|e| format!("GLSL {version}: {e}"))?;
            if !text.starts_with(&format!("#version {version}")) {
                return Err(format!("GLSL {version}: no #version line"));
            }
            let local =
                format!("layout(local_size_x = {x}, local_size_y = {y}, local_size_z = {z}) in;");
            if !text.contains(&local) || !text.contains("void main(") {
                return Err(format!(
                    "GLSL {version}: no compute entry point (`{local}`, main)"
                ));
            }
        }
        Ok(())
    });
}

// --- Browser default limits and host/shader agreement ----------------------------------

#[test]
fn no_optional_wgsl_extensions() {
    for_all("enable directives", |c| {
        for ext in ["subgroups", "f16", "chromium_"] {
            if c.source.lines().any(|l| {
                let l = l.trim_start();
                l.starts_with("enable") && l.contains(ext)
            }) {
                return Err(format!(
                    "enables `{ext}` (not available in every browser / GL)"
                ));
            }
        }
        // A subgroup builtin needs the extension in a browser even where nothing uses it.
        for builtin in [
            "subgroup_id",
            "num_subgroups",
            "subgroup_size",
            "subgroup_invocation_id",
        ] {
            if c.source.contains(&format!("@builtin({builtin})")) {
                return Err(format!(
                    "declares @builtin({builtin}) (needs `enable subgroups`)"
                ));
            }
        }
        Ok(())
    });
}

/// A `const` the variant was compiled with (`D`, `BQ`, ...), from its signature.
fn const_of(spec: &KernelSpec, name: &str) -> Option<usize> {
    spec.defines.signature().split(',').find_map(|part| {
        let (k, v) = part.split_once('=')?;
        (k == name).then(|| v.trim_end_matches('u').parse().ok())?
    })
}

/// Invocations per workgroup of the variant's entry point.
fn invocations(c: &Compiled) -> Result<u32, String> {
    let ep = entry(c);
    if ep.workgroup_size_overrides.is_some() {
        return Err("workgroup size set by overrides: cannot check it statically".into());
    }
    Ok(ep.workgroup_size.iter().product())
}

/// Workgroup memory of the variant as WebGPU counts it (each variable rounded up to 16).
fn workgroup_bytes(c: &Compiled) -> Result<u32, String> {
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(c.module.to_ctx())
        .map_err(|e| format!("layout: {e}"))?;
    Ok(c.module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == AddressSpace::WorkGroup)
        .map(|(_, g)| layouter[g.ty].size.div_ceil(16) * 16)
        .sum())
}

#[test]
fn every_variant_fits_webgpu_invocation_and_binding_limits() {
    for_all("WebGPU default limits", |c| {
        let wg = entry(c).workgroup_size;
        let n = invocations(c)?;
        if n > WEB_INVOCATIONS {
            return Err(format!("{wg:?} = {n} invocations > {WEB_INVOCATIONS}"));
        }
        if wg.iter().zip(WEB_WORKGROUP_DIMS).any(|(a, b)| *a > b) {
            return Err(format!(
                "workgroup size {wg:?} exceeds {WEB_WORKGROUP_DIMS:?}"
            ));
        }
        let b = bindings(&c.module);
        let storage = b
            .iter()
            .filter(|(_, s)| matches!(s, AddressSpace::Storage { .. }))
            .count();
        let uniform = b
            .iter()
            .filter(|(_, s)| *s == AddressSpace::Uniform)
            .count();
        if storage > WEB_STORAGE_BUFFERS || uniform > WEB_UNIFORM_BUFFERS {
            return Err(format!(
                "{storage} storage / {uniform} uniform buffers per stage"
            ));
        }
        if b.iter().any(|(rb, _)| rb.group >= 4) {
            return Err("bind group index >= 4 (WebGPU maxBindGroups)".into());
        }
        Ok(())
    });
}

#[test]
fn host_workgroup_estimate_covers_the_shader() {
    // The launcher picks tiles from `dense_workgroup_bytes`; it must never undercount.
    for_all("dense_workgroup_bytes", |c| {
        if c.spec.file != "attention/flash.wgsl" {
            return Ok(());
        }
        let bq = const_of(&c.spec, "BQ").ok_or("no BQ")?;
        let estimate = dense_workgroup_bytes(bq);
        let actual = workgroup_bytes(c)?;
        if actual > estimate {
            return Err(format!(
                "shader uses {actual} bytes, the host plans with {estimate}"
            ));
        }
        Ok(())
    });
}

#[test]
fn moe_and_layer_variants_fit_webgpu_default_workgroup_memory() {
    // These families have one tile configuration each: it must fit everywhere.
    for_all("16 KiB workgroup memory", |c| {
        if !c.spec.file.starts_with("moe/") && !c.spec.file.starts_with("ops/") {
            return Ok(());
        }
        let bytes = workgroup_bytes(c)?;
        if bytes > 16384 {
            return Err(format!("{bytes} B of workgroup memory > 16384"));
        }
        Ok(())
    });
}

#[test]
fn tile_choice_fits_the_device_limits() {
    let all = compiled();
    let base = Context::cpu().capabilities().clone();
    let mut failures = vec![];
    // WebGPU's defaults (256 invocations, 16 KiB) first, then other real-world limits.
    for (max_invocations, max_workgroup_storage) in [
        (256, 16384),
        (128, 16384),
        (1024, 16352),
        (256, 17408),
        (1024, 32768),
        (1024, 49152),
        (1024, 65536),
    ] {
        let caps = Capabilities {
            max_invocations,
            max_workgroup_storage,
            ..base.clone()
        };
        for d in [64, 128, 256] {
            let t = DenseTiles::choose(&caps);
            let chosen: Vec<&Compiled> = all
                .iter()
                .filter(|c| {
                    const_of(&c.spec, "D") == Some(d) && const_of(&c.spec, "BQ") == Some(t.bq)
                })
                .collect();
            if chosen.is_empty() {
                failures.push(format!(
                    "d={d} {t:?}: no such variant in wgsparse::all_kernel_variants()"
                ));
            }
            for c in chosen {
                let (n, bytes) = (invocations(c).unwrap(), workgroup_bytes(c).unwrap());
                if n > max_invocations || bytes > max_workgroup_storage {
                    failures.push(format!(
                        "limits ({max_invocations} invocations, {max_workgroup_storage} B): \
                         chose {} needing {n} invocations, {bytes} B",
                        c.label
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn shader_bindings_match_the_kernel_spec() {
    for_all("bindings vs KernelSpec", |c| {
        let b = bindings(&c.module);
        if b.len() != c.spec.bindings.len() {
            return Err(format!(
                "shader declares {} bindings, the spec {}",
                b.len(),
                c.spec.bindings.len()
            ));
        }
        for (i, ((rb, space), kind)) in b.iter().zip(&c.spec.bindings).enumerate() {
            if rb.group != 0 || rb.binding != i as u32 {
                return Err(format!(
                    "binding {i} is @group({}) @binding({})",
                    rb.group, rb.binding
                ));
            }
            let ok = match (kind, space) {
                (BindingKind::Uniform, AddressSpace::Uniform) => true,
                (BindingKind::StorageRead, AddressSpace::Storage { access }) => {
                    !access.contains(StorageAccess::STORE)
                }
                (BindingKind::StorageReadWrite, AddressSpace::Storage { access }) => {
                    access.contains(StorageAccess::STORE)
                }
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "binding {i}: spec says {kind:?}, shader has {space:?}"
                ));
            }
        }
        Ok(())
    });
}

#[test]
fn uniform_params_match_the_host_struct() {
    for_all("uniform Params layout", |c| {
        let host = c
            .spec
            .defines
            .params_size()
            .ok_or("no Params declared with Defines::params")?;
        let host = host as u32;
        let mut layouter = naga::proc::Layouter::default();
        layouter
            .update(c.module.to_ctx())
            .map_err(|e| format!("layout: {e}"))?;
        let (_, g) = c
            .module
            .global_variables
            .iter()
            .find(|(_, g)| g.space == AddressSpace::Uniform)
            .ok_or("no uniform")?;
        let size = layouter[g.ty].size;
        if size != host {
            return Err(format!("WGSL Params is {size} bytes, its Rust twin {host}"));
        }
        Ok(())
    });
}

/// The matrix-unit variants (cooperative matrices): naga parses and validates every one
/// with the capabilities they need (f16, subgroups, cooperative matrices) and writes
/// SPIR-V at tile 8 and 16 and MSL at tile 8 (Metal has only 8x8 simdgroup matrices;
/// HLSL, GLSL and browser WebGPU have none, and the plans never pick them there).
#[test]
fn coop_variants_translate_to_spirv_and_msl() {
    let caps = webgpu_baseline()
        | NagaCaps::SHADER_FLOAT16
        | NagaCaps::SUBGROUP
        | NagaCaps::COOPERATIVE_MATRIX;
    let mut failures = vec![];
    let mut count = 0;
    for tile in [8, 16] {
        for spec in wgsparse::all_coop_variants(tile) {
            count += 1;
            let label = spec.label();
            let source = spec.source().expect("preprocess");
            let module = match naga::front::wgsl::parse_str(&source) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{label}: parse: {}", e.emit_to_string(&source)));
                    continue;
                }
            };
            let info = match Validator::new(ValidationFlags::all(), caps).validate(&module) {
                Ok(i) => i,
                Err(e) => {
                    failures.push(format!("{label}: validate: {}", e.emit_to_string(&source)));
                    continue;
                }
            };
            let options = spv::Options {
                lang_version: (1, 3),
                bounds_check_policies: policies(),
                ..Default::default()
            };
            let pipeline = spv::PipelineOptions {
                shader_stage: ShaderStage::Compute,
                entry_point: spec.entry.to_string(),
            };
            match spv::write_vec(&module, &info, &options, Some(&pipeline)) {
                Err(e) => failures.push(format!("{label}: SPIR-V: {e}")),
                // The test script validates these with a spirv-val that knows
                // SPV_KHR_cooperative_matrix (Debian 13's, in the coop root).
                Ok(words) => {
                    if let Some(dir) = std::env::var_os("WGSPARSE_SPIRV_OUT") {
                        let dir = std::path::Path::new(&dir);
                        std::fs::create_dir_all(dir).unwrap();
                        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                        let name = format!("t{tile}_{count:03}_{}.spv", spec.entry);
                        std::fs::write(dir.join(name), bytes).unwrap();
                    }
                }
            }
            if tile == 8 {
                let options = msl::Options {
                    lang_version: (2, 4),
                    fake_missing_bindings: true,
                    bounds_check_policies: policies(),
                    zero_initialize_workgroup_memory: true,
                    ..Default::default()
                };
                let pipeline = msl::PipelineOptions {
                    entry_point: Some((ShaderStage::Compute, spec.entry.to_string())),
                    ..Default::default()
                };
                if let Err(e) = msl::write_string(&module, &info, &options, &pipeline) {
                    failures.push(format!("{label}: MSL: {e}"));
                }
            }
        }
    }
    assert!(count > 0, "no matrix-unit variants");
    assert!(
        failures.is_empty(),
        "{} of {count} matrix-unit variants failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
