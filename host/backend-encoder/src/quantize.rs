//! `wisp quantize`: post-training INT8 quantization of a Hugging Face checkpoint folder
//! into a new checkpoint folder ([`crate::quantized`] describes the format).
//!
//! Weights: symmetric per output channel. Activations (each product's input): per row
//! at run time (`dynamic`), or one range per tensor calibrated on texts run through the
//! f32 model (`max`, `percentile`, `entropy` as TensorRT's calibrator describes it,
//! `mse`). The FFN's down projection reads GELU's output, which is lopsided (mostly in
//! [-0.17, ∞)): it gets a zero point instead of a symmetric range. SmoothQuant divides
//! each input channel by s = max|x|^α / max|w|^(1-α) and multiplies the weights' column
//! by it, so a few outlier channels no longer set everyone's step.
//!
//! Sensitivity: the texts are split into calibration and held-out parts; if the held-out
//! outputs miss the targets, each product's damage is measured alone and the most
//! damaging products stay in f32, one at a time, until the targets are met.

use crate::bf16;
use crate::checkpoint::{self, Checkpoint, Dimensions, Pooling};
use crate::int8::{self, InputQuantization, Int8Panels, QuantizedRows, Range};
use crate::linear::{matmul_transposed, Threads};
use crate::model::{Encoder, HeadKind, PackedBatch, Product, Workspace};
use crate::quantized::{ProductScheme, QuantizedLinear, Scheme, FORMAT, SCHEME_FILE};
use safetensors::{tensor::TensorView, Dtype};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use wisp_core::error::{Error, Result};

/// The calibration texts used when none are given: varied English (and some other
/// languages) written for this project.
pub const DEFAULT_CALIBRATION: &str = include_str!("../calibration/en.txt");

/// At most this many calibration texts are read (more add time, not accuracy).
pub const MAX_TEXTS: usize = 20_000;
const HISTOGRAM_BINS: usize = 2048;
const BATCH_SEQUENCES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Each row's own range at run time.
    Dynamic,
    Max,
    /// The given percentile of |x|.
    Percentile(f64),
    /// TensorRT's entropy calibration: the threshold whose 128-level quantized
    /// histogram is closest (KL divergence) to the clipped one.
    Entropy,
    /// The threshold with the least expected squared error (rounding inside, clipping
    /// outside).
    Mse,
}

impl Method {
    pub fn parse(name: &str, percentile: f64) -> Option<Method> {
        Some(match name {
            "dynamic" => Method::Dynamic,
            "max" => Method::Max,
            "percentile" => Method::Percentile(percentile),
            "entropy" => Method::Entropy,
            "mse" => Method::Mse,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Dynamic => "dynamic",
            Method::Max => "max",
            Method::Percentile(_) => "percentile",
            Method::Entropy => "entropy",
            Method::Mse => "mse",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub method: Method,
    /// SmoothQuant's α; `None` turns smoothing off.
    pub smoothquant_alpha: Option<f32>,
    /// Held-out outputs' mean cosine to f32 must reach this...
    pub target_mean_cosine: f32,
    /// ...and the worst one this.
    pub target_min_cosine: f32,
    /// Calibration texts are cut to this many tokens.
    pub max_tokens: usize,
    pub threads: usize,
    /// The tokenizer.json for the calibration texts (default: the checkpoint's own).
    pub tokenizer: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            method: Method::Dynamic,
            smoothquant_alpha: Some(0.5),
            target_mean_cosine: 0.995,
            target_min_cosine: 0.99,
            max_tokens: 128,
            tokenizer: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The non-empty lines of a calibration file (at most [`MAX_TEXTS`]).
pub fn read_texts(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(MAX_TEXTS)
        .map(String::from)
        .collect()
}

/// How close the quantized model's outputs are to f32's on the held-out texts.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Accuracy {
    pub min_cosine: f32,
    pub mean_cosine: f32,
    /// The head's decision agreeing with f32's: classification argmax, QA best span,
    /// token classification per-token argmax. `None` for embeddings.
    pub agreement: Option<f32>,
}

impl Accuracy {
    fn meets(&self, options: &Options) -> bool {
        self.mean_cosine >= options.target_mean_cosine
            && self.min_cosine >= options.target_min_cosine
    }
}

/// Quantizes the checkpoint in `source` into `out` (created; it must not exist or be
/// empty, or hold an earlier `wisp quantize` output) with `texts` as calibration data.
/// `log` receives progress lines. Returns the scheme written (with its report).
pub fn quantize(
    source: &Path,
    out: &Path,
    texts: &[String],
    options: &Options,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<Scheme> {
    let Prepared {
        checkpoint,
        mut encoder,
        head,
        calibration,
        held_out,
        calibration_batches,
        held_out_batches,
    } = prepare(source, out, texts, options, log)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads.max(1))
        .build()
        .map_err(|e| Error::internal(format!("cannot start threads: {e}")))?;
    let threads = Threads(options.threads.max(1));
    let width = encoder.head_width();
    pool.install(|| -> Result<Scheme> {
        let reference = outputs(&encoder, &held_out_batches, threads);
        let evaluate = |encoder: &Encoder| {
            let got = outputs(encoder, &held_out_batches, threads);
            compare(&reference, &got, head, width)
        };
        let observed = observe(&encoder, &calibration_batches, threads, None);
        let smoothing = smoothing(&encoder, &observed, options.smoothquant_alpha);
        let ranges = match options.method {
            Method::Dynamic => None,
            method => {
                let histograms = observe(&encoder, &calibration_batches, threads, Some((&smoothing, &observed)));
                Some(calibrate(&histograms, method))
            }
        };
        // Every product in INT8 first.
        let mut weights = BTreeMap::new();
        for layer in 0..encoder.layers.len() {
            for product in Product::ALL {
                let key = (layer, product);
                let smooth = &smoothing[&key];
                let range = ranges.as_ref().map(|r| r[&key]);
                let (linear, w8) = build_product(&encoder, key, smooth, range);
                encoder.set_int8(layer, product, Some(linear));
                weights.insert(key, w8);
            }
        }
        let mut accuracy = evaluate(&encoder);
        log(format!(
            "all products INT8: held-out cosine to f32 mean {:.5}, worst {:.5}",
            accuracy.mean_cosine, accuracy.min_cosine
        ));
        let mut kept_f32: Vec<(usize, Product)> = Vec::new();
        let mut sensitivity: BTreeMap<(usize, Product), f32> = BTreeMap::new();
        if !accuracy.meets(options) {
            // Each product alone in INT8: how much of the damage is its own.
            let all: Vec<_> = weights.keys().copied().collect();
            let mut parked: BTreeMap<_, _> = all
                .iter()
                .map(|&(l, p)| ((l, p), encoder.set_int8(l, p, None)))
                .collect();
            for &(l, p) in &all {
                encoder.set_int8(l, p, parked.remove(&(l, p)).flatten());
                let alone = evaluate(&encoder);
                sensitivity.insert((l, p), 1.0 - alone.mean_cosine);
                parked.insert((l, p), encoder.set_int8(l, p, None));
            }
            for (&(l, p), linear) in parked.iter_mut() {
                encoder.set_int8(l, p, linear.take());
            }
            let mut order = all.clone();
            order.sort_by(|a, b| sensitivity[b].total_cmp(&sensitivity[a]));
            for key in order {
                if accuracy.meets(options) {
                    break;
                }
                encoder.set_int8(key.0, key.1, None);
                kept_f32.push(key);
                accuracy = evaluate(&encoder);
                log(format!(
                    "layer {} {} kept in f32 (alone it cost {:.5} of mean cosine): mean {:.5}, worst {:.5}",
                    key.0,
                    key.1.as_str(),
                    sensitivity[&key],
                    accuracy.mean_cosine,
                    accuracy.min_cosine
                ));
            }
        }
        let errors = product_errors(&encoder, &calibration_batches[..calibration_batches.len().min(4)], threads);
        let mut products = BTreeMap::new();
        let mut per_product = Vec::new();
        for &key in weights.keys() {
            let name = encoder.product_names(key.0, key.1)[0].clone();
            let int8 = !kept_f32.contains(&key);
            per_product.push(json!({
                "name": name,
                "layer": key.0,
                "product": key.1.as_str(),
                "precision": if int8 { "int8" } else { "f32" },
                "relative_error": errors.get(&key),
                "alone_mean_cosine_loss": sensitivity.get(&key),
            }));
            if int8 {
                products.insert(
                    name,
                    ProductScheme {
                        asymmetric: key.1 == Product::FfnDown,
                        range: ranges.as_ref().map(|r| [r[&key].min, r[&key].max]),
                        smooth: options.smoothquant_alpha.is_some(),
                    },
                );
            }
        }
        let scheme = Scheme {
            format: FORMAT.to_string(),
            version: 1,
            precision: "int8".to_string(),
            method: options.method.name().to_string(),
            smoothquant_alpha: options.smoothquant_alpha,
            products,
            report: json!({
                "source": source.display().to_string(),
                "calibration_texts": calibration.len(),
                "held_out_texts": held_out.len(),
                "method": options.method.name(),
                "percentile": match options.method { Method::Percentile(p) => Some(p), _ => None },
                "smoothquant_alpha": options.smoothquant_alpha,
                "target": { "mean_cosine": options.target_mean_cosine, "min_cosine": options.target_min_cosine },
                "held_out": accuracy,
                "targets_met": accuracy.meets(options),
                "products_in_f32": kept_f32.iter().map(|k| encoder.product_names(k.0, k.1)[0].clone()).collect::<Vec<_>>(),
                "products": per_product,
                "isa": int8::Isa::selected().name(),
            }),
        };
        let tensors = int8_tensors(&encoder, &weights, &smoothing, &scheme);
        write_checkpoint(source, out, &checkpoint, &tensors, &scheme)?;
        Ok(scheme)
    })
}

/// Rounds the checkpoint in `source` to BF16 into `out`: every layer's four products'
/// weights stored as BF16 (to nearest even), every other tensor as it was, and the
/// accuracy of running the products in BF16 (inputs rounded too, f32 sums) measured on
/// the held-out texts against f32. No calibration: BF16 keeps f32's range.
pub fn quantize_bf16(
    source: &Path,
    out: &Path,
    texts: &[String],
    options: &Options,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<Scheme> {
    let Prepared {
        checkpoint,
        mut encoder,
        head,
        calibration,
        held_out,
        held_out_batches,
        ..
    } = prepare(source, out, texts, options, log)?;
    let threads = Threads(options.threads.max(1));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.0)
        .build()
        .map_err(|e| Error::internal(format!("cannot start threads: {e}")))?;
    let width = encoder.head_width();
    let mut tensors = Tensors::new();
    let mut products = BTreeMap::new();
    for layer in 0..encoder.layers.len() {
        for product in Product::ALL {
            for name in encoder.product_names(layer, product) {
                let weight = format!("{name}.weight");
                let shape = checkpoint.shape(&weight).unwrap_or_default().to_vec();
                let values = checkpoint.get(&weight, &shape)?;
                let bytes = values
                    .data()
                    .iter()
                    .flat_map(|&v| bf16::round(v).to_le_bytes())
                    .collect();
                tensors.insert(weight, (Dtype::BF16, shape, bytes));
            }
            let name = encoder.product_names(layer, product)[0].clone();
            products.insert(
                name,
                ProductScheme {
                    asymmetric: false,
                    range: None,
                    smooth: false,
                },
            );
        }
    }
    let accuracy = pool.install(|| {
        let reference = outputs(&encoder, &held_out_batches, threads);
        encoder.use_bf16();
        let got = outputs(&encoder, &held_out_batches, threads);
        compare(&reference, &got, head, width)
    });
    log(format!(
        "every product BF16: held-out cosine to f32 mean {:.6}, worst {:.6}",
        accuracy.mean_cosine, accuracy.min_cosine
    ));
    let scheme = Scheme {
        format: FORMAT.to_string(),
        version: 1,
        precision: "bf16".to_string(),
        method: "nearest-even".to_string(),
        smoothquant_alpha: None,
        products,
        report: json!({
            "source": source.display().to_string(),
            "held_out_texts": held_out.len(),
            "calibration_texts": calibration.len(),
            "target": { "mean_cosine": options.target_mean_cosine, "min_cosine": options.target_min_cosine },
            "held_out": accuracy,
            "targets_met": accuracy.meets(options),
            "isa": bf16::Isa::selected().name(),
        }),
    };
    write_checkpoint(source, out, &checkpoint, &tensors, &scheme)?;
    Ok(scheme)
}

/// The float checkpoint loaded, and the calibration texts tokenized and split.
struct Prepared {
    checkpoint: Checkpoint,
    encoder: Encoder,
    head: HeadKind,
    calibration: Vec<Vec<u32>>,
    held_out: Vec<Vec<u32>>,
    calibration_batches: Vec<PackedBatch>,
    held_out_batches: Vec<PackedBatch>,
}

fn prepare(
    source: &Path,
    out: &Path,
    texts: &[String],
    options: &Options,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<Prepared> {
    check_output_folder(out)?;
    if Scheme::read(source)?.is_some() {
        return Err(Error::invalid(format!(
            "{} is already quantized ({SCHEME_FILE}); quantize the f32 checkpoint",
            source.display()
        )));
    }
    let dims = Dimensions::read(source)?;
    let checkpoint = Checkpoint::open(source)?;
    let head = HeadKind::from_architecture(&dims.architecture);
    let (pooling, normalize) = checkpoint::sentence_transformers_pooling(source)?;
    let encoder = Encoder::load(
        dims.clone(),
        &checkpoint,
        None,
        head,
        pooling.unwrap_or(Pooling::Mean),
        normalize,
    )?;
    let tokenizer = options
        .tokenizer
        .clone()
        .unwrap_or_else(|| source.join("tokenizer.json"));
    let sequences = tokenize(&tokenizer, &dims, texts, options.max_tokens)?;
    if sequences.len() < 10 {
        return Err(Error::invalid(format!(
            "{} calibration texts; wisp quantize needs at least 10 (one in five is held out to check accuracy)",
            sequences.len()
        )));
    }
    let (held_out, calibration): (Vec<_>, Vec<_>) = sequences
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 5 == 4);
    let strip = |v: Vec<(usize, Vec<u32>)>| v.into_iter().map(|(_, s)| s).collect::<Vec<_>>();
    let (held_out, calibration) = (strip(held_out), strip(calibration));
    let calibration_batches = batches(&dims, &calibration);
    let held_out_batches = batches(&dims, &held_out);
    log(format!(
        "{} calibration and {} held-out texts, {} tokens",
        calibration.len(),
        held_out.len(),
        calibration
            .iter()
            .chain(&held_out)
            .map(Vec::len)
            .sum::<usize>()
    ));
    Ok(Prepared {
        checkpoint,
        encoder,
        head,
        calibration,
        held_out,
        calibration_batches,
        held_out_batches,
    })
}

fn check_output_folder(out: &Path) -> Result<()> {
    if let Ok(mut entries) = std::fs::read_dir(out) {
        if entries.next().is_some() && !out.join(SCHEME_FILE).exists() {
            return Err(Error::invalid(format!(
                "{} exists and is not empty; choose a new folder for the quantized checkpoint",
                out.display()
            )));
        }
    }
    Ok(())
}

/// Token ids of each text through the checkpoint's tokenizer.json, cut to `max_tokens`
/// (keeping the closing special token).
fn tokenize(
    file: &Path,
    dims: &Dimensions,
    texts: &[String],
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(file).map_err(|e| {
        Error::invalid(format!(
            "cannot read {} (calibration texts are tokenized with the checkpoint's own tokenizer): {e}",
            file.display()
        ))
    })?;
    // Real tokens only: sentence-transformers' tokenizer.json often pads to a fixed
    // length, and padding would be calibrated (and compared) as if it were text.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| Error::internal(format!("tokenizer: {e}")))?;
    let roberta_offset = if dims.family == checkpoint::Family::Roberta {
        dims.pad_token_id as usize + 1
    } else {
        0
    };
    let limit = max_tokens.clamp(2, dims.max_positions.saturating_sub(roberta_offset).max(2));
    let mut sequences = Vec::with_capacity(texts.len());
    for (line, text) in texts.iter().enumerate() {
        let encoding = tokenizer.encode(text.as_str(), true).map_err(|e| {
            Error::invalid(format!(
                "calibration text {}: cannot tokenize: {e}",
                line + 1
            ))
        })?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > limit {
            let last = ids[ids.len() - 1];
            ids.truncate(limit - 1);
            ids.push(last);
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= dims.vocab) {
            return Err(Error::invalid(format!(
                "{} gives token id {bad}, outside the model's vocabulary of {} (is it this checkpoint's tokenizer?)",
                file.display(),
                dims.vocab
            )));
        }
        if !ids.is_empty() {
            sequences.push(ids);
        }
    }
    Ok(sequences)
}

fn batches(dims: &Dimensions, sequences: &[Vec<u32>]) -> Vec<PackedBatch> {
    sequences
        .chunks(BATCH_SEQUENCES)
        .map(|chunk| {
            let mut batch = PackedBatch::default();
            for ids in chunk {
                batch.push_sequence(dims, ids);
            }
            batch
        })
        .collect()
}

/// Each held-out sequence's output vector: its embedding, its logits, or its tokens'
/// per-token outputs in a row.
fn outputs(encoder: &Encoder, batches: &[PackedBatch], threads: Threads) -> Vec<Vec<f32>> {
    let mut ws = Workspace::default();
    let mut out = Vec::new();
    let mut vectors = Vec::new();
    for batch in batches {
        encoder.infer(batch, &mut ws, &mut out, threads);
        match encoder.head_kind {
            HeadKind::Embedding | HeadKind::Classification => {
                let width = out.len() / batch.segments.len();
                vectors.extend(out.chunks_exact(width).map(<[f32]>::to_vec));
            }
            HeadKind::QuestionAnswering | HeadKind::TokenClassification => {
                let width = out.len() / batch.tokens();
                for s in &batch.segments {
                    vectors.push(out[s.start * width..(s.start + s.len) * width].to_vec());
                }
            }
        }
    }
    vectors
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 {
        return 1.0;
    }
    (dot / (na * nb).max(1e-30)) as f32
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// The best answer span (start ≤ end, at most 30 tokens) from interleaved
/// [start, end] logits per token.
fn best_span(logits: &[f32]) -> (usize, usize) {
    let tokens = logits.len() / 2;
    let mut best = (0, 0, f32::MIN);
    for s in 0..tokens {
        for e in s..tokens.min(s + 30) {
            let score = logits[2 * s] + logits[2 * e + 1];
            if score > best.2 {
                best = (s, e, score);
            }
        }
    }
    (best.0, best.1)
}

/// Held-out outputs against f32's; `width` is the head's values per token (per-token
/// heads).
fn compare(reference: &[Vec<f32>], got: &[Vec<f32>], head: HeadKind, width: usize) -> Accuracy {
    let cosines: Vec<f32> = reference
        .iter()
        .zip(got)
        .map(|(a, b)| cosine(a, b))
        .collect();
    let share = |same: usize, of: usize| Some(same as f32 / of.max(1) as f32);
    let pairs = || reference.iter().zip(got);
    let agreement = match head {
        HeadKind::Embedding => None,
        HeadKind::Classification => share(
            pairs().filter(|(a, b)| argmax(a) == argmax(b)).count(),
            reference.len(),
        ),
        HeadKind::QuestionAnswering => share(
            pairs()
                .filter(|(a, b)| best_span(a) == best_span(b))
                .count(),
            reference.len(),
        ),
        HeadKind::TokenClassification => {
            let (mut same, mut tokens) = (0, 0);
            for (a, b) in pairs() {
                for (x, y) in a.chunks_exact(width).zip(b.chunks_exact(width)) {
                    tokens += 1;
                    same += usize::from(argmax(x) == argmax(y));
                }
            }
            share(same, tokens)
        }
    };
    Accuracy {
        min_cosine: cosines.iter().copied().fold(1.0, f32::min),
        mean_cosine: cosines.iter().sum::<f32>() / cosines.len().max(1) as f32,
        agreement,
    }
}

type Key = (usize, Product);
/// Each product's SmoothQuant divisors, per input channel.
type Smoothing = BTreeMap<Key, Vec<f32>>;

/// What a pass over the calibration batches saw at one product's input.
struct Observed {
    /// Per input channel: max |x| (the first pass, for smoothing).
    channel_absmax: Vec<f32>,
    /// Of the smoothed input (the second pass): its minimum, and the histogram of |x|
    /// (symmetric products) or of max(x, 0) (asymmetric) over [0, limit].
    min: f32,
    limit: f32,
    histogram: Vec<u64>,
}

/// Runs the calibration batches through the f32 products, recording each product's
/// input: per-channel maxima (first pass, `smoothing` None), or histograms of the
/// smoothed input (second pass, with the limits the first pass found).
fn observe(
    encoder: &Encoder,
    batches: &[PackedBatch],
    threads: Threads,
    smoothing: Option<(&Smoothing, &BTreeMap<Key, Observed>)>,
) -> BTreeMap<Key, Observed> {
    let mut seen: BTreeMap<Key, Observed> = BTreeMap::new();
    let mut ws = Workspace::default();
    for batch in batches {
        let mut record = |layer: usize, product: Product, x: &[f32]| {
            let k = x.len() / batch.tokens();
            let entry = seen.entry((layer, product)).or_insert_with(|| Observed {
                channel_absmax: vec![0.0; k],
                min: 0.0,
                limit: 0.0,
                histogram: vec![0; HISTOGRAM_BINS],
            });
            match smoothing {
                None => {
                    for row in x.chunks_exact(k) {
                        for (m, v) in entry.channel_absmax.iter_mut().zip(row) {
                            *m = m.max(v.abs());
                        }
                    }
                }
                Some((smoothing, first_pass)) => {
                    let smooth = &smoothing[&(layer, product)];
                    if entry.limit == 0.0 {
                        // The largest smoothed |x| the first pass saw.
                        entry.limit = first_pass[&(layer, product)]
                            .channel_absmax
                            .iter()
                            .zip(smooth)
                            .map(|(m, s)| m / s)
                            .fold(f32::MIN_POSITIVE, f32::max);
                    }
                    let asymmetric = product == Product::FfnDown;
                    let bins = HISTOGRAM_BINS as f32 / entry.limit;
                    for row in x.chunks_exact(k) {
                        for (v, s) in row.iter().zip(smooth) {
                            let v = v / s;
                            entry.min = entry.min.min(v);
                            let magnitude = if asymmetric { v.max(0.0) } else { v.abs() };
                            let bin = ((magnitude * bins) as usize).min(HISTOGRAM_BINS - 1);
                            entry.histogram[bin] += 1;
                        }
                    }
                }
            }
        };
        encoder.forward_observed(batch, &mut ws, threads, Some(&mut record));
    }
    seen
}

/// SmoothQuant's per-input-channel divisors s_c = max|x_c|^α / max|w_c|^(1-α) for each
/// product (all 1 without α).
fn smoothing(
    encoder: &Encoder,
    observed: &BTreeMap<Key, Observed>,
    alpha: Option<f32>,
) -> Smoothing {
    observed
        .iter()
        .map(|(&(layer, product), seen)| {
            let k = seen.channel_absmax.len();
            let Some(alpha) = alpha else {
                return ((layer, product), vec![1.0; k]);
            };
            let (w, _n) = encoder.product_weight(layer, product);
            let mut w_absmax = vec![0f32; k];
            for row in w.chunks_exact(k) {
                for (m, v) in w_absmax.iter_mut().zip(row) {
                    *m = m.max(v.abs());
                }
            }
            let s = seen
                .channel_absmax
                .iter()
                .zip(&w_absmax)
                .map(|(&x, &w)| {
                    if x > 0.0 && w > 0.0 {
                        (x.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-4, 1e4)
                    } else {
                        1.0
                    }
                })
                .collect();
            ((layer, product), s)
        })
        .collect()
}

/// Each product's calibrated input range from its histogram.
fn calibrate(observed: &BTreeMap<Key, Observed>, method: Method) -> BTreeMap<Key, Range> {
    observed
        .iter()
        .map(|(&key, seen)| {
            let asymmetric = key.1 == Product::FfnDown;
            let width = seen.limit / HISTOGRAM_BINS as f32;
            let h = &seen.histogram;
            let bins = match method {
                Method::Dynamic | Method::Max => HISTOGRAM_BINS,
                Method::Percentile(p) => percentile_bins(h, p),
                Method::Entropy => entropy_bins(h),
                Method::Mse => mse_bins(h, seen.min / width, asymmetric),
            };
            let threshold = bins as f32 * width;
            let range = if asymmetric {
                Range {
                    min: seen.min,
                    max: threshold,
                }
            } else {
                Range {
                    min: -threshold,
                    max: threshold,
                }
            };
            (key, range)
        })
        .collect()
}

/// Bins up to the `p`th percentile.
fn percentile_bins(h: &[u64], p: f64) -> usize {
    let total: u64 = h.iter().sum();
    let want = (total as f64 * (p / 100.0).clamp(0.0, 1.0)).ceil() as u64;
    let mut seen = 0;
    for (i, &c) in h.iter().enumerate() {
        seen += c;
        if seen >= want {
            return i + 1;
        }
    }
    h.len()
}

/// TensorRT's entropy calibration: for each candidate of i ≥ 128 bins, P is the
/// histogram clipped to i bins (the outliers added to the last), Q is P's first i bins
/// merged into 128 levels and spread back over their non-empty bins; the i with the
/// least KL(P‖Q) wins.
fn entropy_bins(h: &[u64]) -> usize {
    const LEVELS: usize = 128;
    let mut best = (h.len(), f64::INFINITY);
    let mut outliers: u64 = h[LEVELS..].iter().sum();
    for i in LEVELS..=h.len() {
        if i > LEVELS {
            outliers -= h[i - 1];
        }
        let mut p: Vec<f64> = h[..i].iter().map(|&c| c as f64).collect();
        p[i - 1] += outliers as f64;
        let mut q = vec![0f64; i];
        for level in 0..LEVELS {
            let (start, end) = (level * i / LEVELS, (level + 1) * i / LEVELS);
            let chunk = &h[start..end];
            let total: u64 = chunk.iter().sum();
            let nonzero = chunk.iter().filter(|&&c| c > 0).count();
            if nonzero > 0 {
                for (j, &c) in chunk.iter().enumerate() {
                    if c > 0 {
                        q[start + j] = total as f64 / nonzero as f64;
                    }
                }
            }
        }
        let (sum_p, sum_q): (f64, f64) = (p.iter().sum(), q.iter().sum());
        if sum_p == 0.0 || sum_q == 0.0 {
            continue;
        }
        let mut kl = 0.0;
        for (&pv, &qv) in p.iter().zip(&q) {
            if pv > 0.0 {
                let (pn, qn) = (pv / sum_p, (qv / sum_q).max(1e-12));
                kl += pn * (pn / qn).ln();
            }
        }
        if kl < best.1 {
            best = (i, kl);
        }
    }
    best.0
}

/// The threshold (in bins) with the least expected squared error: a value inside the
/// range is off by step²/12 on average, one outside by its distance to the edge.
/// `min_bins` is the asymmetric range's lower end, in bins (≤ 0).
fn mse_bins(h: &[u64], min_bins: f32, asymmetric: bool) -> usize {
    let mut best = (h.len(), f64::INFINITY);
    for t in 1..=h.len() {
        let step = if asymmetric {
            (t as f64 - min_bins as f64) / 255.0
        } else {
            t as f64 / 127.0
        };
        let rounding = step * step / 12.0;
        let mut error = 0.0;
        for (i, &c) in h.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let center = i as f64 + 0.5;
            error += c as f64
                * if center <= t as f64 {
                    rounding
                } else {
                    (center - t as f64).powi(2)
                };
        }
        if error < best.1 {
            best = (t, error);
        }
    }
    best.0
}

/// A product's INT8 form: weights times the smoothing, quantized per output channel.
/// Also returns the INT8 weights ([n, k]) and scales for writing.
fn build_product(
    encoder: &Encoder,
    (layer, product): Key,
    smooth: &[f32],
    range: Option<Range>,
) -> (QuantizedLinear, (Vec<i8>, Vec<f32>)) {
    let (w, n) = encoder.product_weight(layer, product);
    let k = smooth.len();
    let smoothed: Vec<f32> = w
        .chunks_exact(k)
        .flat_map(|row| row.iter().zip(smooth).map(|(v, s)| v * s))
        .collect();
    let (w8, scales) = int8::quantize_weights(&smoothed, n, k);
    let linear = QuantizedLinear {
        panels: Int8Panels::new(&w8, n, k),
        column_scales: scales.clone(),
        input: InputQuantization {
            range,
            asymmetric: product == Product::FfnDown,
            smooth: smooth.iter().any(|&s| s != 1.0).then(|| smooth.to_vec()),
        },
    };
    (linear, (w8, scales))
}

/// Each INT8 product's relative error ‖y₈ − y‖ / ‖y‖ against its f32 weights, on the
/// inputs that reach it in the quantized model, over a few calibration batches.
fn product_errors(
    encoder: &Encoder,
    batches: &[PackedBatch],
    threads: Threads,
) -> BTreeMap<Key, f64> {
    let mut sums: BTreeMap<Key, (f64, f64)> = BTreeMap::new();
    let mut ws = Workspace::default();
    let mut rows = QuantizedRows::default();
    for batch in batches {
        let m = batch.tokens();
        let mut record = |layer: usize, product: Product, x: &[f32]| {
            let Some(q) = encoder.int8(layer, product) else {
                return;
            };
            let (w, n) = encoder.product_weight(layer, product);
            let k = x.len() / m;
            let mut want = vec![0f32; m * n];
            matmul_transposed(&mut want, x, w, m, k, n, false, threads);
            let mut got = vec![0f32; m * n];
            rows.quantize(int8::Isa::selected(), x, m, &q.panels, &q.input);
            int8::matmul(
                int8::Isa::selected(),
                &mut got,
                &rows,
                &q.panels,
                &q.column_scales,
                &int8::Epilogue::default(),
                threads.0,
            );
            let entry = sums.entry((layer, product)).or_default();
            for (a, b) in want.iter().zip(&got) {
                entry.0 += ((a - b) as f64).powi(2);
                entry.1 += (*a as f64).powi(2);
            }
        };
        encoder.forward_observed(batch, &mut ws, threads, Some(&mut record));
    }
    sums.into_iter()
        .map(|(k, (e, n))| (k, (e / n.max(1e-30)).sqrt()))
        .collect()
}

/// Owned bytes of new tensors, by name: (dtype, shape, little-endian bytes).
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// The INT8 products' weights, with their scales (and input smoothing), in place of
/// their f32 weights.
fn int8_tensors(
    encoder: &Encoder,
    weights: &BTreeMap<Key, (Vec<i8>, Vec<f32>)>,
    smoothing: &Smoothing,
    scheme: &Scheme,
) -> Tensors {
    let mut new = Tensors::new();
    for (&(layer, product), (w8, scales)) in weights {
        if encoder.int8(layer, product).is_none() {
            continue;
        }
        let names = encoder.product_names(layer, product);
        let (n, k) = (
            scales.len() / names.len(),
            smoothing[&(layer, product)].len(),
        );
        for (part, name) in names.iter().enumerate() {
            let rows = &w8[part * n * k..(part + 1) * n * k];
            new.insert(
                format!("{name}.weight"),
                (
                    Dtype::I8,
                    vec![n, k],
                    rows.iter().map(|&v| v as u8).collect(),
                ),
            );
            let scale = &scales[part * n..(part + 1) * n];
            new.insert(format!("{name}.weight_scale"), f32_tensor(scale));
            if scheme.products.values().next().is_some_and(|p| p.smooth) {
                new.insert(
                    format!("{name}.input_smooth"),
                    f32_tensor(&smoothing[&(layer, product)]),
                );
            }
        }
    }
    new
}

/// Writes `out`: model.safetensors with the `new` tensors in place of (or beside) the
/// checkpoint's (every other tensor as it was), the scheme, and the checkpoint's other
/// files (config, tokenizer, sentence-transformers modules).
fn write_checkpoint(
    source: &Path,
    out: &Path,
    checkpoint: &Checkpoint,
    new: &Tensors,
    scheme: &Scheme,
) -> Result<()> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        Error::invalid(format!("cannot {what} {}: {e}", path.display()))
    };
    std::fs::create_dir_all(out).map_err(|e| io("create", out, e))?;
    let mut views: Vec<(String, TensorView)> = Vec::new();
    for name in checkpoint.names() {
        if new.contains_key(name) {
            continue;
        }
        let (dtype, shape, bytes) = checkpoint.raw(name).expect("a listed tensor");
        views.push((name.to_string(), view(dtype, shape.to_vec(), bytes)?));
    }
    for (name, (dtype, shape, bytes)) in new {
        views.push((name.clone(), view(*dtype, shape.clone(), bytes)?));
    }
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::internal(format!("cannot serialize the quantized checkpoint: {e}")))?;
    let file = out.join("model.safetensors");
    std::fs::write(&file, bytes).map_err(|e| io("write", &file, e))?;
    let file = out.join(SCHEME_FILE);
    let text = serde_json::to_string_pretty(scheme).expect("a scheme serializes");
    std::fs::write(&file, text).map_err(|e| io("write", &file, e))?;
    copy_other_files(source, out)
}

fn f32_tensor(values: &[f32]) -> (Dtype, Vec<usize>, Vec<u8>) {
    (
        Dtype::F32,
        vec![values.len()],
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

fn view(dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) -> Result<TensorView<'_>> {
    TensorView::new(dtype, shape, bytes)
        .map_err(|e| Error::internal(format!("cannot write a tensor: {e}")))
}

/// Weight files of other formats are not copied: the quantized checkpoint is the
/// safetensors file alone.
const WEIGHT_FILES: [&str; 8] = [
    "safetensors",
    "bin",
    "onnx",
    "h5",
    "msgpack",
    "ot",
    "pt",
    "pth",
];
/// Files larger than this are not configuration; they are left behind.
const MAX_COPIED_BYTES: u64 = 64 << 20;

/// The checkpoint's configuration and tokenizer files, and the folders modules.json
/// names (sentence-transformers' pooling and normalisation), copied into `out`.
fn copy_other_files(source: &Path, out: &Path) -> Result<()> {
    let mut folders = vec![std::path::PathBuf::new()];
    if let Ok(text) = checkpoint::read_small_file(&source.join("modules.json")) {
        if let Ok(serde_json::Value::Array(modules)) = serde_json::from_str(&text) {
            for module in modules {
                if let Some(path) = module.get("path").and_then(|p| p.as_str()) {
                    let path = Path::new(path);
                    // Only plain relative folders inside the checkpoint.
                    if !path.as_os_str().is_empty()
                        && path
                            .components()
                            .all(|c| matches!(c, std::path::Component::Normal(_)))
                    {
                        folders.push(path.to_path_buf());
                    }
                }
            }
        }
    }
    for folder in folders {
        let Ok(entries) = std::fs::read_dir(source.join(&folder)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            let name = entry.file_name();
            if !meta.is_file()
                || meta.len() > MAX_COPIED_BYTES
                || WEIGHT_FILES.contains(&extension)
                || name == SCHEME_FILE
            {
                continue;
            }
            let target = out.join(&folder);
            std::fs::create_dir_all(&target)
                .map_err(|e| Error::invalid(format!("cannot create {}: {e}", target.display())))?;
            std::fs::copy(&path, target.join(&name))
                .map_err(|e| Error::invalid(format!("cannot copy {}: {e}", path.display())))?;
        }
    }
    Ok(())
}
