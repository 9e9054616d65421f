//! A SentencePiece vocabulary (`tokenizer.ggml.model = llama`, Gemma-3's) tokenized as
//! BPE without a merge table: two adjacent pieces merge when their concatenation is a
//! vocabulary token, lowest rank first (the merged token's position in the file, then
//! the longer left piece; leftmost on ties), with byte fallback for characters outside
//! the vocabulary and spaces written `▁`.
//!
//! This is the tokenizer `transformers` builds from such a vocabulary (BPE over the
//! merges of every token cut into two vocabulary tokens) computed on the fly: the same
//! ids, but the merges — millions for a 262k-token vocabulary, several hundred MiB as a
//! `tokenizers` model — are never stored: a candidate pair is looked up by its
//! concatenated string.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use aho_corasick::{AhoCorasick, MatchKind};

/// The tokenizer; see the module documentation.
pub struct Spm {
    /// Spelled token (spaces as `▁`) → id (the last of equal spellings).
    ids: HashMap<Box<str>, u32>,
    /// Id → spelled token.
    spelled: Vec<Box<str>>,
    /// Added tokens, matched whole in the raw text before anything else: (text, id,
    /// special). Special ones are left out of decoded text.
    added: Vec<(Box<str>, u32, bool)>,
    /// Finds the added tokens in a text (leftmost, then longest).
    finder: AhoCorasick,
    /// Ids of `<0x00>` … `<0xFF>`.
    bytes: [Option<u32>; 256],
    unk: Option<u32>,
}

/// A merge candidate: rank (merged token's position, longer left piece first), then
/// position in the word (leftmost first), and the merged id.
type Candidate = Reverse<((u32, Reverse<u32>), usize, u32)>;

impl Spm {
    /// From the vocabulary in file order (`tokens`, with their GGUF token types: 3
    /// control, 4 user-defined) and the unknown token's id.
    pub fn new(tokens: &[String], types: &[i64], unk: Option<u32>) -> Self {
        let spelled: Vec<Box<str>> = tokens
            .iter()
            .map(|t| {
                if !t.is_empty() && t.chars().all(|c| c == ' ') {
                    "▁".repeat(t.chars().count()).into()
                } else {
                    t.as_str().into()
                }
            })
            .collect();
        let mut ids = HashMap::with_capacity(spelled.len());
        for (i, t) in spelled.iter().enumerate() {
            ids.insert(t.clone(), i as u32);
        }
        let mut added: Vec<(Box<str>, u32, bool)> = Vec::new();
        for (i, (t, &ty)) in tokens.iter().zip(types).enumerate() {
            if ty == 3 {
                added.push((t.as_str().into(), i as u32, true));
            } else if ty == 4 && ids.contains_key(t.as_str()) {
                added.push((t.as_str().into(), i as u32, false));
            }
        }
        let bytes = std::array::from_fn(|b| ids.get(format!("<0x{b:02X}>").as_str()).copied());
        let finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(added.iter().map(|a| &*a.0))
            .expect("added tokens form a searcher");
        Spm {
            ids,
            spelled,
            added,
            finder,
            bytes,
            unk,
        }
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.spelled.len()
    }

    /// The id of a token's text.
    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.added
            .iter()
            .find(|a| &*a.0 == t)
            .map(|a| a.1)
            .or_else(|| self.ids.get(t).copied())
    }

    /// Token ids of `text`: added tokens matched whole (leftmost, then longest), the
    /// text between them with spaces as `▁`, merged.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut at = 0;
        for m in self.finder.find_iter(text) {
            if m.start() > at {
                self.encode_piece(&text[at..m.start()].replace(' ', "▁"), &mut out);
            }
            out.push(self.added[m.pattern().as_usize()].1);
            at = m.end();
        }
        if at < text.len() {
            self.encode_piece(&text[at..].replace(' ', "▁"), &mut out);
        }
        out
    }

    /// The merges of one normalized piece.
    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        // Symbols: byte range in `piece` and id; (prev, next) links; a merged-away
        // symbol has an empty range.
        let mut sym: Vec<(usize, usize, u32)> = Vec::new();
        let mut unknown = false;
        for (at, c) in piece.char_indices() {
            let end = at + c.len_utf8();
            if let Some(&id) = self.ids.get(&piece[at..end]) {
                sym.push((at, end, id));
                unknown = false;
            } else if let Some(ids) = piece.as_bytes()[at..end]
                .iter()
                .map(|&b| self.bytes[b as usize])
                .collect::<Option<Vec<u32>>>()
            {
                // Byte pieces: their range is the character's, but they never merge
                // (no vocabulary token starts with a byte token's text).
                sym.extend(ids.into_iter().map(|id| (at, end, id)));
                unknown = false;
            } else if let Some(u) = self.unk {
                // Unknown characters next to each other make one unknown token.
                if unknown {
                    sym.last_mut().expect("an unknown symbol").1 = end;
                } else {
                    sym.push((at, end, u));
                }
                unknown = true;
            }
        }
        let n = sym.len();
        let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        let mut next: Vec<Option<usize>> = (0..n).map(|i| (i + 1 < n).then_some(i + 1)).collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Candidate> = BinaryHeap::new();
        let is_byte = |i: usize, sym: &[(usize, usize, u32)]| {
            let (a, b, id) = sym[i];
            // A byte piece: its id is not the id of its character's text.
            self.ids.get(&piece[a..b]) != Some(&id)
        };
        let candidate = |l: usize, r: usize, sym: &[(usize, usize, u32)]| -> Option<Candidate> {
            if is_byte(l, sym) || is_byte(r, sym) {
                return None;
            }
            let (a, m, _) = sym[l];
            let (_, b, _) = sym[r];
            let id = *self.ids.get(&piece[a..b])?;
            let left_chars = piece[a..m].chars().count() as u32;
            Some(Reverse(((id, Reverse(left_chars)), l, id)))
        };
        for i in 0..n.saturating_sub(1) {
            if let Some(c) = candidate(i, i + 1, &sym) {
                heap.push(c);
            }
        }
        while let Some(Reverse(((rank, left), l, id))) = heap.pop() {
            let Some(r) = next[l].filter(|_| alive[l]) else {
                continue;
            };
            // Still the same pair (neither side merged since)?
            match candidate(l, r, &sym) {
                Some(Reverse(((rk, lf), _, _))) if rk == rank && lf == left => {}
                _ => continue,
            }
            sym[l] = (sym[l].0, sym[r].1, id);
            alive[r] = false;
            next[l] = next[r];
            if let Some(nr) = next[r] {
                prev[nr] = Some(l);
            }
            if let Some(p) = prev[l]
                && let Some(c) = candidate(p, l, &sym)
            {
                heap.push(c);
            }
            if let Some(nr) = next[l]
                && let Some(c) = candidate(l, nr, &sym)
            {
                heap.push(c);
            }
        }
        out.extend((0..n).filter(|&i| alive[i]).map(|i| sym[i].2));
    }

    /// Text of ids: special added tokens left out, `▁` as spaces, runs of byte tokens
    /// as UTF-8 (one U+FFFD per byte of a run that is not valid UTF-8), unknown ids
    /// dropped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut run: Vec<u8> = Vec::new();
        let flush = |run: &mut Vec<u8>, out: &mut String| {
            if !run.is_empty() {
                match std::str::from_utf8(run) {
                    Ok(s) => out.push_str(s),
                    Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', run.len())),
                }
                run.clear();
            }
        };
        for &id in ids {
            if let Some(a) = self.added.iter().find(|a| a.1 == id) {
                if !a.2 {
                    flush(&mut run, &mut out);
                    out.push_str(&a.0.replace('▁', " "));
                }
                continue;
            }
            let Some(t) = self.spelled.get(id as usize) else {
                continue;
            };
            // Only the id a spelling maps to decodes (the last of equal spellings).
            if self.ids.get(t) != Some(&id) {
                continue;
            }
            if t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && let Ok(b) = u8::from_str_radix(&t[3..5], 16)
            {
                run.push(b);
                continue;
            }
            flush(&mut run, &mut out);
            out.push_str(&t.replace('▁', " "));
        }
        flush(&mut run, &mut out);
        out
    }
}
