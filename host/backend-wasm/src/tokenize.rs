//! `wisp:plugin/tokenize`: Hugging Face `tokenizers` run by the host, natively, on a
//! `tokenizer.json` from the plugin's version folder.
//!
//! Bounds, since the work happens outside the sandbox's memory and deadline: the file's
//! size, the tokenizers one model may load, the handles one instance may hold, and the
//! text one `encode` call may pass. Encodings are converted one text at a time, so the
//! host holds tokenizers' rich `Encoding` for one text at most.

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};
use wasmtime::component::{Resource, ResourceTable};

use crate::bindings::wisp::plugin::tokenize::{Encoding, Padded};

/// Largest `tokenizer.json` a plugin may load (multilingual vocabularies are ~20 MB).
pub const MAX_TOKENIZER_FILE_BYTES: u64 = 64 << 20;
/// Distinct (file, max-length) tokenizers one model version may load.
pub const MAX_TOKENIZERS_PER_MODEL: usize = 8;
/// Open tokenizer handles one instance may hold at once.
pub const MAX_HANDLES_PER_INSTANCE: usize = 64;
/// Bytes of text one `encode` call may pass (texts and pairs together, each text charged
/// `TEXT_CHARGE_BYTES` more): tokenizers holds ~100 bytes a token while it encodes a text,
/// and each encoding costs its records, so this bounds the host memory one call can take
/// (tens of MiB) as well as its time, which no deadline interrupts.
pub const MAX_ENCODE_BYTES: usize = 1 << 20;
/// What each text costs in that budget besides its bytes, so a million empty texts cannot
/// make a million encodings.
pub const TEXT_CHARGE_BYTES: usize = 64;
/// Ids one `decode` call may pass.
pub const MAX_DECODE_IDS: usize = 1 << 18;
/// Padded tokens (rows × width) one `encode-padded` call may make: 48 MiB of tensors.
pub const MAX_PADDED_TOKENS: usize = 1 << 21;

/// What a plugin holds: one loaded tokenizer, shared by every instance of the model.
pub struct TokenizerHandle(pub(crate) Arc<Tokenizer>);

/// The tokenizers one model version has loaded, by canonical file and max-length.
#[derive(Default)]
pub struct TokenizerCache {
    entries: Mutex<Vec<(PathBuf, u32, Arc<Tokenizer>)>>,
}

impl TokenizerCache {
    /// `path` (relative to `version_dir`) with truncation at `max_length` (0: as the
    /// file says), parsed once per model. Errors are for the plugin: they name its
    /// relative path, not the server's folders.
    pub fn open(
        &self,
        version_dir: &Path,
        path: &str,
        max_length: u32,
    ) -> Result<Arc<Tokenizer>, String> {
        let outside = || format!("tokenizer path '{path}' is not a file inside the version folder");
        let file = wisp_core::paths::confined(version_dir, path, "path").map_err(|_| outside())?;
        let file = file.canonicalize().map_err(|_| outside())?;
        if let Some((_, _, tokenizer)) = self
            .entries
            .lock()
            .iter()
            .find(|(f, m, _)| *f == file && *m == max_length)
        {
            return Ok(tokenizer.clone());
        }
        let size = std::fs::metadata(&file).map_err(|_| outside())?.len();
        if size > MAX_TOKENIZER_FILE_BYTES {
            return Err(format!(
                "tokenizer '{path}' has {} MiB, more than the {} MiB the host loads",
                size >> 20,
                MAX_TOKENIZER_FILE_BYTES >> 20
            ));
        }
        let bytes = std::fs::read(&file).map_err(|e| format!("cannot read '{path}': {e}"))?;
        let mut tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| format!("'{path}' is not a tokenizer.json: {e}"))?;
        // Plugins pad as their model needs; a tokenizer.json's padding would pad one text.
        tokenizer.with_padding(None);
        // tokenizers subtracts the special tokens from max_length unchecked (a panic, or a
        // wrapped length in release builds), so a length must leave room beside them.
        let special = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(true));
        let limit = match max_length {
            0 => tokenizer.get_truncation().map(|t| t.max_length),
            n => Some(n as usize),
        };
        if let Some(limit) = limit.filter(|&l| l <= special) {
            return Err(format!(
                "max-length {limit} leaves no room beside the {special} special tokens '{path}' \
                 adds to a pair"
            ));
        }
        if max_length > 0 {
            tokenizer
                .with_truncation(Some(TruncationParams {
                    max_length: max_length as usize,
                    strategy: TruncationStrategy::LongestFirst,
                    stride: 0,
                    direction: TruncationDirection::Right,
                }))
                .map_err(|e| format!("cannot truncate '{path}' at {max_length} tokens: {e}"))?;
        }
        let tokenizer = Arc::new(tokenizer);
        let mut entries = self.entries.lock();
        // Another instance may have loaded it meanwhile.
        if let Some((_, _, loaded)) = entries
            .iter()
            .find(|(f, m, _)| *f == file && *m == max_length)
        {
            return Ok(loaded.clone());
        }
        if entries.len() >= MAX_TOKENIZERS_PER_MODEL {
            return Err(format!(
                "a model may load at most {MAX_TOKENIZERS_PER_MODEL} tokenizers \
                 (files and max-lengths together)"
            ));
        }
        entries.push((file, max_length, tokenizer.clone()));
        Ok(tokenizer)
    }
}

/// A new handle in `table` for `tokenizer`, within the instance's handle limit.
pub fn new_handle(
    table: &mut ResourceTable,
    handles: &mut usize,
    tokenizer: Arc<Tokenizer>,
) -> Result<Resource<TokenizerHandle>, String> {
    if *handles >= MAX_HANDLES_PER_INSTANCE {
        return Err(format!(
            "an instance may hold at most {MAX_HANDLES_PER_INSTANCE} open tokenizers"
        ));
    }
    let handle = table
        .push(TokenizerHandle(tokenizer))
        .map_err(|e| format!("cannot open the tokenizer: {e}"))?;
    *handles += 1;
    Ok(handle)
}

/// Encodes `texts` (with `pairs` as second segments when not empty).
pub fn encode(
    tokenizer: &Tokenizer,
    texts: &[String],
    pairs: &[String],
    add_special_tokens: bool,
    spans: bool,
) -> Result<Vec<Encoding>, String> {
    check_inputs(texts, pairs)?;
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let input = input(text, pairs.get(i));
            let encoded = if spans {
                tokenizer.encode_char_offsets(input, add_special_tokens)
            } else {
                tokenizer.encode_fast(input, add_special_tokens)
            }
            .map_err(|e| format!("cannot tokenize text {i}: {e}"))?;
            Ok(convert(&encoded, spans))
        })
        .collect()
}

/// Encodes `texts` (and `pairs`) into padded INT64 tensors.
pub fn encode_padded(
    tokenizer: &Tokenizer,
    texts: &[String],
    pairs: &[String],
    add_special_tokens: bool,
    pad_id: i64,
) -> Result<Padded, String> {
    check_inputs(texts, pairs)?;
    // Only ids and type ids are kept per text: 8 bytes a token until the layout.
    let mut rows = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let encoded = tokenizer
            .encode_fast(input(text, pairs.get(i)), add_special_tokens)
            .map_err(|e| format!("cannot tokenize text {i}: {e}"))?;
        rows.push((encoded.get_ids().to_vec(), encoded.get_type_ids().to_vec()));
    }
    let width = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let tokens = width.saturating_mul(rows.len());
    if tokens > MAX_PADDED_TOKENS {
        return Err(format!(
            "{} texts padded to {width} tokens make {tokens} tokens, more than the {} one \
             encode-padded call may make; split them over several calls",
            rows.len(),
            MAX_PADDED_TOKENS
        ));
    }
    let mut padded = Padded {
        rows: rows.len() as u32,
        width: width as u32,
        input_ids: Vec::with_capacity(tokens * 8),
        attention_mask: Vec::with_capacity(tokens * 8),
        token_type_ids: Vec::with_capacity(tokens * 8),
    };
    for (ids, type_ids) in &rows {
        let gap = width - ids.len();
        for (&id, &type_id) in ids.iter().zip(type_ids) {
            padded
                .input_ids
                .extend_from_slice(&i64::from(id).to_le_bytes());
            padded.attention_mask.extend_from_slice(&1i64.to_le_bytes());
            padded
                .token_type_ids
                .extend_from_slice(&i64::from(type_id).to_le_bytes());
        }
        for _ in 0..gap {
            padded.input_ids.extend_from_slice(&pad_id.to_le_bytes());
        }
        padded
            .attention_mask
            .resize(padded.attention_mask.len() + gap * 8, 0);
        padded
            .token_type_ids
            .resize(padded.token_type_ids.len() + gap * 8, 0);
    }
    Ok(padded)
}

fn input<'a>(text: &'a str, pair: Option<&'a String>) -> tokenizers::EncodeInput<'a> {
    match pair {
        Some(pair) => (text, pair.as_str()).into(),
        None => text.into(),
    }
}

/// Pairs match the texts one to one, and the text is within the bytes one call may pass.
fn check_inputs(texts: &[String], pairs: &[String]) -> Result<(), String> {
    if !pairs.is_empty() && pairs.len() != texts.len() {
        return Err(format!(
            "{} texts but {} pairs: pairs must be empty or one per text",
            texts.len(),
            pairs.len()
        ));
    }
    let bytes: usize = texts
        .iter()
        .chain(pairs)
        .map(|t| t.len() + TEXT_CHARGE_BYTES)
        .sum();
    if bytes > MAX_ENCODE_BYTES {
        return Err(format!(
            "{} texts of {} bytes are more than the {} MiB one call may pass (each text counts \
             {TEXT_CHARGE_BYTES} bytes more); split them over several calls",
            texts.len() + pairs.len(),
            bytes - (texts.len() + pairs.len()) * TEXT_CHARGE_BYTES,
            MAX_ENCODE_BYTES >> 20
        ));
    }
    Ok(())
}

/// The text of `ids`.
pub fn decode(
    tokenizer: &Tokenizer,
    ids: &[u32],
    skip_special_tokens: bool,
) -> Result<String, String> {
    if ids.len() > MAX_DECODE_IDS {
        return Err(format!(
            "{} ids are more than the {MAX_DECODE_IDS} one decode call may pass",
            ids.len()
        ));
    }
    tokenizer
        .decode(ids, skip_special_tokens)
        .map_err(|e| format!("cannot decode: {e}"))
}

fn convert(encoded: &tokenizers::Encoding, spans: bool) -> Encoding {
    let special = encoded.get_special_tokens_mask();
    let (mut offsets, mut word_ids, mut sequence_ids) = (Vec::new(), Vec::new(), Vec::new());
    if spans {
        let sequences = encoded.get_sequence_ids();
        let tokens = encoded
            .get_offsets()
            .iter()
            .zip(encoded.get_word_ids())
            .zip(&sequences)
            .zip(special);
        for (((&(start, end), &word), &sequence), &special) in tokens {
            if special == 1 {
                offsets.push((0, 0));
                word_ids.push(-1);
                sequence_ids.push(-1);
            } else {
                offsets.push((start as u32, end as u32));
                word_ids.push(word.map_or(-1, |w| w as i32));
                sequence_ids.push(sequence.map_or(-1, |s| s as i32));
            }
        }
    }
    Encoding {
        ids: encoded.get_ids().to_vec(),
        type_ids: encoded.get_type_ids().to_vec(),
        special_tokens_mask: special.iter().map(|&s| s as u8).collect(),
        offsets,
        word_ids,
        sequence_ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WordPiece tokenizer.json with a vocabulary of eight tokens.
    const TOKENIZER: &str = include_str!("../../../tests/fixtures/tiny_wordpiece_tokenizer.json");

    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), TOKENIZER).unwrap();
        dir
    }

    #[test]
    fn encodes_texts_and_pairs_with_character_spans() {
        let dir = folder();
        let cache = TokenizerCache::default();
        let tokenizer = cache.open(dir.path(), "tokenizer.json", 0).unwrap();
        let texts = ["Café worlds".to_string()];
        let out = encode(&tokenizer, &texts, &[], true, true).unwrap();
        assert_eq!(out[0].ids, [2, 6, 5, 7, 3]);
        assert_eq!(out[0].special_tokens_mask, [1, 0, 0, 0, 1]);
        // Characters, not bytes: "é" is two bytes.
        assert_eq!(out[0].offsets, [(0, 0), (0, 4), (5, 10), (10, 11), (0, 0)]);
        assert_eq!(out[0].word_ids, [-1, 0, 1, 1, -1]);

        let pairs = ["hello".to_string()];
        let out = encode(&tokenizer, &texts, &pairs, true, true).unwrap();
        assert_eq!(out[0].sequence_ids, [-1, 0, 0, 0, -1, 1, -1]);
        assert_eq!(out[0].offsets[5], (0, 5));
        let out = encode(&tokenizer, &texts, &pairs, true, false).unwrap();
        assert_eq!(out[0].ids, [2, 6, 5, 7, 3, 4, 3]);
        assert_eq!(out[0].type_ids, [0, 0, 0, 0, 0, 1, 1]);
        assert!(out[0].offsets.is_empty() && out[0].word_ids.is_empty());

        let bare = encode(&tokenizer, &texts, &[], false, false).unwrap();
        assert_eq!(bare[0].ids, [6, 5, 7]);
    }

    #[test]
    fn encode_padded_lays_out_int64_tensors() {
        let dir = folder();
        let tokenizer = TokenizerCache::default()
            .open(dir.path(), "tokenizer.json", 0)
            .unwrap();
        let texts = ["hello world".to_string(), "worlds".to_string()];
        let pairs = ["hello".to_string(), "hello hello".to_string()];
        let padded = encode_padded(&tokenizer, &texts, &pairs, true, -7).unwrap();
        let int64 = |bytes: &[u8]| -> Vec<i64> {
            bytes
                .chunks(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert_eq!((padded.rows, padded.width), (2, 7));
        assert_eq!(
            int64(&padded.input_ids),
            [2, 4, 5, 3, 4, 3, -7, 2, 5, 7, 3, 4, 4, 3]
        );
        assert_eq!(
            int64(&padded.attention_mask),
            [1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
        );
        assert_eq!(
            int64(&padded.token_type_ids),
            [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]
        );
        // The same ids as `encode`.
        let encodings = encode(&tokenizer, &texts, &pairs, true, false).unwrap();
        assert_eq!(encodings[1].ids, [2, 5, 7, 3, 4, 4, 3]);
        // One long text among many short ones cannot make the host lay out rows × width
        // without bound.
        let mut many = vec!["hello".to_string(); 600];
        many.push("hello ".repeat(4000));
        let e = encode_padded(&tokenizer, &many, &[], true, 0).unwrap_err();
        assert!(e.contains("more than the 2097152"), "{e}");
    }

    #[test]
    fn a_max_length_without_room_beside_the_special_tokens_is_refused() {
        let dir = folder();
        let cache = TokenizerCache::default();
        // A pair gets three special tokens here: [CLS] a [SEP] b [SEP].
        for max_length in [1, 2, 3] {
            let e = cache
                .open(dir.path(), "tokenizer.json", max_length)
                .unwrap_err();
            assert!(
                e.contains(&format!("max-length {max_length} leaves no room")),
                "{e}"
            );
        }
        // The file's own truncation is checked the same way.
        let json = TOKENIZER.replace(
            r#""truncation": null"#,
            r#""truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}"#,
        );
        std::fs::write(dir.path().join("short.json"), json).unwrap();
        let e = cache.open(dir.path(), "short.json", 0).unwrap_err();
        assert!(e.contains("max-length 2 leaves no room"), "{e}");
        let tokenizer = cache.open(dir.path(), "tokenizer.json", 4).unwrap();
        let out = encode(
            &tokenizer,
            &["hello world".into()],
            &["hello".into()],
            true,
            false,
        );
        // Four tokens in all: the longer text gives way first.
        assert_eq!(out.unwrap()[0].ids, [2, 4, 3, 3]);
    }

    #[test]
    fn truncates_at_max_length_with_special_tokens() {
        let dir = folder();
        let cache = TokenizerCache::default();
        let tokenizer = cache.open(dir.path(), "tokenizer.json", 4).unwrap();
        let out = encode(&tokenizer, &["hello world hello".into()], &[], true, false).unwrap();
        assert_eq!(out[0].ids, [2, 4, 5, 3]);
        // A different max-length is a different tokenizer; the same one is cached.
        let again = cache.open(dir.path(), "./tokenizer.json", 4).unwrap();
        assert!(Arc::ptr_eq(&tokenizer, &again));
        let full = cache.open(dir.path(), "tokenizer.json", 0).unwrap();
        assert!(!Arc::ptr_eq(&tokenizer, &full));
    }

    #[test]
    fn refuses_paths_outside_the_folder_without_naming_server_paths() {
        let dir = folder();
        let cache = TokenizerCache::default();
        for bad in ["../tokenizer.json", "/etc/passwd", "missing.json"] {
            let e = cache.open(dir.path(), bad, 0).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
            assert!(!e.contains(&*dir.path().to_string_lossy()), "{e}");
        }
        std::fs::write(dir.path().join("bad.json"), "{}").unwrap();
        let e = cache.open(dir.path(), "bad.json", 0).unwrap_err();
        assert!(e.contains("not a tokenizer.json"), "{e}");
    }

    #[test]
    fn bounds_tokenizers_per_model_and_bytes_per_call() {
        let dir = folder();
        let cache = TokenizerCache::default();
        for max_length in 1..=MAX_TOKENIZERS_PER_MODEL as u32 {
            cache
                .open(dir.path(), "tokenizer.json", max_length + 3)
                .unwrap();
        }
        let e = cache.open(dir.path(), "tokenizer.json", 0).unwrap_err();
        assert!(e.contains("at most 8 tokenizers"), "{e}");

        let tokenizer = cache.open(dir.path(), "tokenizer.json", 4).unwrap();
        let big = vec!["hello ".repeat(MAX_ENCODE_BYTES / 6 + 1)];
        let e = encode(&tokenizer, &big, &[], true, false).unwrap_err();
        assert!(
            e.contains("1 texts of 1048578 bytes are more than the 1 MiB"),
            "{e}"
        );
        // Empty texts are not free.
        let empty = vec![String::new(); MAX_ENCODE_BYTES / TEXT_CHARGE_BYTES + 1];
        let e = encode_padded(&tokenizer, &empty, &[], true, 0).unwrap_err();
        assert!(e.contains("16385 texts of 0 bytes"), "{e}");
        let e = decode(&tokenizer, &vec![4; MAX_DECODE_IDS + 1], true).unwrap_err();
        assert!(e.contains("262145 ids"), "{e}");
        assert_eq!(
            decode(&tokenizer, &[2, 4, 5, 3], true).unwrap(),
            "hello world"
        );
        let e = encode(
            &tokenizer,
            &["a".into(), "b".into()],
            &["c".into()],
            true,
            false,
        )
        .unwrap_err();
        assert!(e.contains("2 texts but 1 pairs"), "{e}");

        let mut table = ResourceTable::new();
        let mut handles = 0;
        for _ in 0..MAX_HANDLES_PER_INSTANCE {
            new_handle(&mut table, &mut handles, tokenizer.clone()).unwrap();
        }
        let e = new_handle(&mut table, &mut handles, tokenizer).unwrap_err();
        assert!(e.contains("at most 64 open tokenizers"), "{e}");
    }
}
