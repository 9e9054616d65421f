//! The JSON files the crate writes and reads back (calibrated thresholds, attention
//! budgets): one reader and one writer whose errors name the file.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// A [`Error::BadFile`] naming `path`.
pub(crate) fn bad_file(path: &Path, message: impl ToString) -> Error {
    Error::BadFile {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Reads and parses a JSON file; unreadable or malformed files are [`Error::BadFile`].
pub(crate) fn load<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| bad_file(path, e))?;
    serde_json::from_str(&text).map_err(|e| bad_file(path, e))
}

/// Writes `value` as pretty JSON; a write that fails is [`Error::BadFile`].
pub(crate) fn save<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| bad_file(path, e))?;
    std::fs::write(path, text).map_err(|e| bad_file(path, e))
}
