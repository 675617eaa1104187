//! Span decoding proper, free of the plugin bindings so it can be tested natively.

/// Decoding settings (HF question-answering pipeline names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Answers per pair.
    pub top_k: usize,
    /// Longest answer, in tokens.
    pub max_answer_length: usize,
    /// Whether "no answer" (the score of position 0, [CLS]) competes with spans.
    pub handle_impossible_answer: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            top_k: 1,
            max_answer_length: 30,
            handle_impossible_answer: false,
        }
    }
}

/// The model's view of all context windows: `count` rows of `len` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Windows<'a> {
    pub count: usize,
    pub len: usize,
    /// `[count, len]`.
    pub start_logits: &'a [f32],
    /// `[count, len]`.
    pub end_logits: &'a [f32],
    /// `[count, len, 2]` character offsets into the owner's context; -1, -1
    /// for tokens outside it.
    pub offsets: &'a [i64],
    /// `[count]`: the pair each window belongs to.
    pub owner: &'a [i64],
}

/// One answer: characters `start..end` of its context.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub score: f32,
    pub start: i64,
    pub end: i64,
}

/// A candidate: characters `start..end` with probability `score`.
#[derive(Debug, Clone, Copy)]
struct Span {
    score: f64,
    start: usize,
    end: usize,
}

/// The best `k` distinct character spans seen so far, best first.
struct TopK {
    k: usize,
    spans: Vec<Span>,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k,
            spans: Vec::with_capacity(k + 1),
        }
    }

    /// The score a span must beat to get in.
    fn floor(&self) -> f64 {
        if self.spans.len() < self.k {
            f64::NEG_INFINITY
        } else {
            self.spans[self.k - 1].score
        }
    }

    fn offer(&mut self, span: Span) {
        // Below the floor nothing changes: a listed copy of this span already scores higher.
        if span.score <= self.floor() {
            return;
        }
        if let Some(i) = self
            .spans
            .iter()
            .position(|s| (s.start, s.end) == (span.start, span.end))
        {
            if span.score <= self.spans[i].score {
                return;
            }
            self.spans.remove(i);
        }
        // After equal scores: the first one found stays ahead.
        let at = self.spans.partition_point(|s| s.score >= span.score);
        self.spans.insert(at, span);
        self.spans.truncate(self.k);
    }
}

/// Decodes the best answers of each of `contexts`, at most `settings.top_k`
/// each, best first. Errors name the offending tensor.
pub fn decode(
    windows: &Windows,
    contexts: &[&str],
    settings: &Settings,
) -> Result<Vec<Vec<Answer>>, String> {
    let Windows { count, len, .. } = *windows;
    debug_assert_eq!(windows.start_logits.len(), count * len);
    debug_assert_eq!(windows.end_logits.len(), count * len);
    debug_assert_eq!(windows.offsets.len(), count * len * 2);
    debug_assert_eq!(windows.owner.len(), count);

    let char_counts: Vec<usize> = contexts.iter().map(|c| c.chars().count()).collect();
    let mut best: Vec<TopK> = contexts.iter().map(|_| TopK::new(settings.top_k)).collect();
    // The least "no answer" probability over each pair's windows.
    let mut null: Vec<Option<f64>> = vec![None; contexts.len()];

    let mut start_p = vec![0.0; len];
    let mut end_p = vec![0.0; len];
    let mut candidates = Vec::with_capacity(len);
    for w in 0..count {
        let owner = windows.owner[w];
        let pair = usize::try_from(owner)
            .ok()
            .filter(|&p| p < contexts.len())
            .ok_or_else(|| {
                format!(
                    "window_owner[{w}] is {owner}, but CONTEXT has {} elements",
                    contexts.len()
                )
            })?;
        let offsets = &windows.offsets[w * len * 2..(w + 1) * len * 2];

        // Context tokens, plus [CLS] when "no answer" competes.
        candidates.clear();
        for t in 0..len {
            let (start, end) = (offsets[2 * t], offsets[2 * t + 1]);
            if (start, end) == (-1, -1) {
                if t == 0 && settings.handle_impossible_answer {
                    candidates.push(0);
                }
                continue;
            }
            if start < 0 || start > end || end as usize > char_counts[pair] {
                return Err(format!(
                    "offsets[{w}][{t}] is [{start}, {end}], not a span of CONTEXT[{pair}] \
                     ({} characters) nor [-1, -1]",
                    char_counts[pair]
                ));
            }
            candidates.push(t);
        }
        if candidates.is_empty() {
            continue;
        }
        let row = w * len..(w + 1) * len;
        softmax(
            &windows.start_logits[row.clone()],
            &candidates,
            &mut start_p,
        )
        .map_err(|t| format!("start_logits[{w}][{t}] is not finite"))?;
        softmax(&windows.end_logits[row], &candidates, &mut end_p)
            .map_err(|t| format!("end_logits[{w}][{t}] is not finite"))?;

        if settings.handle_impossible_answer {
            let score = start_p[0] * end_p[0];
            null[pair] = Some(null[pair].map_or(score, |n: f64| n.min(score)));
        }
        let is_context = |t: usize| offsets[2 * t] >= 0;
        let best_end = candidates.iter().map(|&t| end_p[t]).fold(0.0, f64::max);
        let top = &mut best[pair];
        for &i in candidates.iter().filter(|&&i| is_context(i)) {
            // No span from here can make the list.
            if start_p[i] * best_end <= top.floor() {
                continue;
            }
            let last = (i + settings.max_answer_length).min(len);
            for j in (i..last).filter(|&j| is_context(j)) {
                let (start, end) = (offsets[2 * i] as usize, offsets[2 * j + 1] as usize);
                if end >= start {
                    top.offer(Span {
                        score: start_p[i] * end_p[j],
                        start,
                        end,
                    });
                }
            }
        }
    }

    Ok(best
        .into_iter()
        .zip(null)
        .zip(contexts)
        .map(|((mut top, null), context)| {
            // "No answer" (empty, at 0..0) leads when it beats every span.
            if let Some(null) = null.filter(|&n| top.spans.first().is_none_or(|s| n > s.score)) {
                let empty = Span {
                    score: null,
                    start: 0,
                    end: 0,
                };
                top.spans.insert(0, empty);
                top.spans.truncate(top.k);
            }
            top.spans
                .iter()
                .map(|s| Answer {
                    text: char_slice(context, s.start, s.end).to_string(),
                    score: s.score as f32,
                    start: s.start as i64,
                    end: s.end as i64,
                })
                .collect()
        })
        .collect())
}

/// Softmax of `logits` over the `candidates` positions into `out`; every other
/// position gets 0. Fails with the position of a NaN or infinite candidate.
fn softmax(logits: &[f32], candidates: &[usize], out: &mut [f64]) -> Result<(), usize> {
    out.fill(0.0);
    let mut max = f64::NEG_INFINITY;
    for &t in candidates {
        let x = f64::from(logits[t]);
        if !x.is_finite() {
            return Err(t);
        }
        max = max.max(x);
    }
    let mut sum = 0.0;
    for &t in candidates {
        let e = (f64::from(logits[t]) - max).exp();
        out[t] = e;
        sum += e;
    }
    for &t in candidates {
        out[t] /= sum;
    }
    Ok(())
}

/// Characters `start..end` of `text` (offsets already checked against its length).
fn char_slice(text: &str, start: usize, end: usize) -> &str {
    let byte = |c: usize| text.char_indices().nth(c).map_or(text.len(), |(b, _)| b);
    let from = byte(start);
    let to = from
        + text[from..]
            .char_indices()
            .nth(end - start)
            .map_or(text.len() - from, |(b, _)| b);
    &text[from..to]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One window per `(logits, offsets)` row; `None` offsets are -1, -1.
    struct Case {
        start: Vec<f32>,
        end: Vec<f32>,
        offsets: Vec<i64>,
        owner: Vec<i64>,
        len: usize,
    }

    impl Case {
        fn new(len: usize) -> Self {
            Case {
                start: vec![],
                end: vec![],
                offsets: vec![],
                owner: vec![],
                len,
            }
        }

        fn window(
            mut self,
            owner: i64,
            start: &[f32],
            end: &[f32],
            offsets: &[Option<(i64, i64)>],
        ) -> Self {
            assert!(start.len() == self.len && end.len() == self.len && offsets.len() == self.len);
            self.start.extend(start);
            self.end.extend(end);
            for o in offsets {
                let (s, e) = o.unwrap_or((-1, -1));
                self.offsets.extend([s, e]);
            }
            self.owner.push(owner);
            self
        }

        fn decode(
            &self,
            contexts: &[&str],
            settings: Settings,
        ) -> Result<Vec<Vec<Answer>>, String> {
            let windows = Windows {
                count: self.owner.len(),
                len: self.len,
                start_logits: &self.start,
                end_logits: &self.end,
                offsets: &self.offsets,
                owner: &self.owner,
            };
            decode(&windows, contexts, &settings)
        }
    }

    fn k(top_k: usize) -> Settings {
        Settings {
            top_k,
            ..Default::default()
        }
    }

    // [CLS] q [SEP] café naïve €4 [SEP]: "café naïve €4" chars 0..4, 5..10, 11..13.
    const CONTEXT: &str = "café naïve €4";
    const OFFSETS: [Option<(i64, i64)>; 7] = [
        None,
        None,
        None,
        Some((0, 4)),
        Some((5, 10)),
        Some((11, 13)),
        None,
    ];

    fn softmax_of(logits: &[f32], over: &[usize]) -> Vec<f64> {
        let sum: f64 = over.iter().map(|&t| f64::from(logits[t]).exp()).sum();
        (0..logits.len())
            .map(|t| {
                if over.contains(&t) {
                    f64::from(logits[t]).exp() / sum
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn best_span_with_char_offsets_and_probabilities() {
        let start = [9.0, 9.0, 9.0, 1.0, 3.0, 0.5, 9.0];
        let end = [9.0, 9.0, 9.0, 0.0, 1.0, 4.0, 9.0];
        let case = Case::new(7).window(0, &start, &end, &OFFSETS);
        let answers = case.decode(&[CONTEXT], k(3)).unwrap();
        let ps = softmax_of(&start, &[3, 4, 5]);
        let pe = softmax_of(&end, &[3, 4, 5]);
        let got: Vec<(&str, i64, i64)> = answers[0]
            .iter()
            .map(|a| (a.text.as_str(), a.start, a.end))
            .collect();
        // Scores: naïve €4 = ps4*pe5, café naïve €4 = ps3*pe5, naïve = ps4*pe4, ...
        assert_eq!(
            got,
            [
                ("naïve €4", 5, 13),
                ("café naïve €4", 0, 13),
                ("€4", 11, 13)
            ]
        );
        assert!((f64::from(answers[0][0].score) - ps[4] * pe[5]).abs() < 1e-6);
        assert!((f64::from(answers[0][2].score) - ps[5] * pe[5]).abs() < 1e-6);
    }

    #[test]
    fn max_answer_length_limits_tokens() {
        let start = [0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0];
        let end = [0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0];
        let case = Case::new(7).window(0, &start, &end, &OFFSETS);
        let settings = Settings {
            max_answer_length: 2,
            ..Default::default()
        };
        let answers = case.decode(&[CONTEXT], settings).unwrap();
        // café..€4 is 3 tokens: the best allowed is "café naïve" or "naïve €4".
        assert_ne!(answers[0][0].text, "café naïve €4");
        assert_eq!(answers[0].len(), 1);
    }

    #[test]
    fn spans_are_distinct_across_windows_and_best_of_both() {
        // Two overlapping windows of one pair both hold "naïve" (5..10).
        let w0 = [None, Some((0, 4)), Some((5, 10)), None];
        let w1 = [None, Some((5, 10)), Some((11, 13)), None];
        let case = Case::new(4)
            .window(0, &[0.0, 0.0, 4.0, 0.0], &[0.0, 0.0, 4.0, 0.0], &w0)
            .window(0, &[0.0, 5.0, 0.0, 0.0], &[0.0, 5.0, 0.0, 0.0], &w1);
        let answers = case.decode(&[CONTEXT], k(4)).unwrap();
        let texts: Vec<&str> = answers[0].iter().map(|a| a.text.as_str()).collect();
        assert_eq!(texts.iter().filter(|t| **t == "naïve").count(), 1);
        // "naïve" scores higher in window 1 than in window 0.
        let p0 = softmax_of(&[0.0, 0.0, 4.0, 0.0], &[1, 2]);
        let p1 = softmax_of(&[0.0, 5.0, 0.0, 0.0], &[1, 2]);
        assert!(p1[1] * p1[1] > p0[2] * p0[2]);
        assert_eq!(texts[0], "naïve");
        assert!((f64::from(answers[0][0].score) - p1[1] * p1[1]).abs() < 1e-6);
        // 5 distinct spans (café, café naïve, naïve, naïve €4, €4), the best 4 kept.
        assert_eq!(answers[0].len(), 4);
    }

    #[test]
    fn windows_go_to_their_owner() {
        let offsets = [None, Some((0, 1)), Some((2, 3)), None];
        let case = Case::new(4)
            .window(1, &[0.0, 3.0, 0.0, 0.0], &[0.0, 3.0, 0.0, 0.0], &offsets)
            .window(0, &[0.0, 0.0, 3.0, 0.0], &[0.0, 0.0, 3.0, 0.0], &offsets);
        let answers = case.decode(&["a b", "c d", "e f"], k(1)).unwrap();
        assert_eq!(answers[0][0].text, "b");
        assert_eq!(answers[1][0].text, "c");
        assert!(answers[2].is_empty());
    }

    #[test]
    fn impossible_answer_takes_the_least_null_score() {
        let offsets = [None, Some((0, 1)), Some((2, 3)), None];
        let settings = Settings {
            top_k: 2,
            handle_impossible_answer: true,
            ..Default::default()
        };
        // CLS dominates both windows: "no answer" first, with the lower of the two.
        let case = Case::new(4)
            .window(0, &[6.0, 0.0, 0.0, 9.0], &[6.0, 0.0, 0.0, 9.0], &offsets)
            .window(0, &[5.0, 1.0, 0.0, 9.0], &[5.0, 1.0, 0.0, 9.0], &offsets);
        let answers = case.decode(&["a b"], settings).unwrap();
        let p = softmax_of(&[5.0, 1.0, 0.0, 9.0], &[0, 1, 2]);
        assert_eq!(
            (
                answers[0][0].text.as_str(),
                answers[0][0].start,
                answers[0][0].end
            ),
            ("", 0, 0)
        );
        assert!((f64::from(answers[0][0].score) - p[0] * p[0]).abs() < 1e-6);
        assert_eq!(answers[0][1].text, "a");
        assert_eq!(answers[0].len(), 2);

        // A span that beats it comes first; "no answer" is then left out.
        let case = Case::new(4).window(0, &[0.0, 6.0, 0.0, 9.0], &[0.0, 6.0, 0.0, 9.0], &offsets);
        let answers = case.decode(&["a b"], settings).unwrap();
        assert_eq!(answers[0][0].text, "a");
        assert!(answers[0].iter().all(|a| !a.text.is_empty()));

        // Without handle_impossible_answer, CLS is no candidate at all.
        let answers = case.decode(&["a b"], k(2)).unwrap();
        let p = softmax_of(&[0.0, 6.0, 0.0, 9.0], &[1, 2]);
        assert!((f64::from(answers[0][0].score) - p[1] * p[1]).abs() < 1e-6);
    }

    #[test]
    fn invalid_inputs_are_named() {
        let offsets = [None, Some((0, 1)), Some((2, 3)), None];
        let logits = [0.0; 4];
        let case = Case::new(4).window(3, &logits, &logits, &offsets);
        let err = case.decode(&["a b"], k(1)).unwrap_err();
        assert!(err.contains("window_owner[0]"), "{err}");

        let case = Case::new(4).window(0, &logits, &logits, &offsets);
        let err = case.decode(&["a"], k(1)).unwrap_err();
        assert!(err.contains("offsets[0][2]"), "{err}");

        let nan = [0.0, f32::NAN, 0.0, 0.0];
        let case = Case::new(4).window(0, &logits, &nan, &offsets);
        let err = case.decode(&["a b"], k(1)).unwrap_err();
        assert!(err.contains("end_logits[0][1]"), "{err}");
    }

    #[test]
    fn empty_inputs() {
        let case = Case::new(0);
        assert_eq!(
            case.decode(&["x", "y"], k(3)).unwrap(),
            vec![vec![], vec![]]
        );
        assert!(case.decode(&[], k(3)).unwrap().is_empty());
    }

    /// Decoding agrees with scoring every span of every window and sorting.
    #[test]
    fn matches_brute_force() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let context = "abcdefghijklmnopqrstuvwxyzäöü€0123456789";
        for _ in 0..500 {
            let len = 4 + rand(10);
            let settings = Settings {
                top_k: 1 + rand(5),
                max_answer_length: 1 + rand(6),
                handle_impossible_answer: rand(2) == 1,
            };
            let mut case = Case::new(len);
            for _ in 0..1 + rand(4) {
                // [CLS] question.. then a run of context tokens, each 0-2 chars on.
                let first = 1 + rand(3);
                let mut at = rand(5) as i64;
                let offsets: Vec<Option<(i64, i64)>> = (0..len)
                    .map(|t| {
                        (t >= first && t < len - 1).then(|| {
                            let start = at + rand(2) as i64;
                            at = start + rand(3) as i64;
                            (start, at)
                        })
                    })
                    .collect();
                let logits = |r: &mut dyn FnMut(usize) -> usize| -> Vec<f32> {
                    (0..len).map(|_| r(1000) as f32 / 100.0 - 5.0).collect()
                };
                let (start, end) = (logits(&mut rand), logits(&mut rand));
                case = case.window(0, &start, &end, &offsets);
            }
            let got = case.decode(&[context], settings).unwrap().remove(0);

            let mut spans: Vec<(f64, i64, i64)> = Vec::new();
            let mut null = f64::INFINITY;
            for w in 0..case.owner.len() {
                let offsets = &case.offsets[w * len * 2..(w + 1) * len * 2];
                let ctx: Vec<usize> = (0..len).filter(|&t| offsets[2 * t] >= 0).collect();
                let mut over = ctx.clone();
                if settings.handle_impossible_answer {
                    over.insert(0, 0);
                }
                let ps = softmax_of(&case.start[w * len..(w + 1) * len], &over);
                let pe = softmax_of(&case.end[w * len..(w + 1) * len], &over);
                null = null.min(ps[0] * pe[0]);
                for &i in &ctx {
                    for &j in ctx
                        .iter()
                        .filter(|&&j| j >= i && j < i + settings.max_answer_length)
                    {
                        let span = (offsets[2 * i], offsets[2 * j + 1]);
                        let score = ps[i] * pe[j];
                        match spans.iter_mut().find(|s| (s.1, s.2) == span) {
                            Some(s) => s.0 = s.0.max(score),
                            None => spans.push((score, span.0, span.1)),
                        }
                    }
                }
            }
            spans.sort_by(|a, b| b.0.total_cmp(&a.0));
            if settings.handle_impossible_answer && spans.first().is_none_or(|s| null > s.0) {
                spans.insert(0, (null, 0, 0));
            }
            spans.truncate(settings.top_k);

            assert_eq!(got.len(), spans.len(), "{settings:?}");
            for (a, s) in got.iter().zip(&spans) {
                assert_eq!((a.start, a.end), (s.1, s.2), "{settings:?}");
                assert!(
                    (f64::from(a.score) - s.0).abs() <= 1e-6 * s.0.max(1e-30),
                    "{settings:?}"
                );
                assert_eq!(a.text, char_slice(context, s.1 as usize, s.2 as usize));
            }
        }
    }

    #[test]
    fn char_slices() {
        assert_eq!(char_slice("café naïve €4", 5, 10), "naïve");
        assert_eq!(char_slice("café naïve €4", 11, 13), "€4");
        assert_eq!(char_slice("café", 0, 0), "");
        assert_eq!(char_slice("café", 4, 4), "");
    }
}
