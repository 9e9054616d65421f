//! Progress of the long commands (`eval`, `calibrate`, `dump-qkv`): a bar on a terminal,
//! plain lines on stderr otherwise, nothing but the result with `--json`.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps on stderr when it is a terminal and `json` is off; otherwise its
/// notes are plain stderr lines (`json`: none).
pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress {
    /// Starts the bar (`what` is its label).
    pub fn new(len: u64, what: &str, json: bool) -> Self {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(len);
            b.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})")
                    .expect("valid template"),
            );
            b.set_message(what.to_string());
            b
        });
        Progress { bar, quiet: json }
    }

    /// One step done, with a line saying what it was.
    pub fn step(&self, note: &str) {
        match &self.bar {
            Some(b) => {
                b.println(note);
                b.inc(1);
            }
            None if !self.quiet => eprintln!("{note}"),
            None => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
