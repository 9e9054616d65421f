//! A small WGSL preprocessor: `#include "file"`, `#ifdef` / `#ifndef` / `#else` /
//! `#endif` on flags, typed constants injected as WGSL `const` declarations, and
//! `#unroll VAR COUNT` … `#endunroll`, which repeats its lines COUNT times (a number or
//! a u32 constant of the variant) with `${VAR}` replaced by 0, 1, …
//!
//! Unrolling matters for speed: WGSL has no unroll hint, and a private array indexed by
//! a loop counter ends up in slow local memory on some drivers; unrolled, every index is
//! a constant and the array lives in registers.
//!
//! WGSL has no includes or templates, so shared snippets (online softmax, tile loaders)
//! live in `shaders/common/` and kernels pull them in here. Everything else is plain WGSL
//! so that the output stays readable (`wgsparse shader NAME` dumps it).

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};

/// All `.wgsl` files of the crate, embedded at compile time, keyed by their path under
/// `shaders/`.
pub const SHADER_FILES: &[(&str, &str)] = &[
    (
        "quant/ggml.wgsl",
        include_str!("../../shaders/quant/ggml.wgsl"),
    ),
    ("ops/gemv.wgsl", include_str!("../../shaders/ops/gemv.wgsl")),
    (
        "ops/embed.wgsl",
        include_str!("../../shaders/ops/embed.wgsl"),
    ),
    ("ops/act.wgsl", include_str!("../../shaders/ops/act.wgsl")),
    (
        "attention/decode.wgsl",
        include_str!("../../shaders/attention/decode.wgsl"),
    ),
    (
        "common/online_softmax.wgsl",
        include_str!("../../shaders/common/online_softmax.wgsl"),
    ),
    (
        "attention/flash_common.wgsl",
        include_str!("../../shaders/attention/flash_common.wgsl"),
    ),
    (
        "attention/flash_coop.wgsl",
        include_str!("../../shaders/attention/flash_coop.wgsl"),
    ),
    (
        "common/coop.wgsl",
        include_str!("../../shaders/common/coop.wgsl"),
    ),
    (
        "ops/linear_common.wgsl",
        include_str!("../../shaders/ops/linear_common.wgsl"),
    ),
    (
        "ops/linear_coop.wgsl",
        include_str!("../../shaders/ops/linear_coop.wgsl"),
    ),
    (
        "common/scan.wgsl",
        include_str!("../../shaders/common/scan.wgsl"),
    ),
    (
        "common/topk.wgsl",
        include_str!("../../shaders/common/topk.wgsl"),
    ),
    (
        "common/compact.wgsl",
        include_str!("../../shaders/common/compact.wgsl"),
    ),
    (
        "common/storage.wgsl",
        include_str!("../../shaders/common/storage.wgsl"),
    ),
    (
        "quant/weights.wgsl",
        include_str!("../../shaders/quant/weights.wgsl"),
    ),
    (
        "ops/rmsnorm.wgsl",
        include_str!("../../shaders/ops/rmsnorm.wgsl"),
    ),
    ("ops/rope.wgsl", include_str!("../../shaders/ops/rope.wgsl")),
    (
        "ops/linear.wgsl",
        include_str!("../../shaders/ops/linear.wgsl"),
    ),
    (
        "attention/flash.wgsl",
        include_str!("../../shaders/attention/flash.wgsl"),
    ),
    (
        "attention/select/anchor.wgsl",
        include_str!("../../shaders/attention/select/anchor.wgsl"),
    ),
    (
        "attention/select/sale_quantize.wgsl",
        include_str!("../../shaders/attention/select/sale_quantize.wgsl"),
    ),
    (
        "attention/select/sale_estimate.wgsl",
        include_str!("../../shaders/attention/select/sale_estimate.wgsl"),
    ),
    (
        "attention/select/proxy.wgsl",
        include_str!("../../shaders/attention/select/proxy.wgsl"),
    ),
    (
        "moe/router.wgsl",
        include_str!("../../shaders/moe/router.wgsl"),
    ),
    (
        "moe/experts_ggml.wgsl",
        include_str!("../../shaders/moe/experts_ggml.wgsl"),
    ),
    (
        "moe/dispatch.wgsl",
        include_str!("../../shaders/moe/dispatch.wgsl"),
    ),
    (
        "moe/expert_ffn.wgsl",
        include_str!("../../shaders/moe/expert_ffn.wgsl"),
    ),
    (
        "moe/expert_ffn_coop.wgsl",
        include_str!("../../shaders/moe/expert_ffn_coop.wgsl"),
    ),
    (
        "common/row_sum.wgsl",
        include_str!("../../shaders/common/row_sum.wgsl"),
    ),
    (
        "common/invocation.wgsl",
        include_str!("../../shaders/common/invocation.wgsl"),
    ),
    (
        "moe/expert_common.wgsl",
        include_str!("../../shaders/moe/expert_common.wgsl"),
    ),
    (
        "moe/combine.wgsl",
        include_str!("../../shaders/moe/combine.wgsl"),
    ),
];

/// Looks a shader file up by its path under `shaders/`.
pub fn shader_file(path: &str) -> Option<&'static str> {
    SHADER_FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, src)| *src)
}

/// Uniform parameters shared by a kernel and its launcher, declared once with
/// [`wgsl_params!`](crate::wgsl_params): the `#[repr(C)]` Rust struct and the WGSL
/// `struct Params` the preprocessor puts at the top of the shader come from one field
/// list, so the two layouts cannot drift apart.
pub trait WgslParams: bytemuck::Pod {
    /// `(name, Rust type)` of every field in order: `u32`, `f32`, or `[u32; N]` (padding,
    /// declared in WGSL as `N` fields `name0..`).
    fn fields() -> &'static [(&'static str, &'static str)];

    /// The WGSL declaration `struct Params { ... }`, the same size as `Self`.
    fn wgsl() -> String {
        let mut s = String::from("struct Params {\n");
        for &(name, ty) in Self::fields() {
            let array = ty
                .strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.split_once(';'));
            match array {
                Some((elem, n)) => {
                    let n: usize = n.trim().parse().expect("array length");
                    for i in 0..n {
                        s.push_str(&format!("    {name}{i}: {},\n", elem.trim()));
                    }
                }
                None => s.push_str(&format!("    {name}: {ty},\n")),
            }
        }
        s.push_str("}\n");
        s
    }
}

/// Declares a kernel's uniform parameters: a `#[repr(C)]`, `Pod` struct of `u32`/`f32`
/// fields (and padding fields of `u32` or `[u32; N]` to a multiple of 16 bytes) that
/// implements [`WgslParams`].
#[macro_export]
macro_rules! wgsl_params {
    ($(#[$m:meta])* $vis:vis struct $name:ident {
        $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)?
    }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$fm])* $field: $ty),*
        }
        impl $crate::runtime::preprocess::WgslParams for $name {
            fn fields() -> &'static [(&'static str, &'static str)] {
                &[$((stringify!($field), stringify!($ty))),*]
            }
        }
    };
}

// The macro by its module's path, so that kernels name the runtime, not the crate root.
pub use crate::wgsl_params;

/// What one kernel variant is compiled with: flags for `#ifdef` and `const` values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Defines {
    flags: BTreeSet<String>,
    consts: BTreeMap<String, String>,
    /// The kernel's `struct Params` (from [`WgslParams`]) and
    /// the size of its Rust twin.
    params: Option<(String, usize)>,
}

impl Defines {
    /// No flags, no constants.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets a flag tested by `#ifdef NAME`.
    pub fn flag(mut self, name: &str) -> Self {
        self.flags.insert(name.to_string());
        self
    }
    /// Declares the kernel's uniform `struct Params` from its Rust twin `P`.
    pub fn params<P: WgslParams>(mut self) -> Self {
        self.params = Some((P::wgsl(), std::mem::size_of::<P>()));
        self
    }
    /// Size in bytes of the Rust twin of the kernel's `struct Params`, when declared
    /// with [`Defines::params`] (the portability tests check the WGSL layout against it).
    pub fn params_size(&self) -> Option<usize> {
        self.params.as_ref().map(|(_, size)| *size)
    }
    /// Sets a flag when `on` is true.
    pub fn flag_if(self, name: &str, on: bool) -> Self {
        if on { self.flag(name) } else { self }
    }
    /// Declares `const NAME: u32 = value;` at the top of the shader.
    pub fn const_u32(mut self, name: &str, value: u32) -> Self {
        self.consts
            .insert(name.to_string(), format!("const {name}: u32 = {value}u;"));
        self
    }
    /// Declares `const NAME: f32 = value;` at the top of the shader.
    pub fn const_f32(mut self, name: &str, value: f32) -> Self {
        self.consts
            .insert(name.to_string(), format!("const {name}: f32 = {value:?};"));
        self
    }
    /// The value of a u32 constant set with [`Defines::const_u32`].
    pub fn const_u32_value(&self, name: &str) -> Option<u32> {
        let decl = self.consts.get(name)?;
        decl.rsplit('=')
            .next()?
            .trim()
            .trim_end_matches(';')
            .trim_end_matches('u')
            .parse()
            .ok()
    }
    /// True when the flag is set.
    pub fn has(&self, name: &str) -> bool {
        self.flags.contains(name)
    }
    /// A short stable text naming this variant (for labels and cache keys).
    pub fn signature(&self) -> String {
        let mut parts: Vec<String> = self.flags.iter().cloned().collect();
        parts.extend(self.consts.iter().map(|(k, v)| {
            let value = v.rsplit('=').next().unwrap_or("").trim_end_matches(';');
            format!("{k}={}", value.trim())
        }));
        parts.join(",")
    }
}

/// Expands `path` (a file under `shaders/`) with the given defines into one WGSL text.
pub fn preprocess(path: &str, defines: &Defines) -> Result<String> {
    preprocess_with(path, defines, &|p| shader_file(p).map(str::to_string))
}

/// Same as [`preprocess`] with a custom file loader (used by tests).
pub fn preprocess_with(
    path: &str,
    defines: &Defines,
    load: &dyn Fn(&str) -> Option<String>,
) -> Result<String> {
    let mut out = String::new();
    out.push_str(&format!("// wgsparse: {path} [{}]\n", defines.signature()));
    for decl in defines.consts.values() {
        out.push_str(decl);
        out.push('\n');
    }
    if let Some((p, _)) = &defines.params {
        out.push_str(p);
    }
    let mut included = BTreeSet::new();
    let mut body = String::new();
    expand(path, defines, load, &mut included, &mut body, 0)?;
    // WGSL wants its directives (`enable f16;`) before every declaration, so they move
    // above the constants and the parameter struct written here.
    let (directives, rest): (Vec<&str>, Vec<&str>) = body
        .lines()
        .partition(|l| l.trim_start().starts_with("enable ") && l.trim_end().ends_with(';'));
    let mut header = directives.join("\n");
    if !header.is_empty() {
        header.push('\n');
    }
    out.insert_str(out.find('\n').map_or(0, |i| i + 1), &header);
    for l in rest {
        out.push_str(l);
        out.push('\n');
    }
    let lines: Vec<&str> = out.lines().collect();
    let mut unrolled = String::with_capacity(out.len() * 2);
    unroll(path, &lines, &[], defines, &mut unrolled)?;
    Ok(unrolled)
}

/// Expands `#unroll` blocks (nested ones too) and substitutes `${VAR}`.
fn unroll(
    path: &str,
    lines: &[&str],
    subst: &[(String, u32)],
    defines: &Defines,
    out: &mut String,
) -> Result<()> {
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if let Some(rest) = t.strip_prefix("#unroll") {
            let mut words = rest.split_whitespace();
            let (Some(var), Some(count)) = (words.next(), words.next()) else {
                return Err(err(path, i, "#unroll needs a variable and a count"));
            };
            let n = count
                .parse::<u32>()
                .ok()
                .or_else(|| defines.const_u32_value(count))
                .ok_or_else(|| err(path, i, format!("unroll count `{count}` is not known")))?;
            let mut depth = 1;
            let mut j = i + 1;
            while j < lines.len() {
                let tj = lines[j].trim_start();
                if tj.starts_with("#unroll") {
                    depth += 1;
                } else if tj.starts_with("#endunroll") {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                j += 1;
            }
            if j == lines.len() {
                return Err(err(path, i, "#unroll without #endunroll"));
            }
            for k in 0..n {
                let mut inner = subst.to_vec();
                inner.push((var.to_string(), k));
                unroll(path, &lines[i + 1..j], &inner, defines, out)?;
            }
            i = j + 1;
        } else if t.starts_with("#endunroll") {
            return Err(err(path, i, "#endunroll without #unroll"));
        } else {
            let mut line = lines[i].to_string();
            for (var, k) in subst {
                line = line.replace(&format!("${{{var}}}"), &k.to_string());
            }
            out.push_str(&line);
            out.push('\n');
            i += 1;
        }
    }
    Ok(())
}

fn err(path: &str, line: usize, message: impl Into<String>) -> Error {
    Error::Shader {
        name: path.to_string(),
        message: format!("line {}: {}", line + 1, message.into()),
    }
}

fn expand(
    path: &str,
    defines: &Defines,
    load: &dyn Fn(&str) -> Option<String>,
    included: &mut BTreeSet<String>,
    out: &mut String,
    depth: usize,
) -> Result<()> {
    if depth > 16 {
        return Err(err(path, 0, "includes nested deeper than 16 (a cycle?)"));
    }
    // Each file is included once, like `#pragma once`, so snippets may include each other.
    if !included.insert(path.to_string()) {
        return Ok(());
    }
    let src = load(path).ok_or_else(|| Error::Shader {
        name: path.to_string(),
        message: "no such shader file".into(),
    })?;
    // Stack of (this branch active, some branch of this #if was taken).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &[(bool, bool)]| stack.iter().all(|(a, _)| *a);
    for (n, line) in src.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix('#') {
            let mut words = rest.split_whitespace();
            let directive = words.next().unwrap_or("");
            let arg = words.next();
            match directive {
                "ifdef" | "ifndef" => {
                    let name = arg.ok_or_else(|| err(path, n, "#ifdef needs a name"))?;
                    let cond = defines.has(name) == (directive == "ifdef");
                    stack.push((cond, cond));
                }
                "else" => {
                    let top = stack
                        .last_mut()
                        .ok_or_else(|| err(path, n, "#else without #ifdef"))?;
                    top.0 = !top.1;
                    top.1 = true;
                }
                "endif" => {
                    stack
                        .pop()
                        .ok_or_else(|| err(path, n, "#endif without #ifdef"))?;
                }
                "include" => {
                    if active(&stack) {
                        let target = rest.trim_start_matches("include").trim().trim_matches('"');
                        expand(target, defines, load, included, out, depth + 1)?;
                    }
                }
                "unroll" | "endunroll" => {
                    // Kept for the unroll pass, which runs after includes and #ifdefs.
                    if active(&stack) {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
                other => return Err(err(path, n, format!("unknown directive #{other}"))),
            }
            continue;
        }
        if active(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(err(path, src.lines().count(), "missing #endif"));
    }
    Ok(())
}

/// Parses and validates WGSL with naga; returns the module and its validation info.
pub fn validate_wgsl(name: &str, source: &str) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| Error::Shader {
        name: name.to_string(),
        message: e.emit_to_string(source),
    })?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| Error::Shader {
        name: name.to_string(),
        message: e.emit_to_string(source),
    })?;
    Ok((module, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(p: &str) -> Option<String> {
        match p {
            "main.wgsl" => Some(
                "#include \"a.wgsl\"\n#ifdef X\nx\n#else\nnot_x\n#endif\n#ifndef Y\nno_y\n#endif\n#include \"a.wgsl\"\n"
                    .into(),
            ),
            "a.wgsl" => Some("#include \"main.wgsl\"\na\n".into()),
            "bad.wgsl" => Some("#ifdef X\n".into()),
            "bad2.wgsl" => Some("#endif\n".into()),
            "bad3.wgsl" => Some("#pragma\n".into()),
            _ => None,
        }
    }

    #[test]
    fn flags_consts_and_includes() {
        let d = Defines::new()
            .flag("X")
            .const_u32("D", 64)
            .const_f32("S", 0.5);
        let out = preprocess_with("main.wgsl", &d, &files).unwrap();
        let want = "const D: u32 = 64u;\nconst S: f32 = 0.5;\na\nx\nno_y";
        assert_eq!(out.lines().skip(1).collect::<Vec<_>>().join("\n"), want);
        let out = preprocess_with("main.wgsl", &Defines::new().flag("Y"), &files).unwrap();
        assert_eq!(out.lines().skip(1).collect::<Vec<_>>(), vec!["a", "not_x"]);
    }

    #[test]
    fn unroll_repeats_and_substitutes_nested() {
        let files = |p: &str| -> Option<String> {
            (p == "u.wgsl").then(|| {
                "#unroll i 2\n#unroll c NC\na[${i} * 3 + ${c}]\n#endunroll\n#endunroll\nend\n"
                    .into()
            })
        };
        let d = Defines::new().const_u32("NC", 3);
        assert_eq!(d.const_u32_value("NC"), Some(3));
        let out = preprocess_with("u.wgsl", &d, &files).unwrap();
        let want: Vec<String> = (0..6)
            .map(|i| format!("a[{} * 3 + {}]", i / 3, i % 3))
            .chain(["end".to_string()])
            .collect();
        assert_eq!(out.lines().skip(2).collect::<Vec<_>>(), want);
        let bad = |p: &str| -> Option<String> {
            match p {
                "a.wgsl" => Some("#unroll i 2\nx\n".into()),
                "b.wgsl" => Some("#endunroll\n".into()),
                "c.wgsl" => Some("#unroll i MISSING\nx\n#endunroll\n".into()),
                _ => None,
            }
        };
        for f in ["a.wgsl", "b.wgsl", "c.wgsl"] {
            assert!(matches!(
                preprocess_with(f, &d, &bad),
                Err(Error::Shader { .. })
            ));
        }
    }

    #[test]
    fn errors_are_typed() {
        for f in ["bad.wgsl", "bad2.wgsl", "bad3.wgsl", "missing.wgsl"] {
            assert!(matches!(
                preprocess_with(f, &Defines::new(), &files),
                Err(Error::Shader { .. })
            ));
        }
    }
}
