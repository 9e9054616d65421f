//! `wgsparse shader`: the final WGSL of kernel variants (after includes and defines).

use wgsparse::{Error, Result};

pub fn run(list: bool, name: Option<String>, dump: Option<std::path::PathBuf>) -> Result<()> {
    let variants = wgsparse::all_kernel_variants();
    if let Some(dir) = dump {
        std::fs::create_dir_all(&dir)?;
        for (i, v) in variants.iter().enumerate() {
            std::fs::write(dir.join(format!("{i:03}.wgsl")), v.source()?)?;
        }
        println!("{} variants written to {}", variants.len(), dir.display());
        return Ok(());
    }
    if list || name.is_none() {
        for (i, v) in variants.iter().enumerate() {
            println!("{i:3} {}", v.label());
        }
        return Ok(());
    }
    let name = name.expect("checked");
    let spec = variants
        .iter()
        .enumerate()
        .find(|(i, v)| v.label() == name || i.to_string() == name)
        .map(|(_, v)| v)
        .ok_or_else(|| Error::InvalidArgument(format!("no variant `{name}` (see --list)")))?;
    print!("{}", spec.source()?);
    Ok(())
}
