//! Passkey retrieval: a task check of long-context attention, not only a recall figure.
//! A five-digit number is hidden at a chosen depth of a long filler text (a novel), and
//! the model is asked to repeat it after the text; a run succeeds when the greedy
//! continuation contains the number. Sparse prompt attention that drops the needle's
//! keys fails here even when its average attention-mass recall looks fine.
//!
//! [`passkey_prompt`] builds the prompt to a token length (the filler cut at whole
//! sentences around the needle), [`passkey_found`] scores a continuation.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::tokenizer::ModelTokenizer;

/// The instruction before the filler.
const INTRO: &str = "There is a pass key hidden inside a lot of irrelevant text. Find it and \
                     memorize it. I will quiz you about the pass key.\n\n";

/// The question after the filler; the model continues after "is".
const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

/// The sentence holding the number.
pub fn needle(key: u32) -> String {
    format!(" The pass key is {key:05}. Remember it. {key:05} is the pass key. ")
}

/// A prompt of `tokens` tokens (within a few tokens: the filler is cut at token
/// boundaries) with `key` hidden at `depth` (0 = right after the instruction, 1 = right
/// before the question), the filler taken from the start of `filler`.
pub fn passkey_prompt(
    tok: &ModelTokenizer,
    filler: &str,
    tokens: usize,
    depth: f64,
    key: u32,
) -> Result<Vec<u32>> {
    if !(0.0..=1.0).contains(&depth) || key > 99_999 {
        return Err(Error::InvalidArgument(format!(
            "depth {depth} must be in 0..=1 and the key five digits (got {key})"
        )));
    }
    let head = tok.encode_prompt(INTRO)?;
    let needle = tok.encode(&needle(key))?;
    let question = tok.encode(QUESTION)?;
    let fixed = head.len() + needle.len() + question.len();
    if tokens <= fixed + 16 {
        return Err(Error::InvalidArgument(format!(
            "{tokens} tokens leave no room for filler (the fixed parts take {fixed})"
        )));
    }
    let need = tokens - fixed;
    // Enough characters for `need` tokens of prose (≥ 2 characters a token).
    let text: String = filler.chars().take(need * 8 + 64).collect();
    let body = tok.encode(&text)?;
    if body.len() < need {
        return Err(Error::InvalidArgument(format!(
            "the filler holds {} tokens, {need} needed",
            body.len()
        )));
    }
    let at = ((need as f64) * depth).round() as usize;
    let mut ids = head;
    ids.extend_from_slice(&body[..at]);
    ids.extend_from_slice(&needle);
    ids.extend_from_slice(&body[at..need]);
    ids.extend_from_slice(&question);
    Ok(ids)
}

/// Whether a continuation repeats the key (its five digits appear in it, not inside a
/// longer number).
pub fn passkey_found(continuation: &str, key: u32) -> bool {
    let k = format!("{key:05}");
    continuation
        .split(|c: char| !c.is_ascii_digit())
        .any(|w| w == k)
}

/// One run of the passkey test.
#[derive(Clone, Debug, Serialize)]
pub struct PasskeyRun {
    /// The method of the prompt's attention.
    pub method: String,
    /// Where the key sat (0 = start, 1 = end of the filler).
    pub depth: f64,
    /// The key.
    pub key: u32,
    /// The greedy continuation.
    pub answer: String,
    /// Whether it held the key.
    pub found: bool,
    /// Seconds of the run (prefill and generation).
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_finds_the_digits_only_when_there() {
        assert!(passkey_found(" 04217. Remember it.", 4217));
        assert!(passkey_found("is 4 2 1 7? no: 04217", 4217));
        assert!(!passkey_found(" 042170", 4217));
        assert!(!passkey_found(" 12345", 54321));
        assert!(!passkey_found(" the pass key", 11111));
        assert_eq!(
            needle(7),
            " The pass key is 00007. Remember it. 00007 is the pass key. "
        );
    }

    #[test]
    fn the_prompt_has_its_length_and_the_needle_at_its_depth() {
        let cfg = crate::model::synth::preset("tiny-llama").unwrap();
        let mut bytes = Vec::new();
        crate::model::synth::write_synth(&cfg, crate::quant::GgmlType::Q8_0, 1, &mut bytes)
            .unwrap();
        let g = crate::model::gguf::Gguf::from_bytes(bytes).unwrap();
        let tok = ModelTokenizer::from_gguf(&g).unwrap();
        let filler = "It is a truth universally acknowledged, that a single man in \
                      possession of a good fortune, must be in want of a wife. "
            .repeat(200);
        let n = tok.encode(&needle(31337)).unwrap();
        let head = tok.encode_prompt(INTRO).unwrap().len();
        let filler_tokens = 600 - head - n.len() - tok.encode(QUESTION).unwrap().len();
        for depth in [0.0, 0.3, 1.0] {
            let ids = passkey_prompt(&tok, &filler, 600, depth, 31337).unwrap();
            assert_eq!(ids.len(), 600, "depth {depth}");
            let at = ids.windows(n.len()).position(|w| w == n.as_slice());
            let want = head + (filler_tokens as f64 * depth).round() as usize;
            assert_eq!(at, Some(want), "depth {depth}");
        }
        assert!(passkey_prompt(&tok, &filler, 20, 0.5, 1).is_err());
        assert!(passkey_prompt(&tok, &filler, 600, 1.5, 1).is_err());
        assert!(passkey_prompt(&tok, "short", 600, 0.5, 1).is_err());
    }
}
