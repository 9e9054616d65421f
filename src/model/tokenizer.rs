//! The tokenizer a GGUF describes, built with the `tokenizers` crate from the file's
//! metadata (`tokenizer.ggml.*`), the way Hugging Face `transformers` builds it:
//!
//! - `tokenizer.ggml.model = gpt2` (SmolLM2, Qwen2.5): byte-level BPE with the file's
//!   merges. The split before BPE follows `tokenizer.ggml.pre`: `qwen2` uses Qwen2's
//!   regex, `smollm` splits every digit first (`\p{N}`, as the model's own tokenizer and
//!   llama.cpp do), anything else GPT-2's byte-level regex.
//! - `tokenizer.ggml.model = llama` (Gemma-3's SentencePiece vocabulary): BPE with byte
//!   fallback, spaces written `▁`, and the merges implied by the vocabulary: every token
//!   cut into two vocabulary tokens, ordered by the token's position in the file (for
//!   Gemma the file order is the merge order; its scores are not). Run by
//!   [`crate::model::spm::Spm`], which looks the merges up instead of storing them.
//!
//! Control tokens (`<|im_start|>`, `<bos>`, ...) are added as special tokens so they are
//! never split.

use std::collections::{HashMap, HashSet};

use serde_json::{Value as Json, json};

use crate::error::{Error, Result};
use crate::model::gguf::{Gguf, Value};
use crate::model::spm::Spm;

/// A model's tokenizer plus its special ids.
pub struct ModelTokenizer {
    inner: Inner,
    /// Beginning-of-sequence id, if the file names one.
    pub bos: Option<u32>,
    /// End-of-sequence id, if the file names one.
    pub eos: Option<u32>,
    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token`; SentencePiece
    /// vocabularies default to yes).
    pub add_bos: bool,
    /// Extra ids that end a generation (e.g. `<end_of_turn>`, `<|im_end|>`).
    pub stop_ids: Vec<u32>,
    /// The chat template, if the file has one.
    pub chat_template: Option<String>,
    kind: String,
}

/// The tokenizer proper.
enum Inner {
    /// Byte-level BPE (`tokenizers`).
    Hf(Box<tokenizers::Tokenizer>),
    /// SentencePiece vocabularies.
    Spm(Box<Spm>),
}

impl Inner {
    fn token_to_id(&self, t: &str) -> Option<u32> {
        match self {
            Inner::Hf(h) => h.token_to_id(t),
            Inner::Spm(s) => s.token_to_id(t),
        }
    }
}

/// GPT-2's byte → printable-character table (the byte-level BPE alphabet).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>> {
    let arr = g
        .require(key)?
        .as_array()
        .ok_or_else(|| Error::Tokenizer(format!("`{key}` is not an array")))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| Error::Tokenizer(format!("`{key}` holds a non-string")))
        })
        .collect()
}

fn token_types(g: &Gguf, n: usize) -> Vec<i64> {
    g.get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| match v {
                    Value::I64(x) => *x,
                    Value::U64(x) => *x as i64,
                    _ => 1,
                })
                .collect()
        })
        .unwrap_or_else(|| vec![1; n])
}

fn added(id: usize, content: &str, special: bool) -> Json {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": special})
}

/// Merges implied by a SentencePiece vocabulary: every token cut into two vocabulary
/// tokens, best first by the token's file position, then longer left part first
/// (transformers' `generate_merges` with position scores).
pub fn merges_from_vocab(tokens: &[String]) -> Vec<(String, String)> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        last.insert(t, i);
    }
    let mut seen = HashSet::with_capacity(tokens.len());
    // (position of the merged token, left length in chars, left, right)
    let mut merges: Vec<(usize, usize, &str, &str)> = Vec::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let score_pos = last[t.as_str()];
        let mut local = Vec::new();
        for (ci, (bi, _)) in t.char_indices().enumerate().skip(1) {
            let (l, r) = t.split_at(bi);
            if let (Some(&il), Some(&ir)) = (last.get(l), last.get(r)) {
                local.push((il, ir, ci, l, r));
            }
        }
        local.sort_by_key(|x| (x.0, x.1));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, ci, l, r)| (score_pos, ci, l, r)),
        );
    }
    // Stable sort: by position ascending, then left length descending, then right
    // length descending (equal merged tokens: left + right length is constant).
    merges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    merges
        .into_iter()
        .map(|(_, _, l, r)| (l.to_owned(), r.to_owned()))
        .collect()
}

impl ModelTokenizer {
    /// Builds the tokenizer described by a GGUF's metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let kind = g.str("tokenizer.ggml.model")?.to_owned();
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let types = token_types(g, tokens.len());
        let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let add_bos = match g.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            _ => kind == "llama",
        };
        let inner = match kind.as_str() {
            "gpt2" => {
                let spec = Self::byte_level_spec(g, &tokens, &types)?;
                let hf: tokenizers::Tokenizer = spec
                    .to_string()
                    .parse()
                    .map_err(|e| Error::Tokenizer(format!("building the {kind} tokenizer: {e}")))?;
                Inner::Hf(Box::new(hf))
            }
            "llama" => {
                let unk = g
                    .get("tokenizer.ggml.unknown_token_id")
                    .and_then(Value::as_u64)
                    .filter(|&i| (i as usize) < tokens.len())
                    .map(|i| i as u32);
                Inner::Spm(Box::new(Spm::new(&tokens, &types, unk)))
            }
            o => {
                return Err(Error::Tokenizer(format!(
                    "tokenizer.ggml.model `{o}` is not supported (gpt2, llama)"
                )));
            }
        };
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for s in ["<end_of_turn>", "<|im_end|>", "<|endoftext|>"] {
            if let Some(i) = inner.token_to_id(s)
                && !stop_ids.contains(&i)
            {
                stop_ids.push(i);
            }
        }
        let chat_template = g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned);
        log::info!(
            "tokenizer: {kind} ({}), {} tokens, bos {bos:?} (add: {add_bos}), eos {eos:?}",
            g.get("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .unwrap_or("-"),
            tokens.len()
        );
        Ok(ModelTokenizer {
            inner,
            bos,
            eos,
            add_bos,
            stop_ids,
            chat_template,
            kind,
        })
    }

    fn byte_level_spec(g: &Gguf, tokens: &[String], types: &[i64]) -> Result<Json> {
        let table = bytes_to_unicode();
        let alphabet: HashSet<char> = table.iter().copied().collect();
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added_tokens = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let in_alphabet = t.chars().all(|c| alphabet.contains(&c));
            let spelled = if in_alphabet {
                t.clone()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            };
            if types.get(i) == Some(&3) && in_alphabet {
                added_tokens.push(added(i, t, true));
            }
            vocab.insert(spelled, json!(i));
        }
        let merges = strings(g, "tokenizer.ggml.merges")?;
        let merges: Vec<Json> = merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(Error::Tokenizer(format!("merge `{m}` has no space"))),
            })
            .collect::<Result<_>>()?;
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
        let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
        let pre_tokenizer = match pre {
            "qwen2" | "deepseek-r1-qwen" => {
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
            }
            "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => {
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
            }
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            _ => byte_level(true),
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        }))
    }

    /// `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Vocabulary size (with added tokens).
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(h) => h.get_vocab_size(true),
            Inner::Spm(s) => s.vocab_size(),
        }
    }

    /// Token ids of `text` (special-token strings in the text are matched whole; no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Hf(h) => Ok(h
                .encode(text, false)
                .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?
                .get_ids()
                .to_vec()),
            Inner::Spm(s) => Ok(s.encode(text)),
        }
    }

    /// Like [`encode`](Self::encode), with BOS first when the model wants it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos
            && let Some(b) = self.bos
        {
            ids.push(b);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(h) => h
                .decode(ids, true)
                .map_err(|e| Error::Tokenizer(format!("decode: {e}"))),
            Inner::Spm(s) => Ok(s.decode(ids)),
        }
    }

    /// A one-turn chat prompt in the model's format (ChatML for SmolLM2 and Qwen, turn
    /// markers for Gemma), chosen from the chat template's markers.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        self.chat_transcript(&[(user.to_string(), None)])
    }

    /// A whole conversation in the model's chat format: each turn a user message and,
    /// for all but the last, the model's reply; the text ends where the model answers
    /// the last message. Turns that extend a transcript extend its text (a chat reuses
    /// the KV cache of the common prefix).
    pub fn chat_transcript(&self, turns: &[(String, Option<String>)]) -> Result<String> {
        let t = self.chat_template.as_deref().unwrap_or("");
        let mut p = String::new();
        if t.contains("<|im_start|>") || self.inner.token_to_id("<|im_start|>").is_some() {
            let system = if t.contains("SmolLM") {
                "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
            } else if t.contains("You are Qwen") {
                "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
            } else {
                ""
            };
            if !system.is_empty() {
                p += &format!("<|im_start|>system\n{system}<|im_end|>\n");
            }
            for (user, reply) in turns {
                p += &format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n");
                if let Some(r) = reply {
                    p += &format!("{r}<|im_end|>\n");
                }
            }
            Ok(p)
        } else if self.inner.token_to_id("<start_of_turn>").is_some() {
            for (user, reply) in turns {
                p += &format!("<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n");
                if let Some(r) = reply {
                    p += &format!("{r}<end_of_turn>\n");
                }
            }
            Ok(p)
        } else {
            Err(Error::Tokenizer(
                "this model has no chat format this crate knows (ChatML or Gemma turns)".into(),
            ))
        }
    }
}

/// The `tokenizers` BPE that `transformers` builds from a SentencePiece vocabulary, with
/// every merge stored ([`merges_from_vocab`]): the reference [`Spm`] is tested against.
#[cfg(test)]
pub(crate) fn sentencepiece_reference(
    tokens: &[String],
    types: &[i64],
    unk: Option<u32>,
) -> tokenizers::Tokenizer {
    // Runs of spaces are stored as spaces; the BPE sees them as `▁`.
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if !t.is_empty() && t.chars().all(|c| c == ' ') {
                "▁".repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect();
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in spelled.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let mut added_tokens = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(types).enumerate() {
        if *ty == 3 {
            added_tokens.push(added(i, t, true));
        } else if *ty == 4 && vocab.contains_key(t) {
            added_tokens.push(added(i, t, false));
        }
    }
    let merges: Vec<Json> = merges_from_vocab(&spelled)
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect();
    let unk = unk.and_then(|i| tokens.get(i as usize)).cloned();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    })
    .to_string()
    .parse()
    .expect("a valid tokenizer")
}

/// Text of generated tokens as it grows: [`TextStream::push`] gives the new text of
/// each token (a token may end inside a UTF-8 character: its text then comes with the
/// next one).
pub struct TextStream<'a> {
    tok: &'a ModelTokenizer,
    ids: Vec<u32>,
    shown: String,
}

impl<'a> TextStream<'a> {
    /// A stream of no tokens yet.
    pub fn new(tok: &'a ModelTokenizer) -> Self {
        TextStream {
            tok,
            ids: Vec::new(),
            shown: String::new(),
        }
    }

    /// Adds a token; returns the text it completes (empty while a character is split).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let Ok(text) = self.tok.decode(&self.ids) else {
            return String::new();
        };
        // (A longer decode may also rewrite earlier text; what was shown stays.)
        let tail = text
            .strip_prefix(self.shown.as_str())
            .map(str::to_string)
            .unwrap_or_default();
        self.shown = text;
        tail
    }

    /// The tokens so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgufBuilder;

    fn strs(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::Str((*s).into())).collect())
    }

    #[test]
    fn byte_level_bpe_from_metadata() {
        let toks = [
            "<|endoftext|>",
            "h",
            "e",
            "l",
            "o",
            "Ġ",
            "he",
            "ll",
            "hell",
            "hello",
            "Ġh",
            "1",
            "2",
        ];
        let types = Value::Array(
            (0..toks.len())
                .map(|i| Value::I64(if i == 0 { 3 } else { 1 }))
                .collect(),
        );
        let g = GgufBuilder::new()
            .meta("tokenizer.ggml.model", Value::Str("gpt2".into()))
            .meta("tokenizer.ggml.pre", Value::Str("smollm".into()))
            .meta("tokenizer.ggml.tokens", strs(&toks))
            .meta("tokenizer.ggml.token_type", types)
            .meta(
                "tokenizer.ggml.merges",
                strs(&["h e", "l l", "he ll", "hell o", "Ġ h"]),
            )
            .meta("tokenizer.ggml.eos_token_id", Value::U64(0))
            .build();
        let g = Gguf::from_bytes(g).unwrap();
        let t = ModelTokenizer::from_gguf(&g).unwrap();
        assert!(!t.add_bos);
        // BPE merges by rank ("Ġ h" ranks after "h e", so " hell" is Ġ + hell), the
        // special token kept whole, digits split apart.
        let ids = t.encode("hello hell<|endoftext|>12").unwrap();
        assert_eq!(ids, vec![9, 5, 8, 0, 11, 12]);
        assert_eq!(t.decode(&[9, 5, 8]).unwrap(), "hello hell");
        // Streamed token by token: each push gives the text it adds (the special token
        // none), and the pieces join to the whole decode.
        let mut stream = TextStream::new(&t);
        let pieces: Vec<String> = [9, 5, 8, 0].iter().map(|&id| stream.push(id)).collect();
        assert_eq!(pieces, ["hello", " ", "hell", ""]);
        assert_eq!(stream.ids(), [9, 5, 8, 0]);
    }

    /// A SentencePiece-like vocabulary from `seed`: `<unk>`, a control token `<c>`, a
    /// user-defined `<u>`, the 256 byte tokens, single characters (not `日`, `Ω`: those
    /// fall back to bytes), a run of two spaces, and random pieces of 2–5 characters
    /// (repeats included).
    fn spm_vocab(seed: u64) -> (Vec<String>, Vec<i64>) {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let alphabet = ['a', 'b', 'c', 'é', '▁'];
        let mut toks: Vec<String> = vec!["<unk>".into(), "<c>".into(), "<u>".into()];
        let mut types = vec![2, 3, 4];
        for b in 0..=255u8 {
            toks.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        for c in alphabet {
            toks.push(c.to_string());
            types.push(1);
        }
        toks.push("  ".into());
        types.push(1);
        for _ in 0..80 {
            let n = rng.random_range(2..=5);
            toks.push(
                (0..n)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect(),
            );
            types.push(1);
        }
        (toks, types)
    }

    proptest::proptest! {
        /// The merge-free tokenizer gives the ids and text of the BPE with every merge
        /// stored, on random vocabularies and texts (added tokens, byte fallback, runs
        /// of spaces), and decodes any ids the same.
        #[test]
        fn spm_matches_the_stored_merges_bpe(
            seed in proptest::prelude::any::<u64>(),
            text in "([abcé日Ω ]|<c>|<u>|<0x41>){0,48}",
            ids in proptest::collection::vec(0u32..400, 0..24),
        ) {
            let (toks, types) = spm_vocab(seed);
            let spm = Spm::new(&toks, &types, Some(0));
            let hf = sentencepiece_reference(&toks, &types, Some(0));
            let want = hf.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            let got = spm.encode(&text);
            proptest::prop_assert_eq!(&got, &want, "encode {:?}", text);
            proptest::prop_assert_eq!(spm.decode(&got), hf.decode(&want, true).unwrap());
            proptest::prop_assert_eq!(spm.decode(&ids), hf.decode(&ids, true).unwrap());
            for t in ["<c>", "<u>", "ab", "<0x41>", "▁▁"] {
                proptest::prop_assert_eq!(spm.token_to_id(t), hf.token_to_id(t), "{}", t);
            }
        }
    }

    /// Gemma-3's 262k-token vocabulary (when the model file is here: see
    /// scripts/fetch-models.sh): the same ids as the stored-merges BPE on the start of
    /// every text in data/text, and the same text back.
    #[test]
    fn gemma_vocabulary_matches_the_stored_merges_bpe() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/models/gemma-3-270m-q4_k_m.gguf"
        );
        if !std::path::Path::new(path).exists() {
            assert!(
                std::env::var("WGSPARSE_REQUIRE_MODELS").as_deref() != Ok("1"),
                "{path} missing"
            );
            eprintln!("skipped: {path} not here");
            return;
        }
        let g = Gguf::open(path).unwrap();
        let toks = strings(&g, "tokenizer.ggml.tokens").unwrap();
        let types = token_types(&g, toks.len());
        let unk = g
            .get("tokenizer.ggml.unknown_token_id")
            .and_then(Value::as_u64)
            .map(|i| i as u32);
        let spm = Spm::new(&toks, &types, unk);
        let hf = sentencepiece_reference(&toks, &types, unk);
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/data/text");
        let mut texts: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .map(|t| t.chars().take(20_000).collect())
            .collect();
        texts.push("<start_of_turn>user\nWrite 日本語 ✓ code:\t`x  =  1`<end_of_turn>\n".into());
        for t in &texts {
            let want = hf.encode(t.as_str(), false).unwrap().get_ids().to_vec();
            let got = spm.encode(t);
            assert_eq!(got, want);
            assert_eq!(spm.decode(&got), hf.decode(&want, true).unwrap());
        }
    }

    #[test]
    fn sentencepiece_merges_follow_file_order() {
        // "ab" is listed before "bc": in "abc" the merge a+b wins.
        let toks: Vec<String> = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "▁", "▁a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let m = merges_from_vocab(&toks);
        assert_eq!(
            m,
            vec![
                ("a".into(), "b".into()),
                ("b".into(), "c".into()),
                ("ab".into(), "c".into()),
                ("a".into(), "bc".into()),
                ("▁".into(), "a".into()),
            ]
        );
        let g = GgufBuilder::new()
            .meta("tokenizer.ggml.model", Value::Str("llama".into()))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Array(toks.iter().map(|s| Value::Str(s.clone())).collect()),
            )
            .meta("tokenizer.ggml.unknown_token_id", Value::U64(0))
            .meta("tokenizer.ggml.bos_token_id", Value::U64(0))
            .build();
        let t = ModelTokenizer::from_gguf(&Gguf::from_bytes(g).unwrap()).unwrap();
        assert!(t.add_bos, "SentencePiece vocabularies default to BOS");
        assert_eq!(t.encode("abc a").unwrap(), vec![6, 8]);
        assert_eq!(t.encode("cab").unwrap(), vec![3, 4]);
        assert_eq!(t.encode_prompt("a").unwrap(), vec![0, 1]);
        assert_eq!(t.decode(&[6, 8]).unwrap(), "abc a");
    }

    #[test]
    fn unknown_kind_is_typed_error() {
        let g = GgufBuilder::new()
            .meta("tokenizer.ggml.model", Value::Str("rwkv".into()))
            .meta("tokenizer.ggml.tokens", strs(&["a"]))
            .build();
        let e = ModelTokenizer::from_gguf(&Gguf::from_bytes(g).unwrap());
        assert!(matches!(e, Err(Error::Tokenizer(_))));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// A byte-level BPE tokenizer whose vocabulary holds all 256 byte symbols, a few
        /// merges and a special token: every input string is encodable.
        fn byte_level() -> ModelTokenizer {
            let mut toks: Vec<String> = vec!["<|endoftext|>".into()];
            toks.extend(bytes_to_unicode().iter().map(|c| c.to_string()));
            for t in ["he", "ll", "hell", "hello", "Ġh", "Ġt", "th", "the"] {
                toks.push(t.into());
            }
            let n = toks.len();
            let types = Value::Array(
                (0..n)
                    .map(|i| Value::I64(if i == 0 { 3 } else { 1 }))
                    .collect(),
            );
            let g = GgufBuilder::new()
                .meta("tokenizer.ggml.model", Value::Str("gpt2".into()))
                .meta("tokenizer.ggml.pre", Value::Str("smollm".into()))
                .meta(
                    "tokenizer.ggml.tokens",
                    Value::Array(toks.iter().map(|s| Value::Str(s.clone())).collect()),
                )
                .meta("tokenizer.ggml.token_type", types)
                .meta(
                    "tokenizer.ggml.merges",
                    strs(&["h e", "l l", "he ll", "hell o", "Ġ h", "Ġ t", "t h", "th e"]),
                )
                .meta("tokenizer.ggml.eos_token_id", Value::U64(0))
                .build();
            ModelTokenizer::from_gguf(&Gguf::from_bytes(g).unwrap()).unwrap()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            /// Any text (any Unicode, control characters, the special token's text in
            /// pieces) encodes without a panic to ids inside the vocabulary, and decodes
            /// back to itself (special tokens are left out of decoded text).
            #[test]
            fn any_text_round_trips(text in "(\\PC|\\s|<\\|endoftext\\|>|[\\x00-\\x1f]){0,64}") {
                let t = byte_level();
                let ids = t.encode(&text).unwrap();
                prop_assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
                prop_assert_eq!(t.decode(&ids).unwrap(), text.replace("<|endoftext|>", ""));
            }

            /// Arbitrary ids decode to text or a typed error, never a panic.
            #[test]
            fn any_ids_decode_or_fail_typed(ids in proptest::collection::vec(any::<u32>(), 0..32)) {
                let t = byte_level();
                if let Err(e) = t.decode(&ids) {
                    prop_assert!(matches!(e, Error::Tokenizer(_)), "{e}");
                }
            }
        }
    }
}
