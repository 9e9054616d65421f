//! The per-adapter tuning table of the attention kernel: the kernel and tiling
//! (`FlashKernel`: portable, or matrix units with their `CoopTiles`) that `wgsparse tune`
//! measured fastest per head_dim on one adapter, cached as JSON and preferred by the
//! plans on that adapter (when it still fits the plan's key mode). Without a table the
//! plans use the default choice.
//!
//! The file is `$WGSPARSE_TUNE_FILE`, else `$XDG_CACHE_HOME/wgsparse/tune.json`, else
//! `$HOME/.cache/wgsparse/tune.json`; an adapter is keyed by backend, name and driver.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Tuned choices: adapter key → head_dim → choice (the attention kernel stores its
/// `FlashKernel`; the table knows no kernel).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "K: Serialize + DeserializeOwned")]
pub struct TuneTable<K> {
    /// Per adapter (see [`adapter_key`]), per head_dim.
    pub adapters: BTreeMap<String, BTreeMap<usize, K>>,
}

impl<K> Default for TuneTable<K> {
    fn default() -> Self {
        TuneTable {
            adapters: BTreeMap::new(),
        }
    }
}

/// The key of an adapter in the table.
pub fn adapter_key(info: &wgpu::AdapterInfo) -> String {
    format!("{:?} / {} / {}", info.backend, info.name, info.driver_info)
}

/// Where the table lives (see the module docs); `None` where nothing says.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WGSPARSE_TUNE_FILE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wgsparse").join("tune.json"))
}

impl<K: Serialize + DeserializeOwned> TuneTable<K> {
    /// Reads a table; a missing file is an empty table.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::InvalidArgument(format!("tuning table {}: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the table (creating its folder).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(self).expect("tables serialize");
        std::fs::write(path, text)?;
        Ok(())
    }
}

/// The tuned tiling for `head_dim` on this adapter, if the table has one. A table that
/// cannot be read is ignored with a warning: tuning is an optimisation, never an error.
pub fn lookup<K: Copy + Serialize + DeserializeOwned>(
    info: &wgpu::AdapterInfo,
    head_dim: usize,
) -> Option<K> {
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (info, head_dim);
        None
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let path = default_path()?;
        match TuneTable::<K>::load(&path) {
            Ok(t) => t.adapters.get(&adapter_key(info))?.get(&head_dim).copied(),
            Err(e) => {
                log::warn!("ignoring the tuning table: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_and_a_missing_file_is_empty() {
        let dir = std::env::temp_dir().join(format!("wgsparse-tune-{}", std::process::id()));
        let path = dir.join("t.json");
        assert_eq!(TuneTable::<u32>::load(&path).unwrap(), TuneTable::default());
        let mut t = TuneTable::default();
        let tiles = 7u32;
        t.adapters
            .entry("Vulkan / X / y".into())
            .or_default()
            .insert(128, tiles);
        t.save(&path).unwrap();
        assert_eq!(TuneTable::load(&path).unwrap(), t);
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(
            TuneTable::<u32>::load(&path),
            Err(Error::InvalidArgument(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
