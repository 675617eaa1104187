//! Token scores to entities: the aggregation strategies of Hugging Face transformers'
//! token-classification pipeline, free of the plugin bindings so they test natively.
//!
//! Differences, on purpose: a token continues a word when the tokenizer's pre-tokenizer
//! put it in the same word (its `word_ids`), rather than transformers' guess from the
//! token's spelling or the character before it (which folds "Paris," into one word for
//! byte-level BPE); and `word` is the text's own span from `start` to `end`, not the
//! tokens decoded back into a string.

use serde::Serialize;

/// How tokens become entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One entity per token, its best label, no grouping.
    None,
    /// Each token's best label, then neighbouring tokens of one entity type grouped.
    Simple,
    /// A word takes its first token's best label, then words are grouped.
    First,
    /// A word takes the best label of its tokens' mean scores.
    Average,
    /// A word takes the best label of the token with the highest score.
    Max,
}

impl Strategy {
    pub fn parse(name: &str) -> Option<Strategy> {
        match name {
            "none" => Some(Strategy::None),
            "simple" => Some(Strategy::Simple),
            "first" => Some(Strategy::First),
            "average" => Some(Strategy::Average),
            "max" => Some(Strategy::Max),
            _ => None,
        }
    }
}

/// One text's tokens: `len` rows of `labels` logits, with each token's character span
/// and word (-1 for special tokens and padding, which are skipped).
pub struct Tokens<'a> {
    pub len: usize,
    pub logits: &'a [f32],
    /// `[len, 2]`
    pub offsets: &'a [i64],
    /// `[len]`
    pub word_ids: &'a [i64],
}

/// An entity as transformers' pipeline reports it: `entity` and `index` with strategy
/// `none`, `entity_group` otherwise.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entity {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity_group: Option<String>,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub word: String,
    pub start: usize,
    pub end: usize,
}

/// A token that is not special: its softmax scores and where it came from.
struct Scored {
    index: usize,
    scores: Vec<f64>,
    start: usize,
    end: usize,
    word: i64,
}

/// A token or word with its label.
struct Labelled {
    label: usize,
    score: f64,
    index: usize,
    start: usize,
    end: usize,
}

/// The entities of one text, in order, without those whose label (or group) is in
/// `ignore`.
pub fn entities(
    tokens: &Tokens,
    text: &str,
    labels: &[String],
    strategy: Strategy,
    ignore: &[String],
) -> Result<Vec<Entity>, String> {
    let count = labels.len();
    let chars = CharSpans::new(text);
    let mut scored = Vec::new();
    for k in 0..tokens.len {
        let (start, end) = (tokens.offsets[2 * k], tokens.offsets[2 * k + 1]);
        if start < 0 || end < 0 {
            continue;
        }
        let (start, end) = (start as usize, end as usize);
        if start > end || end > chars.count() {
            return Err(format!(
                "token {k} spans characters {start}..{end}, outside its text of {} characters",
                chars.count()
            ));
        }
        scored.push(Scored {
            index: k,
            scores: softmax(&tokens.logits[k * count..(k + 1) * count]),
            start,
            end,
            word: tokens.word_ids[k],
        });
    }

    let labelled: Vec<Labelled> = match strategy {
        Strategy::None | Strategy::Simple => scored
            .iter()
            .map(|t| {
                let label = argmax(&t.scores);
                Labelled {
                    label,
                    score: t.scores[label],
                    index: t.index,
                    start: t.start,
                    end: t.end,
                }
            })
            .collect(),
        _ => words(&scored)
            .map(|word| label_word(word, strategy))
            .collect(),
    };

    let name = |l: &Labelled| labels[l.label].clone();
    let found: Vec<Entity> = if strategy == Strategy::None {
        labelled
            .iter()
            .map(|l| Entity {
                entity: Some(name(l)),
                entity_group: None,
                score: l.score as f32,
                index: Some(l.index),
                word: chars.slice(text, l.start, l.end).to_string(),
                start: l.start,
                end: l.end,
            })
            .collect()
    } else {
        group(&labelled, labels)
            .map(|members| {
                let (first, last) = (&members[0], &members[members.len() - 1]);
                let label = &labels[first.label];
                // "B-PER" → "PER"; a label without a prefix stays whole.
                let group = label.split_once('-').map_or(label.as_str(), |(_, g)| g);
                let score = members.iter().map(|m| m.score).sum::<f64>() / members.len() as f64;
                Entity {
                    entity: None,
                    entity_group: Some(group.to_string()),
                    score: score as f32,
                    index: None,
                    word: chars.slice(text, first.start, last.end).to_string(),
                    start: first.start,
                    end: last.end,
                }
            })
            .collect()
    };
    Ok(found
        .into_iter()
        .filter(|e| {
            let label = e.entity.as_ref().or(e.entity_group.as_ref());
            !label.is_some_and(|l| ignore.contains(l))
        })
        .collect())
}

/// Runs of tokens that share a word.
fn words(tokens: &[Scored]) -> impl Iterator<Item = &[Scored]> {
    tokens.chunk_by(|a, b| b.word >= 0 && a.word == b.word)
}

fn label_word(word: &[Scored], strategy: Strategy) -> Labelled {
    let scores: Vec<f64> = match strategy {
        Strategy::First => word[0].scores.clone(),
        Strategy::Max => {
            // The first token whose best score is highest (Python's `max`).
            let mut best = &word[0];
            for t in &word[1..] {
                if max(&t.scores) > max(&best.scores) {
                    best = t;
                }
            }
            best.scores.clone()
        }
        _ => {
            let mut mean = vec![0.0; word[0].scores.len()];
            for t in word {
                for (m, s) in mean.iter_mut().zip(&t.scores) {
                    *m += s;
                }
            }
            mean.iter_mut().for_each(|m| *m /= word.len() as f64);
            mean
        }
    };
    let label = argmax(&scores);
    Labelled {
        label,
        score: scores[label],
        index: word[0].index,
        start: word[0].start,
        end: word[word.len() - 1].end,
    }
}

/// Runs of labelled tokens or words that form one entity: each member after the first
/// has the type of the member before it and is not marked as a beginning ("B-").
fn group<'a>(labelled: &'a [Labelled], labels: &'a [String]) -> Groups<'a> {
    Groups {
        rest: labelled,
        labels,
    }
}

struct Groups<'a> {
    rest: &'a [Labelled],
    labels: &'a [String],
}

impl<'a> Iterator for Groups<'a> {
    type Item = &'a [Labelled];

    fn next(&mut self) -> Option<Self::Item> {
        self.rest.first()?;
        let n = 1 + self
            .rest
            .windows(2)
            .take_while(|pair| {
                let (_, before) = tag(&self.labels[pair[0].label]);
                let (position, kind) = tag(&self.labels[pair[1].label]);
                kind == before && position != 'B'
            })
            .count();
        let (run, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(run)
    }
}

/// A label's position ('B' or 'I') and entity type: "B-PER" → ('B', "PER"); a label
/// without a B-/I- prefix is a continuation of its own type.
fn tag(label: &str) -> (char, &str) {
    if let Some(kind) = label.strip_prefix("B-") {
        ('B', kind)
    } else if let Some(kind) = label.strip_prefix("I-") {
        ('I', kind)
    } else {
        ('I', label)
    }
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let top = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let exp: Vec<f64> = logits.iter().map(|&x| (f64::from(x) - top).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// The first index of the largest value (numpy's `argmax`).
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Character offsets to byte offsets within one text.
struct CharSpans {
    /// Byte offset of each character, then the text's length; empty for ASCII.
    byte_of: Vec<usize>,
    len: usize,
}

impl CharSpans {
    fn new(text: &str) -> Self {
        let byte_of = if text.is_ascii() {
            Vec::new()
        } else {
            text.char_indices()
                .map(|(b, _)| b)
                .chain([text.len()])
                .collect()
        };
        CharSpans {
            byte_of,
            len: text.len(),
        }
    }

    fn count(&self) -> usize {
        if self.byte_of.is_empty() {
            self.len
        } else {
            self.byte_of.len() - 1
        }
    }

    /// Characters `start..end` of `text` (in range: checked by the caller).
    fn slice<'t>(&self, text: &'t str, start: usize, end: usize) -> &'t str {
        if self.byte_of.is_empty() {
            &text[start..end]
        } else {
            &text[self.byte_of[start]..self.byte_of[end]]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
            .map(String::from)
            .to_vec()
    }

    /// Logits that make `label` the best with softmax score about `p` (others equal).
    fn row(label: usize, p: f64) -> Vec<f32> {
        // p = e^x / (e^x + 4) → x = ln(4p / (1 - p)).
        let x = (4.0 * p / (1.0 - p)).ln() as f32;
        (0..5).map(|i| if i == label { x } else { 0.0 }).collect()
    }

    struct Case {
        logits: Vec<f32>,
        offsets: Vec<i64>,
        word_ids: Vec<i64>,
    }

    /// `[CLS]`, the given tokens (label, score, start, end, word), `[SEP]`, one pad.
    fn case(tokens: &[(usize, f64, i64, i64, i64)]) -> Case {
        let mut c = Case {
            logits: row(0, 0.9),
            offsets: vec![-1, -1],
            word_ids: vec![-1],
        };
        for &(label, p, start, end, word) in tokens {
            c.logits.extend(row(label, p));
            c.offsets.extend([start, end]);
            c.word_ids.push(word);
        }
        for _ in 0..2 {
            c.logits.extend(row(1, 0.99));
            c.offsets.extend([-1, -1]);
            c.word_ids.push(-1);
        }
        c
    }

    fn run(c: &Case, text: &str, strategy: Strategy) -> Vec<Entity> {
        let tokens = Tokens {
            len: c.word_ids.len(),
            logits: &c.logits,
            offsets: &c.offsets,
            word_ids: &c.word_ids,
        };
        entities(&tokens, text, &labels(), strategy, &["O".to_string()]).unwrap()
    }

    fn groups(found: &[Entity]) -> Vec<(&str, &str, usize, usize)> {
        found
            .iter()
            .map(|e| {
                let label = e.entity_group.as_deref().or(e.entity.as_deref()).unwrap();
                (label, e.word.as_str(), e.start, e.end)
            })
            .collect()
    }

    #[test]
    fn simple_groups_neighbours_of_one_type_until_a_beginning() {
        // "Ada Love lace in Rome Paris": B-PER I-PER I-PER O B-LOC B-LOC.
        let c = case(&[
            (1, 0.9, 0, 3, 0),
            (2, 0.8, 4, 8, 1),
            (2, 0.7, 8, 12, 1),
            (0, 0.9, 13, 15, 2),
            (3, 0.6, 16, 20, 3),
            (3, 0.9, 21, 26, 4),
        ]);
        let text = "Ada Lovelace in Rome Paris";
        let found = run(&c, text, Strategy::Simple);
        assert_eq!(
            groups(&found),
            [
                ("PER", "Ada Lovelace", 0, 12),
                ("LOC", "Rome", 16, 20),
                ("LOC", "Paris", 21, 26)
            ]
        );
        // The group's score is its members' mean.
        assert!((found[0].score - 0.8).abs() < 1e-6, "{}", found[0].score);
        assert!(found
            .iter()
            .all(|e| e.index.is_none() && e.entity.is_none()));
    }

    #[test]
    fn none_keeps_every_token_with_its_position() {
        let c = case(&[(1, 0.9, 0, 3, 0), (0, 0.9, 4, 6, 1), (4, 0.7, 7, 9, 2)]);
        let found = run(&c, "Ada in LA", Strategy::None);
        assert_eq!(
            groups(&found),
            [("B-PER", "Ada", 0, 3), ("I-LOC", "LA", 7, 9)]
        );
        assert_eq!((found[0].index, found[1].index), (Some(1), Some(3)));
        assert!((found[1].score - 0.7).abs() < 1e-6);
        let json = serde_json::to_string(&found[0]).unwrap();
        assert!(
            json.starts_with(r#"{"entity":"B-PER","score":0.9"#),
            "{json}"
        );
        assert!(
            json.ends_with(r#""index":1,"word":"Ada","start":0,"end":3}"#),
            "{json}"
        );
    }

    #[test]
    fn word_strategies_label_whole_words() {
        // One word of three tokens: B-PER 0.5, B-LOC 0.9, I-LOC 0.6; then "x" O.
        let c = case(&[
            (1, 0.5, 0, 2, 0),
            (3, 0.9, 2, 4, 0),
            (4, 0.6, 4, 6, 0),
            (0, 0.9, 7, 8, 1),
        ]);
        let text = "abcdef x";
        let first = run(&c, text, Strategy::First);
        assert_eq!(groups(&first), [("PER", "abcdef", 0, 6)]);
        assert!((first[0].score - 0.5).abs() < 1e-6);
        let max = run(&c, text, Strategy::Max);
        assert_eq!(groups(&max), [("LOC", "abcdef", 0, 6)]);
        assert!((max[0].score - 0.9).abs() < 1e-6);
        // Means: B-PER (0.5 + 0.025 + 0.1) / 3, B-LOC (0.125 + 0.9 + 0.1) / 3, ...
        let average = run(&c, text, Strategy::Average);
        assert_eq!(groups(&average), [("LOC", "abcdef", 0, 6)]);
        let want = (0.125 + 0.9 + 0.1) / 3.0;
        assert!((f64::from(average[0].score) - want).abs() < 1e-6);
        // Simple splits the word where its tokens' labels begin again.
        let simple = run(&c, text, Strategy::Simple);
        assert_eq!(
            groups(&simple),
            [("PER", "ab", 0, 2), ("LOC", "cdef", 2, 6)]
        );
    }

    #[test]
    fn spans_are_characters_and_checked() {
        let c = case(&[(1, 0.9, 0, 4, 0), (2, 0.9, 5, 10, 1)]);
        let found = run(&c, "Zoë Müller", Strategy::Simple);
        assert_eq!(groups(&found), [("PER", "Zoë Müller", 0, 10)]);
        let bad = case(&[(1, 0.9, 0, 11, 0)]);
        let tokens = Tokens {
            len: bad.word_ids.len(),
            logits: &bad.logits,
            offsets: &bad.offsets,
            word_ids: &bad.word_ids,
        };
        let err = entities(&tokens, "Zoë Müller", &labels(), Strategy::Simple, &[]).unwrap_err();
        assert!(
            err.contains("0..11") && err.contains("10 characters"),
            "{err}"
        );
    }

    #[test]
    fn labels_without_a_prefix_group_by_name() {
        let names = ["O", "PER", "LOC"].map(String::from).to_vec();
        let logits: Vec<f32> = [1, 1, 2, 0]
            .iter()
            .flat_map(|&l| (0..3).map(move |i| if i == l { 3.0 } else { 0.0 }))
            .collect();
        let tokens = Tokens {
            len: 4,
            logits: &logits,
            offsets: &[0, 1, 2, 3, 4, 5, 6, 7],
            word_ids: &[0, 1, 2, 3],
        };
        let found = entities(&tokens, "a b c d", &names, Strategy::Simple, &[]).unwrap();
        assert_eq!(
            groups(&found),
            [("PER", "a b", 0, 3), ("LOC", "c", 4, 5), ("O", "d", 6, 7)]
        );
    }
}
