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
}
