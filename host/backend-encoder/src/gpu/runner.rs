//! The encoder on an NVIDIA GPU: fp16 weights and activations with fp32 accumulation,
//! cuBLASLt GEMMs with fused bias/GELU epilogues, wisp's kernels (kernels/*.cu) for
//! embeddings + LayerNorm, residual + LayerNorm, attention and the heads.
//!
//! A batch runs packed, as on the CPU: one token matrix without padding and
//! `seq_start` offsets per sequence. Launch shapes are rounded up to buckets (tokens,
//! sequences, longest sequence), and each bucket's whole forward pass is captured once
//! as a CUDA graph and replayed, so small batches are not dominated by launch costs.
//! Only the head's small fp32 output is copied back.

use crate::checkpoint::Pooling;
use crate::gpu::blas::Epilogue;
use crate::gpu::device::{Buffer, Device, Queue, Replay};
use crate::gpu::kernels::{self, MAX_SEQUENCE, SLACK_ROWS};
use crate::gpu::ops::Op;
use crate::model::{Encoder, Head, HeadKind, PackedBatch};
use crate::ops::Activation;
use crate::run_batch;
use half::f16;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use wisp_core::backend::{BackendRequest, Execution};
use wisp_core::error::{Error, Result};

/// Graphs kept per instance; beyond this the least recently used one is dropped.
const MAX_GRAPHS: usize = 96;
/// Failed captures after which an instance stops capturing altogether.
const MAX_CAPTURE_FAILURES: usize = 3;
/// Sequences per batch: the attention grid's z dimension (at most 65535) holds the
/// bucket, a power of two.
const MAX_SEQUENCES: usize = 32768;

fn upload(device: &dyn Device, values: &[f32]) -> Result<Buffer> {
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    device.upload(&bytes)
}

struct GpuLayer {
    qkv: (Buffer, Buffer),
    out: (Buffer, Buffer),
    attention_norm: (Buffer, Buffer),
    up: (Buffer, Buffer),
    down: (Buffer, Buffer),
    output_norm: (Buffer, Buffer),
}

enum GpuHead {
    Embedding {
        mode: i32,
        normalize: bool,
    },
    PerToken {
        weight: Buffer,
        bias: Buffer,
        labels: usize,
    },
    Sequence {
        pre: Option<(Buffer, Buffer, i32)>,
        weight: Buffer,
        bias: Buffer,
        labels: usize,
    },
}

/// The encoder's weights in fp16 on one GPU, shared by every instance on it.
pub struct GpuEncoder {
    pub device: Arc<dyn Device>,
    encoder: Arc<Encoder>,
    word: Buffer,
    position: Buffer,
    token_type: Option<Buffer>,
    embedding_norm: (Buffer, Buffer),
    layers: Vec<GpuLayer>,
    head: GpuHead,
    up_epilogue: Epilogue,
}

impl GpuEncoder {
    /// Uploads `encoder`'s weights to `device` as fp16.
    pub fn load(device: Arc<dyn Device>, encoder: Arc<Encoder>) -> Result<GpuEncoder> {
        let d = &encoder.dims;
        let head_size = d.hidden / d.heads;
        if !kernels::HEAD_SIZES.contains(&head_size) || !d.hidden.is_multiple_of(16) {
            return Err(Error::invalid(format!(
                "the GPU encoder needs a head size of 32, 64 or 128 and a hidden size that is a multiple of 16; this model has hidden {} and {} heads",
                d.hidden, d.heads
            )));
        }
        let up_epilogue = match d.activation {
            Activation::Gelu | Activation::GeluTanh => Epilogue::GeluBias,
            Activation::Relu => Epilogue::ReluBias,
            Activation::Tanh => {
                return Err(Error::invalid(
                    "the GPU encoder has no tanh feed-forward activation",
                ))
            }
        };
        let gpu = &*device;
        let pair = |(w, b): &(crate::checkpoint::Weight, crate::checkpoint::Weight)| {
            Ok::<_, Error>((upload(gpu, w.data())?, upload(gpu, b.data())?))
        };
        let e = &encoder.embeddings;
        let mut layers = Vec::with_capacity(encoder.layers.len());
        for layer in &encoder.layers {
            layers.push(GpuLayer {
                qkv: (
                    upload(gpu, &layer.qkv_weight)?,
                    upload(gpu, &layer.qkv_bias)?,
                ),
                out: pair(&layer.out)?,
                attention_norm: pair(&layer.attention_norm)?,
                up: pair(&layer.up)?,
                down: pair(&layer.down)?,
                output_norm: pair(&layer.output_norm)?,
            });
        }
        let head = match &encoder.head {
            Head::Embedding { pooling, normalize } => GpuHead::Embedding {
                mode: match pooling {
                    Pooling::Mean => kernels::POOL_MEAN,
                    Pooling::Cls => kernels::POOL_CLS,
                    Pooling::Max => kernels::POOL_MAX,
                },
                normalize: *normalize,
            },
            Head::QuestionAnswering { weight, bias }
            | Head::TokenClassification { weight, bias } => GpuHead::PerToken {
                weight: upload(gpu, weight.data())?,
                bias: upload(gpu, bias.data())?,
                labels: bias.shape[0],
            },
            Head::Classification { pre, weight, bias } => GpuHead::Sequence {
                pre: match pre {
                    Some((w, b, activation)) => Some((
                        upload(gpu, w.data())?,
                        upload(gpu, b.data())?,
                        match activation {
                            Activation::Tanh => kernels::ACTIVATION_TANH,
                            Activation::Relu => kernels::ACTIVATION_RELU,
                            other => {
                                return Err(Error::invalid(format!(
                                    "the GPU classification head has no {other:?} activation"
                                )))
                            }
                        },
                    )),
                    None => None,
                },
                weight: upload(gpu, weight.data())?,
                bias: upload(gpu, bias.data())?,
                labels: bias.shape[0],
            },
        };
        Ok(GpuEncoder {
            word: upload(gpu, e.word.data())?,
            position: upload(gpu, e.position.data())?,
            token_type: e
                .token_type
                .as_ref()
                .map(|t| upload(gpu, t.data()))
                .transpose()?,
            embedding_norm: pair(&e.norm)?,
            layers,
            head,
            up_epilogue,
            encoder,
            device,
        })
    }
}

/// Launch shape: every size a captured graph depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Bucket {
    tokens: usize,
    sequences: usize,
    max_len: usize,
    padded: bool,
}

impl Bucket {
    fn of(tokens: usize, sequences: usize, max_len: usize, padded: bool) -> Bucket {
        Bucket {
            tokens: round_tokens(tokens),
            sequences: sequences.next_power_of_two(),
            max_len: max_len.div_ceil(64) * 64,
            padded,
        }
    }

    /// u32 words of the input block: ids, positions, types, seq_start, key_valid bytes.
    fn input_words(&self) -> usize {
        3 * self.tokens + self.sequences + 1 + self.tokens.div_ceil(4)
    }
}

/// Token counts run in buckets: 16, 32, 64 and 128 (small batches cost about the same
/// at any of these), then multiples of 128 up to 2048, then of 256: at most 1/8 of the
/// GEMM work past 1024 tokens is padding (powers of two wasted up to half).
fn round_tokens(tokens: usize) -> usize {
    let tokens = tokens.max(16);
    if tokens <= 128 {
        tokens.next_power_of_two()
    } else if tokens <= 2048 {
        tokens.div_ceil(128) * 128
    } else {
        tokens.div_ceil(256) * 256
    }
}

/// Activation buffers for up to `tokens` tokens and `sequences` sequences.
struct Activations {
    tokens: usize,
    sequences: usize,
    inputs: Buffer,
    hidden: Buffer,
    qkv: Buffer,
    context: Buffer,
    projected: Buffer,
    intermediate: Buffer,
    output: Buffer,
}

/// A captured forward pass and when it last ran (for least-recently-used eviction).
struct CachedGraph {
    replay: Box<dyn Replay>,
    last_used: u64,
}

/// One GPU instance: its stream, cuBLASLt plans, buffers and captured graphs.
pub struct GpuRunner {
    // Field order is drop order: the queue (which waits for its stream) goes before
    // the weights its work reads.
    queue: Box<dyn Queue>,
    graphs: HashMap<Bucket, CachedGraph>,
    activations: Option<Activations>,
    weights: Arc<GpuEncoder>,
    /// Buckets run once directly: the second batch of a bucket is the one captured, so
    /// first-time work (module loading, cuBLASLt heuristics) never happens in a capture.
    seen: HashSet<Bucket>,
    /// Buckets whose capture failed: they run directly from then on.
    direct_only: HashSet<Bucket>,
    capture_failures: usize,
    /// Batches run (the clock of the graph cache).
    batches: u64,
    max_graphs: usize,
    use_graphs: bool,
    remove_padding: bool,
    batch: PackedBatch,
    /// The packed inputs as copied to the device (reused).
    input_words: Vec<u32>,
    head_out: Vec<f32>,
}

impl GpuRunner {
    pub fn new(
        weights: Arc<GpuEncoder>,
        remove_padding: bool,
        use_graphs: bool,
    ) -> Result<GpuRunner> {
        let queue = weights.device.new_queue()?;
        Ok(GpuRunner {
            weights,
            queue,
            activations: None,
            graphs: HashMap::new(),
            seen: HashSet::new(),
            direct_only: HashSet::new(),
            capture_failures: 0,
            batches: 0,
            max_graphs: MAX_GRAPHS,
            use_graphs,
            remove_padding,
            batch: PackedBatch::default(),
            input_words: Vec::new(),
            head_out: Vec::new(),
        })
    }

    /// Grows the buffers to hold `bucket` (dropping graphs that point at the old ones).
    fn reserve(&mut self, bucket: &Bucket) -> Result<()> {
        if let Some(a) = &self.activations {
            if a.tokens >= bucket.tokens && a.sequences >= bucket.sequences {
                return Ok(());
            }
        }
        let old = self.activations.take();
        self.graphs.clear();
        self.seen.clear();
        self.direct_only.clear();
        let tokens = bucket.tokens.max(old.as_ref().map_or(0, |a| a.tokens));
        let sequences = bucket
            .sequences
            .max(old.as_ref().map_or(0, |a| a.sequences));
        drop(old);
        let d = &self.weights.encoder.dims;
        let rows = tokens + SLACK_ROWS;
        let width = self.weights.encoder.head_width();
        let output = (sequences * width).max(tokens * width);
        let words = Bucket {
            tokens,
            sequences,
            max_len: 0,
            padded: true,
        }
        .input_words();
        // In this instance's stream order: growing never waits for other instances.
        let q = &mut self.queue;
        self.activations = Some(Activations {
            tokens,
            sequences,
            inputs: q.alloc(words * 4)?,
            hidden: q.alloc(rows * d.hidden * 2)?,
            qkv: q.alloc(rows * 3 * d.hidden * 2)?,
            context: q.alloc(rows * d.hidden * 2)?,
            projected: q.alloc(rows * d.hidden * 2)?,
            intermediate: q.alloc(rows * d.intermediate * 2)?,
            output: q.alloc(output * 4)?,
        });
        Ok(())
    }

    /// Enqueues the whole forward pass and head for `bucket` on the stream (captured
    /// into a graph, or run directly).
    fn enqueue(&mut self, bucket: &Bucket) -> Result<()> {
        let w = &self.weights;
        let q = &mut self.queue;
        let d = &w.encoder.dims;
        let a = self.activations.as_ref().expect("reserved");
        let (t, h) = (bucket.tokens, d.hidden);
        let ids = a.inputs.ptr;
        let positions = ids + 4 * t as u64;
        let types = positions + 4 * t as u64;
        let seq_start = types + 4 * t as u64;
        let key_valid = if bucket.padded {
            seq_start + 4 * (bucket.sequences as u64 + 1)
        } else {
            0
        };
        let eps = d.layer_norm_eps;
        q.run(&Op::EmbedLayerNorm {
            out: a.hidden.ptr,
            ids,
            positions,
            types,
            word: w.word.ptr,
            position: w.position.ptr,
            token_type: w.token_type.as_ref().map_or(0, |b| b.ptr),
            gamma: w.embedding_norm.0.ptr,
            beta: w.embedding_norm.1.ptr,
            tokens: t,
            width: h,
            eps,
        })?;
        let linear = |y: &Buffer, x: &Buffer, (weight, bias): &(Buffer, Buffer), n, k, epilogue| {
            Op::Linear {
                y: y.ptr,
                x: x.ptr,
                w: weight.ptr,
                bias: bias.ptr,
                m: t,
                n,
                k,
                epilogue,
            }
        };
        let residual_norm = |(gamma, beta): &(Buffer, Buffer)| Op::ResidualLayerNorm {
            out: a.hidden.ptr,
            x: a.projected.ptr,
            residual: a.hidden.ptr,
            gamma: gamma.ptr,
            beta: beta.ptr,
            tokens: t,
            width: h,
            eps,
        };
        for layer in &w.layers {
            q.run(&linear(
                &a.qkv,
                &a.hidden,
                &layer.qkv,
                3 * h,
                h,
                Epilogue::Bias,
            ))?;
            q.run(&Op::Attention {
                out: a.context.ptr,
                qkv: a.qkv.ptr,
                seq_start,
                key_valid,
                sequences: bucket.sequences,
                max_len: bucket.max_len,
                hidden: h,
                heads: d.heads,
            })?;
            q.run(&linear(
                &a.projected,
                &a.context,
                &layer.out,
                h,
                h,
                Epilogue::Bias,
            ))?;
            q.run(&residual_norm(&layer.attention_norm))?;
            let up = &layer.up;
            q.run(&linear(
                &a.intermediate,
                &a.hidden,
                up,
                d.intermediate,
                h,
                w.up_epilogue,
            ))?;
            let down = &layer.down;
            q.run(&linear(
                &a.projected,
                &a.intermediate,
                down,
                h,
                d.intermediate,
                Epilogue::Bias,
            ))?;
            q.run(&residual_norm(&layer.output_norm))?;
        }
        q.run(&match &w.head {
            GpuHead::Embedding { mode, normalize } => Op::PoolEmbedding {
                out: a.output.ptr,
                hidden: a.hidden.ptr,
                seq_start,
                key_valid,
                sequences: bucket.sequences,
                width: h,
                mode: *mode,
                normalize: *normalize,
            },
            GpuHead::PerToken {
                weight,
                bias,
                labels,
            } => Op::TokenHead {
                out: a.output.ptr,
                hidden: a.hidden.ptr,
                weight: weight.ptr,
                bias: bias.ptr,
                tokens: t,
                width: h,
                labels: *labels,
            },
            GpuHead::Sequence {
                pre,
                weight,
                bias,
                labels,
            } => Op::SequenceHead {
                out: a.output.ptr,
                hidden: a.hidden.ptr,
                seq_start,
                pre: pre.as_ref().map(|(w, b, act)| (w.ptr, b.ptr, *act)),
                weight: weight.ptr,
                bias: bias.ptr,
                sequences: bucket.sequences,
                width: h,
                labels: *labels,
            },
        })
    }

    /// Runs the bucket's graph, capturing it the second time the bucket is seen (the
    /// first runs directly). Queues that cannot capture always run directly; a bucket
    /// whose capture failed runs directly from then on, and after a few failures the
    /// instance stops capturing.
    fn launch(&mut self, bucket: &Bucket) -> Result<()> {
        self.batches += 1;
        if !self.use_graphs || self.direct_only.contains(bucket) {
            return self.enqueue(bucket);
        }
        if self.seen.insert(*bucket) {
            if self.seen.len() > 4 * self.max_graphs {
                // Bounded: forgetting only costs another direct run before a capture.
                self.seen.clear();
                self.seen.insert(*bucket);
            }
            return self.enqueue(bucket);
        }
        if !self.graphs.contains_key(bucket) {
            if self.graphs.len() >= self.max_graphs {
                let oldest = self
                    .graphs
                    .iter()
                    .min_by_key(|(_, g)| g.last_used)
                    .map(|(b, _)| *b);
                if let Some(oldest) = oldest {
                    self.graphs.remove(&oldest);
                }
            }
            match self.capture(bucket) {
                Ok(Some(replay)) => {
                    self.graphs.insert(
                        *bucket,
                        CachedGraph {
                            replay,
                            last_used: 0,
                        },
                    );
                }
                Ok(None) => {
                    self.use_graphs = false;
                    return self.enqueue(bucket);
                }
                Err(e) => {
                    if self.queue.poisoned().is_some() {
                        return Err(e);
                    }
                    self.capture_failures += 1;
                    self.direct_only.insert(*bucket);
                    let give_up = self.capture_failures >= MAX_CAPTURE_FAILURES;
                    if give_up {
                        self.use_graphs = false;
                        self.graphs.clear();
                    }
                    tracing::warn!(
                        device = %self.weights.device.describe(),
                        tokens = bucket.tokens,
                        sequences = bucket.sequences,
                        max_len = bucket.max_len,
                        error = %e,
                        "CUDA graph capture failed; this launch shape runs without a graph{}",
                        if give_up { " (and, after repeated failures, every shape of this instance)" } else { "" }
                    );
                    return self.enqueue(bucket);
                }
            }
        }
        let graph = self.graphs.get_mut(bucket).expect("captured above");
        graph.last_used = self.batches;
        graph.replay.replay()
    }

    /// Records the bucket's forward pass (None: the queue cannot record).
    fn capture(&mut self, bucket: &Bucket) -> Result<Option<Box<dyn Replay>>> {
        if !self.queue.begin_capture()? {
            return Ok(None);
        }
        let enqueued = self.enqueue(bucket);
        let graph = self.queue.end_capture();
        enqueued?;
        graph.map(Some)
    }

    /// Runs a packed batch and leaves the head's output in `out`.
    fn forward(&mut self, batch: &PackedBatch, out: &mut Vec<f32>) -> Result<()> {
        let (tokens, sequences) = (batch.tokens(), batch.segments.len());
        let max_len = batch.segments.iter().map(|s| s.len).max().unwrap_or(0);
        if max_len > MAX_SEQUENCE {
            return Err(Error::invalid(format!(
                "a sequence of {max_len} tokens is longer than the GPU encoder's {MAX_SEQUENCE}"
            )));
        }
        if sequences > MAX_SEQUENCES {
            return Err(Error::invalid(format!(
                "a batch of {sequences} sequences exceeds the GPU encoder's {MAX_SEQUENCES}"
            )));
        }
        let bucket = Bucket::of(tokens, sequences, max_len, batch.key_valid.is_some());
        self.reserve(&bucket)?;
        // Inputs, laid out as `enqueue` reads them, in one copy.
        let t = bucket.tokens;
        let input = &mut self.input_words;
        input.clear();
        input.resize(bucket.input_words(), 0);
        input[..tokens].copy_from_slice(&batch.ids);
        input[t..t + tokens].copy_from_slice(&batch.positions);
        input[2 * t..2 * t + tokens].copy_from_slice(&batch.types);
        let starts = &mut input[3 * t..3 * t + bucket.sequences + 1];
        for (i, seg) in batch.segments.iter().enumerate() {
            starts[i] = seg.start as u32;
        }
        // Bucket padding: empty sequences at the end.
        for start in &mut starts[sequences..] {
            *start = tokens as u32;
        }
        if let Some(valid) = &batch.key_valid {
            let bytes = &mut input[3 * t + bucket.sequences + 1..];
            for (i, &v) in valid.iter().enumerate() {
                bytes[i / 4] |= u32::from(v) << (8 * (i % 4));
            }
        }
        let inputs_ptr = self.activations.as_ref().expect("reserved").inputs.ptr;
        let launched = self
            .queue
            .copy_in(inputs_ptr, &self.input_words)
            .and_then(|()| self.launch(&bucket))
            .and_then(|()| self.copy_out(batch, out));
        if launched.is_err() {
            // Nothing still queued may read the staged inputs the next batch rewrites.
            self.queue.drain();
        }
        launched
    }

    /// Copies the head's output back into `out` (waiting for the queue).
    fn copy_out(&mut self, batch: &PackedBatch, out: &mut Vec<f32>) -> Result<()> {
        let width = self.weights.encoder.head_width();
        let count = match self.weights.head {
            GpuHead::PerToken { .. } => batch.tokens() * width,
            _ => batch.segments.len() * width,
        };
        out.clear();
        out.resize(count, 0.0);
        let output = self.activations.as_ref().expect("reserved").output.ptr;
        self.queue.copy_out(out, output)
    }

    /// Packs, runs and unpacks one batch, as the CPU runner does.
    pub fn run(&mut self, requests: &[BackendRequest]) -> Execution {
        let encoder = self.weights.encoder.clone();
        let mut batch = std::mem::take(&mut self.batch);
        let mut head_out = std::mem::take(&mut self.head_out);
        let execution = run_batch(
            &encoder,
            requests,
            self.remove_padding,
            &mut batch,
            &mut head_out,
            |batch, out| self.forward(batch, out),
        );
        self.batch = batch;
        self.head_out = head_out;
        execution
    }

    /// For benchmarks and checks: runs an already packed batch and returns the head's
    /// output ([sequences, width] or [tokens, width]).
    pub fn run_packed(&mut self, batch: PackedBatch) -> Result<&[f32]> {
        let mut out = std::mem::take(&mut self.head_out);
        let result = self.forward(&batch, &mut out);
        self.head_out = out;
        self.batch = batch;
        result.map(|()| &self.head_out[..])
    }

    /// Runs one short sequence twice (directly, then captured), so kernels, cuBLASLt
    /// plans and a first graph are ready, and a broken setup fails the load rather than
    /// the first request.
    pub fn warm_up(&mut self) -> Result<()> {
        let d = &self.weights.encoder.dims;
        let len = 8.min(d.max_positions);
        let first_position = if d.family == crate::checkpoint::Family::Roberta {
            d.pad_token_id as usize + 1
        } else {
            0
        };
        let batch = PackedBatch {
            ids: (0..len as u32).map(|i| i % d.vocab as u32).collect(),
            positions: (0..len)
                .map(|i| (first_position + i).min(d.max_positions - 1) as u32)
                .collect(),
            types: vec![0; len],
            segments: vec![crate::ops::Segment { start: 0, len }],
            key_valid: None,
        };
        let mut out = Vec::new();
        for _ in 0..2 {
            self.forward(&batch, &mut out)?;
        }
        Ok(())
    }

    pub fn head_kind(&self) -> HeadKind {
        self.weights.encoder.head_kind
    }

    /// Captured graphs (one per launch-shape bucket seen).
    pub fn graphs(&self) -> usize {
        self.graphs.len()
    }

    /// Why this instance can run nothing more: its GPU context was poisoned by a
    /// sticky error (illegal address, launch failure...), which only a restart clears.
    pub fn out_of_service(&self) -> Option<String> {
        self.queue.poisoned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::device::{TwinDevice, TwinFaults};
    use crate::ops::Segment;

    /// A random 2-layer BERT (hidden 64, 2 heads of 32) written as a checkpoint folder.
    fn tiny_bert() -> Arc<Encoder> {
        let dir = tempfile::tempdir().unwrap();
        let (h, inter, vocab, positions) = (64usize, 128usize, 50usize, 64usize);
        std::fs::write(
            dir.path().join("config.json"),
            format!(
                r#"{{"model_type": "bert", "architectures": ["BertModel"], "hidden_size": {h},
                "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": {inter},
                "vocab_size": {vocab}, "max_position_embeddings": {positions},
                "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}}"#
            ),
        )
        .unwrap();
        let mut tensors: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![vocab, h]),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![positions, h],
            ),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for i in 0..2 {
            let l = format!("encoder.layer.{i}");
            for (name, out, inp) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", inter, h),
                ("output.dense", h, inter),
            ] {
                tensors.push((format!("{l}.{name}.weight"), vec![out, inp]));
                tensors.push((format!("{l}.{name}.bias"), vec![out]));
            }
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                tensors.push((format!("{l}.{norm}.weight"), vec![h]));
                tensors.push((format!("{l}.{norm}.bias"), vec![h]));
            }
        }
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut header, mut data) = (serde_json::Map::new(), Vec::<u8>::new());
        for (name, shape) in tensors {
            let count: usize = shape.iter().product();
            let start = data.len();
            for _ in 0..count {
                let v = if name.ends_with("LayerNorm.weight") {
                    1.0
                } else {
                    (rng.f32() - 0.5) * 0.2
                };
                data.extend_from_slice(&v.to_le_bytes());
            }
            header.insert(
                name,
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let mut header = serde_json::to_vec(&header).unwrap();
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header);
        file.extend_from_slice(&data);
        std::fs::write(dir.path().join("model.safetensors"), file).unwrap();
        Arc::new(crate::load_encoder(&crate::EncoderSettings::new("."), dir.path()).unwrap())
    }

    fn batch(lengths: &[usize]) -> PackedBatch {
        let mut batch = PackedBatch::default();
        for &len in lengths {
            let start = batch.tokens();
            for i in 0..len {
                batch.ids.push(((start + i) * 7 % 50) as u32);
                batch.positions.push(i as u32);
                batch.types.push(0);
            }
            batch.segments.push(Segment { start, len });
        }
        batch
    }

    fn runner(device: &TwinDevice, encoder: &Arc<Encoder>, graphs: bool) -> GpuRunner {
        let device: Arc<dyn Device> = Arc::new(device.clone());
        let weights = Arc::new(GpuEncoder::load(device, encoder.clone()).unwrap());
        GpuRunner::new(weights, true, graphs).unwrap()
    }

    #[test]
    fn token_buckets_waste_at_most_an_eighth_past_a_thousand_tokens() {
        assert_eq!(round_tokens(1), 16);
        assert_eq!(round_tokens(100), 128);
        assert_eq!(round_tokens(129), 256);
        assert_eq!(round_tokens(1025), 1152);
        assert_eq!(round_tokens(2049), 2304);
        for tokens in 1024..9000 {
            let bucket = round_tokens(tokens);
            assert!(
                bucket >= tokens && (bucket - tokens) * 8 <= tokens,
                "{tokens} → {bucket}"
            );
        }
    }

    /// Replayed graphs compute what direct runs compute, also after the buffers grew
    /// (graphs pointing at freed buffers would fail on the twin device).
    #[test]
    fn replayed_graphs_match_direct_runs_across_buffer_growth() {
        let encoder = tiny_bert();
        let device = TwinDevice::new();
        let mut direct = runner(&TwinDevice::new(), &encoder, false);
        let mut graphed = runner(&device, &encoder, true);
        for lengths in [
            &[5usize, 9][..],
            &[5, 9],
            &[5, 9],
            &[40, 33, 60],
            &[40, 33, 60],
            &[5, 9],
        ] {
            let expected = direct.run_packed(batch(lengths)).unwrap().to_vec();
            let got = graphed.run_packed(batch(lengths)).unwrap().to_vec();
            assert_eq!(got, expected, "lengths {lengths:?}");
        }
        // [5, 9] captured, then [40, 33, 60] grew the buffers (dropping it) and was
        // captured in turn; the last [5, 9] runs directly again (seen anew).
        assert_eq!(device.captures(), 2);
        assert_eq!(graphed.graphs(), 1);
    }

    #[test]
    fn a_failed_capture_runs_directly_and_is_not_retried() {
        let encoder = tiny_bert();
        let device = TwinDevice::with_faults(TwinFaults {
            fail_captures: true,
            ..TwinFaults::default()
        });
        let mut direct = runner(&TwinDevice::new(), &encoder, false);
        let mut graphed = runner(&device, &encoder, true);
        // Reserve the largest shape first so that later, smaller shapes keep the buffers.
        let shapes: [&[usize]; 5] = [&[60, 60], &[3], &[20], &[3, 3, 3], &[30, 30, 30]];
        for lengths in shapes {
            for _ in 0..4 {
                let expected = direct.run_packed(batch(lengths)).unwrap().to_vec();
                let got = graphed.run_packed(batch(lengths)).unwrap().to_vec();
                assert_eq!(got, expected, "lengths {lengths:?}");
            }
        }
        assert_eq!(graphed.graphs(), 0);
        assert_eq!(
            device.captures_begun(),
            MAX_CAPTURE_FAILURES,
            "one attempt per shape, then none once the instance gave up"
        );
    }

    #[test]
    fn the_graph_cache_evicts_the_least_recently_used_graph() {
        let encoder = tiny_bert();
        let mut graphed = runner(&TwinDevice::new(), &encoder, true);
        graphed.max_graphs = 2;
        let (a, b, c): (&[usize], &[usize], &[usize]) = (&[50, 50], &[3], &[20]);
        for lengths in [a, a, b, b, a, c, c] {
            graphed.run_packed(batch(lengths)).unwrap();
        }
        let bucket = |lengths: &[usize]| {
            let max = *lengths.iter().max().unwrap();
            Bucket::of(lengths.iter().sum(), lengths.len(), max, false)
        };
        assert!(graphed.graphs.contains_key(&bucket(a)), "used recently");
        assert!(graphed.graphs.contains_key(&bucket(c)), "just captured");
        assert!(
            !graphed.graphs.contains_key(&bucket(b)),
            "least recently used"
        );
    }

    #[test]
    fn a_poisoned_device_takes_the_instance_out_of_service() {
        let encoder = tiny_bert();
        let device = TwinDevice::with_faults(TwinFaults {
            poison_after_ops: Some(5),
            ..TwinFaults::default()
        });
        let mut graphed = runner(&device, &encoder, true);
        assert!(graphed.out_of_service().is_none());
        assert!(graphed.run_packed(batch(&[4])).is_err());
        let reason = graphed.out_of_service().expect("out of service");
        assert!(reason.contains("ILLEGAL_ADDRESS"), "{reason}");
    }
}
