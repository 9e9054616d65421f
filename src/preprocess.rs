//! A small WGSL preprocessor: `#include "file"`, `#ifdef` / `#ifndef` / `#else` /
//! `#endif` on flags, and typed constants injected as WGSL `const` declarations.
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
        "common/online_softmax.wgsl",
        include_str!("../shaders/common/online_softmax.wgsl"),
    ),
    (
        "common/storage.wgsl",
        include_str!("../shaders/common/storage.wgsl"),
    ),
    (
        "flash_attention.wgsl",
        include_str!("../shaders/flash_attention.wgsl"),
    ),
];

/// Looks a shader file up by its path under `shaders/`.
pub fn shader_file(path: &str) -> Option<&'static str> {
    SHADER_FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, src)| *src)
}

/// What one kernel variant is compiled with: flags for `#ifdef` and `const` values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Defines {
    flags: BTreeSet<String>,
    consts: BTreeMap<String, String>,
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
    let mut included = BTreeSet::new();
    expand(path, defines, load, &mut included, &mut out, 0)?;
    Ok(out)
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
        let body: Vec<&str> = out.lines().skip(1).collect();
        assert_eq!(
            body,
            vec![
                "const D: u32 = 64u;",
                "const S: f32 = 0.5;",
                "a",
                "x",
                "no_y"
            ]
        );
        let out = preprocess_with("main.wgsl", &Defines::new().flag("Y"), &files).unwrap();
        assert_eq!(out.lines().skip(1).collect::<Vec<_>>(), vec!["a", "not_x"]);
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
