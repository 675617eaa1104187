//! Tokenization proper, free of the plugin bindings so it can be tested natively.

use tokenizers::{
    Encoding, PostProcessor, PostProcessorWrapper, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// What the model does with its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One text per element.
    Single,
    /// (question, context) pairs, contexts split into overlapping windows.
    Qa,
    /// (text, text) pairs, one encoding each, cut at `max_length` (longest first): a
    /// cross-encoder's (query, document).
    Pair,
}

/// What single mode does with a text longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongInput {
    /// Cut it at `max_length`.
    Truncate,
    /// Split it into windows of `max_length` overlapping by `doc_stride`, each with its
    /// special tokens, for an encoder to embed and average (`window_owner` says whose).
    Mean,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// Single mode only.
    pub long_input: LongInput,
    /// Longest encoding, special tokens included.
    pub max_length: usize,
    /// Tokens shared by consecutive windows of a context or long text (HF `stride`).
    pub doc_stride: usize,
    /// Most windows one request may produce.
    pub max_windows: usize,
    /// Padding id; `None` takes the tokenizer's own.
    pub pad_id: Option<i64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Single,
            long_input: LongInput::Truncate,
            max_length: 512,
            doc_stride: 128,
            max_windows: 64,
            pad_id: None,
        }
    }
}

/// Why an encoding failed: the request's fault, or the tokenizer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    Input(String),
    Internal(String),
}

/// Rows of token ids, right-padded to the longest row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub width: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    /// Per row: whether its text lost tokens past `max_length`.
    pub truncated: Vec<bool>,
}

/// A single-mode batch with where each token came from, for token classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpannedBatch {
    pub batch: Batch,
    /// `[rows, width, 2]` character offsets into the row's text; -1 for special tokens
    /// and padding.
    pub offsets: Vec<i64>,
    /// `[rows, width]` the word (of the tokenizer's pre-tokenizer) each token belongs to,
    /// counted from 0 in its text; -1 for special tokens and padding.
    pub word_ids: Vec<i64>,
}

/// A single-mode batch of windows: one row per window of each text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowBatch {
    pub batch: Batch,
    /// The text of each row.
    pub window_owner: Vec<i64>,
}

/// A QA batch: one row per context window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QaBatch {
    pub batch: Batch,
    /// `[rows, width, 2]` character offsets into the window's context; -1 outside it.
    pub offsets: Vec<i64>,
    /// The pair each row came from.
    pub window_owner: Vec<i64>,
}

pub struct Encoder {
    /// In QA mode without its post-processor: pairs are assembled by hand.
    tokenizer: Tokenizer,
    options: Options,
    pad_id: i64,
    /// QA mode: the post-processor that adds a pair's special tokens.
    pair_processor: Option<PostProcessorWrapper>,
    /// Special tokens the post-processor adds to a pair.
    added_pair: usize,
}

impl Encoder {
    /// Takes over `tokenizer`, replacing whatever truncation and padding its
    /// tokenizer.json ships with our own (padding to the longest row of a request).
    pub fn new(mut tokenizer: Tokenizer, options: Options) -> Result<Self, String> {
        let pad_id = options
            .pad_id
            .or_else(|| tokenizer.get_padding().map(|p| i64::from(p.pad_id)))
            .or_else(|| {
                ["[PAD]", "<pad>"]
                    .iter()
                    .find_map(|t| tokenizer.token_to_id(t))
                    .map(i64::from)
            })
            .unwrap_or(0);
        let added = |pair| {
            tokenizer
                .get_post_processor()
                .map_or(0, |p| p.added_tokens(pair))
        };
        let (added_single, added_pair) = (added(false), added(true));
        let needed = match options.mode {
            Mode::Single => added_single,
            Mode::Qa | Mode::Pair => added_pair,
        };
        if options.max_length <= needed {
            return Err(format!(
                "max_length {} leaves no room for text beside the {needed} special tokens",
                options.max_length
            ));
        }
        tokenizer.with_padding(None);
        let windows = options.mode == Mode::Single && options.long_input == LongInput::Mean;
        // tokenizers panics on a stride that leaves a window no new tokens.
        if windows && options.doc_stride >= options.max_length - needed {
            return Err(format!(
                "doc_stride {} must be below max_length {} less the {needed} special tokens",
                options.doc_stride, options.max_length
            ));
        }
        let mut pair_processor = None;
        let truncation = match options.mode {
            // Cut at max_length; whatever overflows is dropped (a pair loses tokens from
            // its longer text first, as sentence-transformers' CrossEncoder does), or, for
            // long inputs by windows, kept as the next windows.
            Mode::Single | Mode::Pair => Some(TruncationParams {
                max_length: options.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: if windows { options.doc_stride } else { 0 },
                direction: TruncationDirection::Right,
            }),
            // `encode_pair` windows the context itself, so the tokenizer only
            // tokenizes: no truncation, no special tokens.
            Mode::Qa => {
                pair_processor = tokenizer.get_post_processor().cloned();
                tokenizer.with_post_processor(None::<PostProcessorWrapper>);
                None
            }
        };
        tokenizer
            .with_truncation(truncation)
            .map_err(|e| e.to_string())?;
        Ok(Encoder {
            tokenizer,
            options,
            pad_id,
            pair_processor,
            added_pair,
        })
    }

    pub fn mode(&self) -> Mode {
        self.options.mode
    }

    pub fn long_input(&self) -> LongInput {
        self.options.long_input
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Encodes each text with special tokens, truncated at `max_length`.
    pub fn encode_single(&self, texts: &[&str]) -> Result<Batch, EncodeError> {
        let encodings = texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                // encode_fast skips the offsets that single mode does not return.
                self.tokenizer
                    .encode_fast(*text, true)
                    .map_err(|e| EncodeError::Internal(format!("cannot tokenize TEXT[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch::pack(&encodings, self.pad_id))
    }

    /// Encodes each text as windows of at most `max_length` tokens overlapping by
    /// `doc_stride` (one for a short text), each with its special tokens; at most
    /// `max_windows` in all.
    pub fn encode_windows(&self, texts: &[&str]) -> Result<WindowBatch, EncodeError> {
        let mut windows = Vec::new();
        let mut window_owner = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let mut encoding = self
                .tokenizer
                .encode_fast(*text, true)
                .map_err(|e| EncodeError::Internal(format!("cannot tokenize TEXT[{i}]: {e}")))?;
            let overflowing = encoding.take_overflowing();
            if windows.len() + 1 + overflowing.len() > self.options.max_windows {
                return Err(EncodeError::Input(format!(
                    "the texts need more than max_windows = {} windows of {} tokens \
                     (TEXT[{i}] alone needs {})",
                    self.options.max_windows,
                    self.options.max_length,
                    1 + overflowing.len()
                )));
            }
            windows.push(encoding);
            windows.extend(overflowing);
            window_owner.resize(windows.len(), i as i64);
        }
        Ok(WindowBatch {
            batch: Batch::pack(&windows, self.pad_id),
            window_owner,
        })
    }

    /// As `encode_single`, with each token's character offsets and word.
    pub fn encode_single_spans(&self, texts: &[&str]) -> Result<SpannedBatch, EncodeError> {
        let encodings = texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                self.tokenizer
                    .encode(*text, true)
                    .map_err(|e| EncodeError::Internal(format!("cannot tokenize TEXT[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch = Batch::pack(&encodings, self.pad_id);
        let mut offsets = vec![-1i64; batch.rows * batch.width * 2];
        let mut word_ids = vec![-1i64; batch.rows * batch.width];
        for (row, (encoding, text)) in encodings.iter().zip(texts).enumerate() {
            let chars = CharIndex::new(text);
            let tokens = encoding
                .get_offsets()
                .iter()
                .zip(encoding.get_word_ids())
                .zip(encoding.get_special_tokens_mask());
            let out_offsets = &mut offsets[row * batch.width * 2..];
            let out_words = &mut word_ids[row * batch.width..];
            for (k, ((&(start, end), &word), &special)) in tokens.enumerate() {
                if special == 0 {
                    out_offsets[2 * k] = chars.of(start);
                    out_offsets[2 * k + 1] = chars.of(end);
                    out_words[k] = word.map_or(-1, i64::from);
                }
            }
        }
        Ok(SpannedBatch {
            batch,
            offsets,
            word_ids,
        })
    }

    /// Encodes (first, second) pairs with special tokens, one encoding each, truncated
    /// at `max_length` longest first; with `max_second`, each second text is first cut
    /// after its first `max_second` tokens (a reranker's `max_tokens_per_doc`).
    pub fn encode_pairs(
        &self,
        first: &[&str],
        second: &[&str],
        max_second: Option<usize>,
    ) -> Result<Batch, EncodeError> {
        debug_assert_eq!(first.len(), second.len());
        let internal = |i: usize, e: tokenizers::Error| {
            EncodeError::Internal(format!("cannot tokenize pair {i}: {e}"))
        };
        let encodings = first
            .iter()
            .zip(second)
            .enumerate()
            .map(|(i, (a, b))| {
                let b = match max_second {
                    Some(n) => {
                        // Byte offsets into `b`: its first n tokens end at a char boundary.
                        let alone = self
                            .tokenizer
                            .encode(*b, false)
                            .map_err(|e| internal(i, e))?;
                        match alone.get_offsets().get(n) {
                            Some(_) => &b[..alone.get_offsets()[n - 1].1],
                            None => b,
                        }
                    }
                    None => b,
                };
                self.tokenizer
                    .encode_fast((*a, b), true)
                    .map_err(|e| internal(i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch::pack(&encodings, self.pad_id))
    }

    /// Encodes (question, context) pairs, the context split into windows of at
    /// most `max_length` tokens overlapping by `doc_stride` (HF's QA pipeline).
    pub fn encode_qa(&self, questions: &[&str], contexts: &[&str]) -> Result<QaBatch, EncodeError> {
        debug_assert_eq!(questions.len(), contexts.len());
        let mut windows = Vec::new();
        let mut window_owner = Vec::new();
        for (i, (question, context)) in questions.iter().zip(contexts).enumerate() {
            let windows_left = self.options.max_windows - windows.len();
            let mut encoding = self.encode_pair(i, question, context, windows_left)?;
            let overflowing = encoding.take_overflowing();
            windows.push(encoding);
            windows.extend(overflowing);
            window_owner.resize(windows.len(), i as i64);
        }

        let batch = Batch::pack(&windows, self.pad_id);
        // Character offsets of context tokens only: questions, special tokens and
        // padding get -1 so the decoder never picks them.
        let mut offsets = vec![-1i64; batch.rows * batch.width * 2];
        let mut chars = CharIndex::default();
        for (row, (window, &owner)) in windows.iter().zip(&window_owner).enumerate() {
            if row == 0 || window_owner[row - 1] != owner {
                chars = CharIndex::new(contexts[owner as usize]);
            }
            let sequence_ids = window.get_sequence_ids();
            let tokens = window
                .get_offsets()
                .iter()
                .zip(&sequence_ids)
                .zip(window.get_special_tokens_mask());
            let out = &mut offsets[row * batch.width * 2..];
            for (k, ((&(start, end), &sequence), &special)) in tokens.enumerate() {
                if sequence == Some(1) && special == 0 {
                    out[2 * k] = chars.of(start);
                    out[2 * k + 1] = chars.of(end);
                }
            }
        }
        Ok(QaBatch {
            batch,
            offsets,
            window_owner,
        })
    }

    /// One pair, with byte offsets; its extra windows are in `get_overflowing()`.
    ///
    /// This is what tokenizers does for `encode((question, context))` with
    /// `OnlySecond` truncation, done by hand so that the question's length is
    /// known before windowing (tokenizers fails on a question that leaves no
    /// room, and panics on a stride that does not fit) without encoding the
    /// question twice.
    fn encode_pair(
        &self,
        index: usize,
        question: &str,
        context: &str,
        windows_left: usize,
    ) -> Result<Encoding, EncodeError> {
        let internal = |e: tokenizers::Error| {
            EncodeError::Internal(format!("cannot tokenize pair {index}: {e}"))
        };
        // The question's offsets are never used. The context's are bytes:
        // tokenizers' own char offsets hash every byte of the input (slow,
        // especially in Wasm); `CharIndex` converts only what we keep.
        let question = self
            .tokenizer
            .encode_fast(question, false)
            .map_err(internal)?;
        let mut context = self.tokenizer.encode(context, false).map_err(internal)?;
        // What tokenizers gives the second sequence; overflowing windows keep it.
        context.set_type_ids(vec![1; context.len()]);

        let max_length = self.options.max_length;
        let room = max_length.saturating_sub(self.added_pair + question.len());
        if room == 0 {
            return Err(EncodeError::Input(format!(
                "QUESTION[{index}] is {} tokens, which with {} special tokens \
                 leaves no room for context within max_length = {max_length}",
                question.len(),
                self.added_pair
            )));
        }
        // Windows must advance: a long question shrinks the overlap rather than
        // failing the request.
        let stride = self.options.doc_stride.min(room - 1);
        // Count the windows before making them: a huge context fails here, cheaply.
        let needed = match context.len().checked_sub(room) {
            None | Some(0) => 1,
            Some(rest) => 1 + rest.div_ceil(room - stride),
        };
        if needed > windows_left {
            return Err(EncodeError::Input(format!(
                "the contexts need more than max_windows = {} windows \
                 (CONTEXT[{index}] alone needs {needed})",
                self.options.max_windows
            )));
        }
        context.truncate(room, stride, TruncationDirection::Right);
        debug_assert_eq!(1 + context.get_overflowing().len(), needed);
        match &self.pair_processor {
            Some(processor) => processor.process(question, Some(context), true),
            None => self.tokenizer.post_process(question, Some(context), true),
        }
        .map_err(internal)
    }
}

/// Byte offset to character (Unicode scalar) offset within one text.
#[derive(Default)]
struct CharIndex {
    /// Character index of each byte, then the character count; empty for ASCII
    /// text, where the two agree.
    of_byte: Vec<u32>,
}

impl CharIndex {
    fn new(text: &str) -> Self {
        if text.is_ascii() {
            return CharIndex::default();
        }
        let mut of_byte = Vec::with_capacity(text.len() + 1);
        let mut count = 0;
        for (i, c) in text.chars().enumerate() {
            of_byte.extend(std::iter::repeat_n(i as u32, c.len_utf8()));
            count = i + 1;
        }
        of_byte.push(count as u32);
        CharIndex { of_byte }
    }

    /// Same mapping as tokenizers' `encode_char_offsets`: the character that
    /// holds byte `b`, or the count at the end.
    fn of(&self, b: usize) -> i64 {
        match self.of_byte.get(b) {
            Some(&c) => i64::from(c),
            None if self.of_byte.is_empty() => b as i64,
            None => i64::from(*self.of_byte.last().unwrap()),
        }
    }
}

impl Batch {
    /// Lays encodings out as rows, right-padded with `pad_id` (mask and type 0).
    fn pack(encodings: &[Encoding], pad_id: i64) -> Batch {
        let rows = encodings.len();
        let width = encodings.iter().map(Encoding::len).max().unwrap_or(0);
        let mut batch = Batch {
            rows,
            width,
            input_ids: vec![pad_id; rows * width],
            attention_mask: vec![0; rows * width],
            token_type_ids: vec![0; rows * width],
            truncated: encodings
                .iter()
                .map(|e| !e.get_overflowing().is_empty())
                .collect(),
        };
        for (row, encoding) in encodings.iter().enumerate() {
            let span = row * width..row * width + encoding.len();
            let columns = [
                (&mut batch.input_ids, encoding.get_ids()),
                (&mut batch.attention_mask, encoding.get_attention_mask()),
                (&mut batch.token_type_ids, encoding.get_type_ids()),
            ];
            for (out, values) in columns {
                for (o, &v) in out[span.clone()].iter_mut().zip(values) {
                    *o = i64::from(v);
                }
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::PaddingParams;

    /// A small BERT-style tokenizer.json, with the truncation and padding that
    /// all-MiniLM's ships (which the encoder must override).
    fn bert() -> Tokenizer {
        let words = [
            "[UNK]", "[PAD]", "[CLS]", "[SEP]", "what", "is", "the", "price", "?", "cafe", "naive",
            "€", "##4", ".", "50", "a", "b", "c", "d", "e", "f", "g", "h", "4",
        ];
        let vocab = words
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{w:?}: {i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let json = format!(
            r###"{{
  "version": "1.0",
  "truncation": {{"max_length": 8, "strategy": "LongestFirst", "stride": 0}},
  "padding": {{"strategy": {{"Fixed": 16}}, "direction": "Right", "pad_to_multiple_of": null,
               "pad_id": 1, "pad_type_id": 0, "pad_token": "[PAD]"}},
  "added_tokens": [],
  "normalizer": {{"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                  "strip_accents": null, "lowercase": true}},
  "pre_tokenizer": {{"type": "BertPreTokenizer"}},
  "post_processor": {{"type": "TemplateProcessing",
    "single": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}},
               {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}],
    "pair": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}},
             {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}},
             {{"SpecialToken": {{"id": "[SEP]", "type_id": 1}}}}],
    "special_tokens": {{"[CLS]": {{"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}},
                        "[SEP]": {{"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}}}}},
  "decoder": null,
  "model": {{"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
             "max_input_chars_per_word": 100, "vocab": {{{vocab}}}}}
}}"###
        );
        json.parse().unwrap()
    }

    fn encoder(options: Options) -> Encoder {
        Encoder::new(bert(), options).unwrap()
    }

    fn row<'a>(values: &'a [i64], batch: &Batch, r: usize) -> &'a [i64] {
        &values[r * batch.width..(r + 1) * batch.width]
    }

    #[test]
    fn single_pads_to_longest_and_truncates() {
        let e = encoder(Options {
            max_length: 6,
            pad_id: Some(-7),
            ..Default::default()
        });
        let b = e.encode_single(&["a b", "a b c d e f g", ""]).unwrap();
        assert_eq!((b.rows, b.width), (3, 6));
        assert_eq!(row(&b.input_ids, &b, 0), [2, 15, 16, 3, -7, -7]);
        assert_eq!(row(&b.input_ids, &b, 1), [2, 15, 16, 17, 18, 3]);
        assert_eq!(row(&b.input_ids, &b, 2), [2, 3, -7, -7, -7, -7]);
        assert_eq!(row(&b.attention_mask, &b, 0), [1, 1, 1, 1, 0, 0]);
        assert_eq!(b.token_type_ids, vec![0; 18]);
        assert_eq!(b.truncated, [false, true, false]);
    }

    #[test]
    fn single_spans_give_character_offsets_and_words() {
        let e = encoder(Options {
            pad_id: Some(-7),
            ..Default::default()
        });
        let s = e.encode_single_spans(&["naïve café €4.50", "a b"]).unwrap();
        let b = &s.batch;
        assert_eq!(*b, e.encode_single(&["naïve café €4.50", "a b"]).unwrap());
        assert_eq!(row(&b.input_ids, b, 0), [2, 10, 9, 11, 12, 13, 14, 3]);
        // Characters, not bytes ("ï", "é" and "€" are several bytes each); -1 for
        // [CLS], [SEP] and padding.
        let offsets: Vec<_> = s.offsets.chunks(2).map(|p| (p[0], p[1])).collect();
        assert_eq!(
            offsets[..8],
            [
                (-1, -1),
                (0, 5),
                (6, 10),
                (11, 12),
                (12, 13),
                (13, 14),
                (14, 16),
                (-1, -1)
            ]
        );
        assert_eq!(offsets[8..12], [(-1, -1), (0, 1), (2, 3), (-1, -1)]);
        assert_eq!(offsets[12..], [(-1, -1); 4]);
        // "€4" is one word of two tokens; "." splits off as its own.
        assert_eq!(row(&s.word_ids, b, 0), [-1, 0, 1, 2, 2, 3, 4, -1]);
        assert_eq!(row(&s.word_ids, b, 1), [-1, 0, 1, -1, -1, -1, -1, -1]);
    }

    #[test]
    fn long_texts_become_overlapping_windows() {
        let e = encoder(Options {
            long_input: LongInput::Mean,
            max_length: 6,
            doc_stride: 1,
            max_windows: 5,
            pad_id: Some(-7),
            ..Default::default()
        });
        // 4 tokens a window, sharing 1: a..d, d..g, g h.
        let w = e.encode_windows(&["a b", "a b c d e f g h"]).unwrap();
        let b = &w.batch;
        assert_eq!((b.rows, b.width), (4, 6));
        assert_eq!(w.window_owner, [0, 1, 1, 1]);
        assert_eq!(row(&b.input_ids, b, 0), [2, 15, 16, 3, -7, -7]);
        assert_eq!(row(&b.input_ids, b, 1), [2, 15, 16, 17, 18, 3]);
        assert_eq!(row(&b.input_ids, b, 2), [2, 18, 19, 20, 21, 3]);
        assert_eq!(row(&b.input_ids, b, 3), [2, 21, 22, 3, -7, -7]);
        assert_eq!(row(&b.attention_mask, b, 3), [1, 1, 1, 1, 0, 0]);
        // Bounded before anything is returned, naming the text.
        let err = e
            .encode_windows(&["a b c d e f g h", "a b c d e f g h"])
            .unwrap_err();
        assert!(
            matches!(&err, EncodeError::Input(m) if m.contains("max_windows = 5") && m.contains("TEXT[1] alone needs 3")),
            "{err:?}"
        );
        // A stride that leaves a window no new tokens is refused at load.
        let bad = Options {
            long_input: LongInput::Mean,
            max_length: 6,
            doc_stride: 4,
            ..Default::default()
        };
        assert!(Encoder::new(bert(), bad)
            .err()
            .unwrap()
            .contains("doc_stride 4"));
    }

    #[test]
    fn pairs_carry_both_segments_and_cut_the_longer_first() {
        let e = encoder(Options {
            mode: Mode::Pair,
            max_length: 9,
            pad_id: Some(-7),
            ..Default::default()
        });
        let b = e
            .encode_pairs(&["a b", "a"], &["c d", "c d e f g h"], None)
            .unwrap();
        assert_eq!((b.rows, b.width), (2, 9));
        // [CLS] a b [SEP] c d [SEP], the second segment typed 1.
        assert_eq!(row(&b.input_ids, &b, 0), [2, 15, 16, 3, 17, 18, 3, -7, -7]);
        assert_eq!(row(&b.token_type_ids, &b, 0), [0, 0, 0, 0, 1, 1, 1, 0, 0]);
        // 9 tokens: the document (the longer) loses its tail.
        assert_eq!(row(&b.input_ids, &b, 1), [2, 15, 3, 17, 18, 19, 20, 21, 3]);
        assert_eq!(row(&b.attention_mask, &b, 1), [1; 9]);
        // The document cut after its first 2 tokens first.
        let cut = e.encode_pairs(&["a"], &["c d e f"], Some(2)).unwrap();
        assert_eq!(row(&cut.input_ids, &cut, 0), [2, 15, 3, 17, 18, 3]);
        let short = e.encode_pairs(&["a"], &["c"], Some(2)).unwrap();
        assert_eq!(row(&short.input_ids, &short, 0), [2, 15, 3, 17, 3]);
    }

    #[test]
    fn pad_id_defaults() {
        let mut t = bert();
        t.with_padding(Some(PaddingParams {
            pad_id: 9,
            ..Default::default()
        }));
        assert_eq!(
            Encoder::new(t.clone(), Options::default())
                .unwrap()
                .pad_id(),
            9
        );
        // Without padding in tokenizer.json: the "[PAD]" token.
        t.with_padding(None);
        assert_eq!(Encoder::new(t, Options::default()).unwrap().pad_id(), 1);
    }

    #[test]
    fn empty_request() {
        let b = encoder(Options::default()).encode_single(&[]).unwrap();
        assert_eq!((b.rows, b.width), (0, 0));
    }

    #[test]
    fn max_length_must_leave_room() {
        let err = Encoder::new(
            bert(),
            Options {
                mode: Mode::Qa,
                max_length: 3,
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        assert!(err.contains("max_length 3"), "{err}");
    }

    fn qa(max_length: usize, doc_stride: usize, max_windows: usize) -> Encoder {
        encoder(Options {
            mode: Mode::Qa,
            max_length,
            doc_stride,
            max_windows,
            pad_id: None,
            ..Default::default()
        })
    }

    #[test]
    fn qa_char_offsets_point_into_the_context() {
        let context = "Café naïve €4.50";
        let b = qa(32, 4, 8)
            .encode_qa(&["what is the price?"], &[context])
            .unwrap();
        assert_eq!(b.window_owner, [0]);
        let chars: Vec<char> = context.chars().collect();
        let pieces: Vec<String> = b
            .offsets
            .chunks(2)
            .filter(|o| o[0] >= 0)
            .map(|o| chars[o[0] as usize..o[1] as usize].iter().collect())
            .collect();
        assert_eq!(pieces, ["Café", "naïve", "€", "4", ".", "50"]);
        // [CLS] what is the price ? [SEP] context... [SEP]
        assert_eq!(&b.offsets[..14], &[-1; 14]);
        let types = &b.batch.token_type_ids;
        assert_eq!(&types[..7], &[0; 7]);
        assert_eq!(&types[7..14], &[1; 7]);
    }

    #[test]
    fn qa_windows_overlap_by_the_stride() {
        // Question "a" + 3 specials leaves 4 context tokens a window; stride 2
        // advances 2 tokens: [a b c d] [c d e f] [e f g h].
        let e = qa(8, 2, 8);
        let b = e.encode_qa(&["a", "b"], &["a b c d e f g h", "c"]).unwrap();
        assert_eq!(b.window_owner, [0, 0, 0, 1]);
        assert_eq!((b.batch.rows, b.batch.width), (4, 8));
        assert_eq!(
            row(&b.batch.input_ids, &b.batch, 0),
            [2, 15, 3, 15, 16, 17, 18, 3]
        );
        assert_eq!(
            row(&b.batch.input_ids, &b.batch, 1),
            [2, 15, 3, 17, 18, 19, 20, 3]
        );
        assert_eq!(
            row(&b.batch.input_ids, &b.batch, 2),
            [2, 15, 3, 19, 20, 21, 22, 3]
        );
        assert_eq!(
            row(&b.batch.input_ids, &b.batch, 3),
            [2, 16, 3, 17, 3, 1, 1, 1]
        );
        assert_eq!(
            row(&b.batch.token_type_ids, &b.batch, 1),
            [0, 0, 0, 1, 1, 1, 1, 1]
        );
        assert_eq!(
            row(&b.batch.attention_mask, &b.batch, 3),
            [1, 1, 1, 1, 1, 0, 0, 0]
        );
        // Window 1 starts at "c", char 4 of its context.
        let w1 = &b.offsets[16..32];
        assert_eq!(
            w1,
            [-1, -1, -1, -1, -1, -1, 4, 5, 6, 7, 8, 9, 10, 11, -1, -1]
        );
        let w3 = &b.offsets[48..64];
        assert_eq!(&w3[6..10], [0, 1, -1, -1]);
    }

    /// The hand-made windows match tokenizers' own pair encoding with
    /// `OnlySecond` truncation (what HF's QA pipeline uses).
    #[test]
    fn qa_matches_tokenizers_pair_encoding() {
        let questions = ["what is the price?", "a b"];
        let contexts = [
            "Café naïve €4.50 a b c d e f g h, the price is 4.50 € — naïve cafe?",
            "h g f e d c b a",
        ];
        // (max_length, stride, windows): the first question leaves room for 4, 8, 6
        // and 32 tokens of its 26-token context.
        for (max_length, stride, windows) in [(12, 3, 25), (16, 0, 5), (14, 5, 22), (40, 10, 2)] {
            let ours = qa(max_length, stride, 64)
                .encode_qa(&questions, &contexts)
                .unwrap();
            let mut reference = bert();
            reference.with_padding(None);
            reference
                .with_truncation(Some(TruncationParams {
                    max_length,
                    strategy: TruncationStrategy::OnlySecond,
                    stride,
                    direction: TruncationDirection::Right,
                }))
                .unwrap();
            let mut row = 0;
            for (i, (q, c)) in questions.iter().zip(contexts).enumerate() {
                let mut encoding = reference.encode_char_offsets((*q, c), true).unwrap();
                let overflowing = encoding.take_overflowing();
                for window in std::iter::once(encoding).chain(overflowing) {
                    let b = &ours.batch;
                    let n = window.len();
                    let at = |v: &[i64]| v[row * b.width..row * b.width + n].to_vec();
                    let widen = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
                    assert_eq!(ours.window_owner[row], i as i64);
                    assert_eq!(at(&b.input_ids), widen(window.get_ids()), "row {row}");
                    assert_eq!(at(&b.token_type_ids), widen(window.get_type_ids()));
                    let offsets: Vec<i64> = window
                        .get_offsets()
                        .iter()
                        .zip(window.get_sequence_ids())
                        .zip(window.get_special_tokens_mask())
                        .flat_map(|((&(s, e), sequence), special)| match (sequence, special) {
                            (Some(1), 0) => [s as i64, e as i64],
                            _ => [-1, -1],
                        })
                        .collect();
                    let start = row * b.width * 2;
                    assert_eq!(ours.offsets[start..start + 2 * n], offsets[..], "row {row}");
                    row += 1;
                }
            }
            assert_eq!(row, ours.batch.rows);
            assert_eq!(row, windows, "max_length {max_length}, stride {stride}");
        }
    }

    #[test]
    fn qa_long_question_shrinks_the_stride() {
        // "a b c" leaves 2 context tokens; stride 4 becomes 1.
        let b = qa(8, 4, 8).encode_qa(&["a b c"], &["d e f"]).unwrap();
        assert_eq!(b.window_owner, [0, 0]);
    }

    #[test]
    fn qa_errors() {
        let e = qa(8, 2, 2);
        let err = e.encode_qa(&["a b c d e"], &["f"]).unwrap_err();
        assert!(
            matches!(&err, EncodeError::Input(m) if m.contains("QUESTION[0]")),
            "{err:?}"
        );
        let err = e
            .encode_qa(&["a", "a"], &["b", "a b c d e f g h"])
            .unwrap_err();
        assert!(
            matches!(&err, EncodeError::Input(m) if m.contains("max_windows = 2")),
            "{err:?}"
        );
        // The encoder is still usable afterwards.
        assert_eq!(e.encode_qa(&["a"], &["b"]).unwrap().window_owner, [0]);
    }
}
