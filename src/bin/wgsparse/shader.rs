//! `wgsparse shader`: the final WGSL of kernel variants (after includes and defines).

use wgsparse::{Error, Result};

pub fn run(list: bool, name: Option<String>) -> Result<()> {
    let variants = wgsparse::all_kernel_variants();
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
