//! The encoder on an NVIDIA GPU: fp16 weights and activations with fp32 accumulation,
//! cuBLASLt GEMMs with fused bias/GELU epilogues, wisp's kernels (kernels/*.cu) for
//! embeddings + LayerNorm, residual + LayerNorm, attention and the heads.
//!
//! A batch runs packed, as on the CPU: one token matrix without padding and
//! `seq_start` offsets per sequence. Launch shapes are rounded up to buckets (tokens,
//! sequences, longest sequence), and each bucket's whole forward pass is captured once
//! as a CUDA graph and replayed, so small batches are not dominated by launch costs.
//! Only the head's small fp32 output is copied back.

use super::checkpoint::Pooling;
use super::model::{Encoder, Head, HeadKind, PackedBatch};
use super::ops::Activation;
use super::{pack_request, pad_batch, truncate, unpack, RequestRows};
use crate::backend::{BackendRequest, Execution, ExecutionTimes};
use crate::error::{Error, Result};
use crate::gpu::blas::Epilogue;
use crate::gpu::device::{Buffer, Device, Queue, Replay};
use crate::gpu::kernels::{self, MAX_SEQUENCE, SLACK_ROWS};
use half::f16;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

/// Graphs kept per instance; beyond this the cache starts over (bounded memory).
const MAX_GRAPHS: usize = 96;
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
        let pair = |(w, b): &(super::checkpoint::Weight, super::checkpoint::Weight)| {
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

/// Token counts run in buckets: powers of two up to 4096 (small batches cost about
/// the same at any of these sizes), then multiples of 2048.
fn round_tokens(tokens: usize) -> usize {
    let tokens = tokens.max(16);
    if tokens <= 4096 {
        tokens.next_power_of_two()
    } else {
        tokens.div_ceil(2048) * 2048
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

/// One GPU instance: its stream, cuBLASLt plans, buffers and captured graphs.
pub struct GpuRunner {
    weights: Arc<GpuEncoder>,
    queue: Box<dyn Queue>,
    activations: Option<Activations>,
    graphs: HashMap<Bucket, Box<dyn Replay>>,
    /// Buckets run once directly: the second batch of a bucket is the one captured, so
    /// first-time work (module loading, cuBLASLt heuristics) never happens in a capture.
    seen: HashSet<Bucket>,
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
        let tokens = bucket.tokens.max(old.as_ref().map_or(0, |a| a.tokens));
        let sequences = bucket
            .sequences
            .max(old.as_ref().map_or(0, |a| a.sequences));
        drop(old);
        let gpu = &*self.weights.device;
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
        self.activations = Some(Activations {
            tokens,
            sequences,
            inputs: gpu.alloc(words * 4)?,
            hidden: gpu.alloc(rows * d.hidden * 2)?,
            qkv: gpu.alloc(rows * 3 * d.hidden * 2)?,
            context: gpu.alloc(rows * d.hidden * 2)?,
            projected: gpu.alloc(rows * d.hidden * 2)?,
            intermediate: gpu.alloc(rows * d.intermediate * 2)?,
            output: gpu.alloc(output * 4)?,
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
        q.embed_layernorm(
            a.hidden.ptr,
            (ids, positions, types),
            (
                w.word.ptr,
                w.position.ptr,
                w.token_type.as_ref().map_or(0, |b| b.ptr),
            ),
            (w.embedding_norm.0.ptr, w.embedding_norm.1.ptr),
            t,
            h,
            d.layer_norm_eps,
        )?;
        for layer in &w.layers {
            q.linear(
                a.qkv.ptr,
                a.hidden.ptr,
                layer.qkv.0.ptr,
                layer.qkv.1.ptr,
                (t, 3 * h, h),
                Epilogue::Bias,
            )?;
            q.attention(
                a.context.ptr,
                a.qkv.ptr,
                seq_start,
                key_valid,
                bucket.sequences,
                bucket.max_len,
                h,
                d.heads,
            )?;
            q.linear(
                a.projected.ptr,
                a.context.ptr,
                layer.out.0.ptr,
                layer.out.1.ptr,
                (t, h, h),
                Epilogue::Bias,
            )?;
            q.residual_layernorm(
                a.hidden.ptr,
                a.projected.ptr,
                a.hidden.ptr,
                (layer.attention_norm.0.ptr, layer.attention_norm.1.ptr),
                t,
                h,
                d.layer_norm_eps,
            )?;
            q.linear(
                a.intermediate.ptr,
                a.hidden.ptr,
                layer.up.0.ptr,
                layer.up.1.ptr,
                (t, d.intermediate, h),
                w.up_epilogue,
            )?;
            q.linear(
                a.projected.ptr,
                a.intermediate.ptr,
                layer.down.0.ptr,
                layer.down.1.ptr,
                (t, h, d.intermediate),
                Epilogue::Bias,
            )?;
            q.residual_layernorm(
                a.hidden.ptr,
                a.projected.ptr,
                a.hidden.ptr,
                (layer.output_norm.0.ptr, layer.output_norm.1.ptr),
                t,
                h,
                d.layer_norm_eps,
            )?;
        }
        match &w.head {
            GpuHead::Embedding { mode, normalize } => q.pool_embedding(
                a.output.ptr,
                a.hidden.ptr,
                seq_start,
                key_valid,
                bucket.sequences,
                h,
                *mode,
                *normalize,
            ),
            GpuHead::PerToken {
                weight,
                bias,
                labels,
            } => q.token_head(
                a.output.ptr,
                a.hidden.ptr,
                (weight.ptr, bias.ptr),
                t,
                h,
                *labels,
            ),
            GpuHead::Sequence {
                pre,
                weight,
                bias,
                labels,
            } => q.sequence_head(
                a.output.ptr,
                a.hidden.ptr,
                seq_start,
                pre.as_ref().map(|(w, b, act)| (w.ptr, b.ptr, *act)),
                (weight.ptr, bias.ptr),
                bucket.sequences,
                h,
                *labels,
            ),
        }
    }

    /// Runs the bucket's graph, capturing it the second time the bucket is seen (the
    /// first runs directly). Queues that cannot capture always run directly.
    fn launch(&mut self, bucket: &Bucket) -> Result<()> {
        if !self.use_graphs || self.seen.insert(*bucket) {
            return self.enqueue(bucket);
        }
        if !self.graphs.contains_key(bucket) {
            if self.graphs.len() >= MAX_GRAPHS {
                self.graphs.clear();
                self.seen.clear();
            }
            if !self.queue.begin_capture()? {
                self.use_graphs = false;
                return self.enqueue(bucket);
            }
            let enqueued = self.enqueue(bucket);
            let graph = self.queue.end_capture();
            enqueued?;
            self.graphs.insert(*bucket, graph?);
        }
        self.graphs[bucket].replay()
    }

    /// Runs `self.batch` (already packed) and leaves the head's output in `head_out`.
    fn forward(&mut self) -> Result<()> {
        let (tokens, sequences) = (self.batch.tokens(), self.batch.segments.len());
        let max_len = self.batch.segments.iter().map(|s| s.len).max().unwrap_or(0);
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
        let bucket = Bucket::of(tokens, sequences, max_len, self.batch.key_valid.is_some());
        self.reserve(&bucket)?;
        let batch = &self.batch;
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
            .and_then(|()| self.copy_out());
        if launched.is_err() {
            // Nothing still queued may read the staged inputs the next batch rewrites.
            self.queue.drain();
        }
        launched
    }

    /// Copies the head's output back (waiting for the queue).
    fn copy_out(&mut self) -> Result<()> {
        let (tokens, sequences) = (self.batch.tokens(), self.batch.segments.len());
        let width = self.weights.encoder.head_width();
        let count = match self.weights.head {
            GpuHead::PerToken { .. } => tokens * width,
            _ => sequences * width,
        };
        self.head_out.clear();
        self.head_out.resize(count, 0.0);
        let output = self.activations.as_ref().expect("reserved").output.ptr;
        self.queue.copy_out(&mut self.head_out, output)
    }

    /// Packs, runs and unpacks one batch, as the CPU runner does.
    pub fn run(&mut self, requests: &[BackendRequest]) -> Execution {
        let started = Instant::now();
        self.batch.clear();
        let encoder = self.weights.encoder.clone();
        let mut results: Vec<Option<Result<crate::backend::BackendResponse>>> =
            requests.iter().map(|_| None).collect();
        let mut packed: Vec<(usize, RequestRows)> = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            let mark = (self.batch.tokens(), self.batch.segments.len());
            match pack_request(&encoder, request, &mut self.batch) {
                Ok(rows) => packed.push((i, rows)),
                Err(e) => {
                    truncate(&mut self.batch, mark);
                    results[i] = Some(Err(e));
                }
            }
        }
        if !self.remove_padding {
            pad_batch(&encoder, &mut self.batch);
        }
        let packed_at = Instant::now();
        let outcome = if self.batch.tokens() > 0 {
            self.forward()
        } else {
            Ok(())
        };
        let inferred_at = Instant::now();
        for (i, rows) in packed {
            results[i] = Some(match &outcome {
                Ok(()) => Ok(unpack(
                    &encoder,
                    &self.batch,
                    &self.head_out,
                    &rows,
                    &requests[i].requested_outputs,
                )),
                Err(e) => Err(e.clone()),
            });
        }
        let done = Instant::now();
        Execution {
            results: results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(Error::internal("request was not run"))))
                .collect(),
            times: ExecutionTimes {
                compute_input_ns: (packed_at - started).as_nanos() as u64,
                compute_infer_ns: (inferred_at - packed_at).as_nanos() as u64,
                compute_output_ns: (done - inferred_at).as_nanos() as u64,
            },
        }
    }

    /// For benchmarks and checks: runs an already packed batch and returns the head's
    /// output ([sequences, width] or [tokens, width]).
    pub fn run_packed(&mut self, batch: PackedBatch) -> Result<&[f32]> {
        self.batch = batch;
        self.forward()?;
        Ok(&self.head_out)
    }

    /// Runs one short sequence twice (directly, then captured), so kernels, cuBLASLt
    /// plans and a first graph are ready, and a broken setup fails the load rather than
    /// the first request.
    pub fn warm_up(&mut self) -> Result<()> {
        let d = &self.weights.encoder.dims;
        let len = 8.min(d.max_positions);
        let first_position = if d.family == super::checkpoint::Family::Roberta {
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
            segments: vec![super::ops::Segment { start: 0, len }],
            key_valid: None,
        };
        for _ in 0..2 {
            self.batch = PackedBatch {
                ids: batch.ids.clone(),
                positions: batch.positions.clone(),
                types: batch.types.clone(),
                segments: batch.segments.clone(),
                key_valid: None,
            };
            self.forward()?;
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
}
