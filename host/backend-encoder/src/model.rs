//! The transformer encoder: weights bound to one layout for BERT, DistilBERT and
//! RoBERTa, and a forward pass over a packed batch (all sequences' tokens in one
//! matrix, attention per sequence), so cost follows real tokens.

use super::bf16::{self, Bf16Panels, Bf16Rows};
use super::checkpoint::{Checkpoint, Dimensions, Family, Pooling, Weight};
use super::int8::{self, Epilogue, QuantizedRows};
use super::linear::{dense, matmul_transposed, Threads};
use super::ops::{self, Activation, Segment};
use super::panels::{self, Panels};
use super::quantized::{self, QuantizedLinear, Scheme};
use rayon::prelude::*;
use wisp_core::error::{Error, Result};

/// What the encoder computes on top of the hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    Embedding,
    QuestionAnswering,
    Classification,
    TokenClassification,
}

impl HeadKind {
    pub fn parse(name: &str) -> Option<HeadKind> {
        match name {
            "embedding" => Some(HeadKind::Embedding),
            "qa" | "question_answering" => Some(HeadKind::QuestionAnswering),
            "classification" | "sequence_classification" => Some(HeadKind::Classification),
            "token_classification" | "ner" => Some(HeadKind::TokenClassification),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HeadKind::Embedding => "embedding",
            HeadKind::QuestionAnswering => "qa",
            HeadKind::Classification => "classification",
            HeadKind::TokenClassification => "token_classification",
        }
    }

    /// The head a checkpoint was trained with, from `architectures[0]`.
    pub fn from_architecture(architecture: &str) -> HeadKind {
        if architecture.ends_with("ForQuestionAnswering") {
            HeadKind::QuestionAnswering
        } else if architecture.ends_with("ForSequenceClassification") {
            HeadKind::Classification
        } else if architecture.ends_with("ForTokenClassification") {
            HeadKind::TokenClassification
        } else {
            HeadKind::Embedding
        }
    }

    /// The outputs this head produces.
    pub fn outputs(self) -> &'static [&'static str] {
        match self {
            HeadKind::Embedding => &["embedding"],
            HeadKind::QuestionAnswering => &["start_logits", "end_logits"],
            HeadKind::Classification | HeadKind::TokenClassification => &["logits"],
        }
    }
}

pub enum Head {
    Embedding {
        pooling: Pooling,
        normalize: bool,
    },
    /// `qa_outputs`: [2, hidden] → start and end logits per token.
    QuestionAnswering {
        weight: Weight,
        bias: Weight,
    },
    /// An optional dense + activation on the first token (BERT's pooler, DistilBERT's
    /// pre_classifier, RoBERTa's classifier.dense), then the output projection.
    Classification {
        pre: Option<(Weight, Weight, Activation)>,
        weight: Weight,
        bias: Weight,
    },
    TokenClassification {
        weight: Weight,
        bias: Weight,
    },
}

pub(super) struct Embeddings {
    pub(super) word: Weight,
    pub(super) position: Weight,
    pub(super) token_type: Option<Weight>,
    pub(super) norm: (Weight, Weight),
}

/// The four products of a layer, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Product {
    /// Q, K and V in one product.
    Qkv,
    AttentionOut,
    FfnUp,
    FfnDown,
}

impl Product {
    pub const ALL: [Product; 4] = [
        Product::Qkv,
        Product::AttentionOut,
        Product::FfnUp,
        Product::FfnDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Product::Qkv => "qkv",
            Product::AttentionOut => "attention_out",
            Product::FfnUp => "ffn_up",
            Product::FfnDown => "ffn_down",
        }
    }
}

pub(super) struct Layer {
    /// Q, K and V projections stacked into one [3·hidden, hidden] matrix (a copy made
    /// at load, so one GEMM computes all three). Empty when the product is INT8.
    pub(super) qkv_weight: Vec<f32>,
    pub(super) qkv_bias: Vec<f32>,
    pub(super) out: (Weight, Weight),
    pub(super) attention_norm: (Weight, Weight),
    pub(super) up: (Weight, Weight),
    pub(super) down: (Weight, Weight),
    pub(super) output_norm: (Weight, Weight),
    /// The four products' weights packed for few-row products (`panels`), on CPUs that
    /// run them and models with CPU instances.
    pub(super) packed: Option<LayerPanels>,
    /// Each product's checkpoint names (Q, K, V for the first), in [`Product`] order.
    pub(super) names: [Vec<String>; 4],
    /// Each product's INT8 form, where the checkpoint is quantized ([`Product`] order);
    /// its f32 weight is then absent.
    pub(super) int8: [Option<QuantizedLinear>; 4],
    /// Each product's BF16 form, where the model runs in BF16 ([`Encoder::use_bf16`]);
    /// its f32 weight is then absent.
    pub(super) bf16: [Option<Bf16Panels>; 4],
}

pub(super) struct LayerPanels {
    qkv: Panels,
    out: Panels,
    up: Panels,
    down: Panels,
}

/// Work after a product that an INT8 epilogue does in the same pass.
#[derive(Clone, Copy, Default)]
struct Fused<'a> {
    bias: Option<&'a [f32]>,
    activation: Option<Activation>,
    scale_first: Option<(usize, f32)>,
}

pub struct Encoder {
    pub dims: Dimensions,
    pub(super) embeddings: Embeddings,
    pub(super) layers: Vec<Layer>,
    pub head: Head,
    pub head_kind: HeadKind,
}

/// Tokens of a batch, packed: row t of every activation matrix is token t.
#[derive(Debug, Default)]
pub struct PackedBatch {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub types: Vec<u32>,
    pub segments: Vec<Segment>,
    /// Padded mode only: which tokens are real (may be attended to).
    pub key_valid: Option<Vec<bool>>,
}

impl PackedBatch {
    pub fn clear(&mut self) {
        self.ids.clear();
        self.positions.clear();
        self.types.clear();
        self.segments.clear();
        self.key_valid = None;
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Appends one sequence of token ids (all real, token type 0).
    pub fn push_sequence(&mut self, dims: &Dimensions, ids: &[u32]) {
        let start = self.tokens();
        let mut counter = dims.pad_token_id;
        for (column, &id) in ids.iter().enumerate() {
            self.ids.push(id);
            self.positions.push(dims.position(column, id, &mut counter));
            self.types.push(0);
        }
        self.segments.push(Segment {
            start,
            len: ids.len(),
        });
    }
}

/// Activation buffers, reused across batches (they grow to the largest batch seen),
/// so a forward pass does not allocate per layer.
#[derive(Default)]
pub struct Workspace {
    pub hidden: Vec<f32>,
    qkv: Vec<f32>,
    context: Vec<f32>,
    intermediate: Vec<f32>,
    /// The current INT8 product's quantized input.
    rows: QuantizedRows,
    /// The current BF16 product's rounded input.
    bf16_rows: Bf16Rows,
}

/// Sees each product's input during a forward pass (calibration): layer, product, and
/// the input rows [tokens, k].
pub type Observer<'a> = &'a mut dyn FnMut(usize, Product, &[f32]);

fn grow(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

fn pair(checkpoint: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<(Weight, Weight)> {
    let shape: &[usize] = if cols == 0 { &[rows] } else { &[rows, cols] };
    Ok((
        checkpoint.get(&format!("{name}.weight"), shape)?,
        checkpoint.get(&format!("{name}.bias"), &[rows])?,
    ))
}

fn norm(checkpoint: &Checkpoint, name: &str, width: usize) -> Result<(Weight, Weight)> {
    Ok((
        checkpoint.get_any(
            &[format!("{name}.weight"), format!("{name}.gamma")],
            &[width],
        )?,
        checkpoint.get_any(&[format!("{name}.bias"), format!("{name}.beta")], &[width])?,
    ))
}

/// A product's f32 weight and bias, or its bias and INT8 form (the weight then absent).
fn linear(
    checkpoint: &Checkpoint,
    scheme: Option<&Scheme>,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<((Weight, Weight), Option<QuantizedLinear>)> {
    let names = [name.to_string()];
    match QuantizedLinear::load(checkpoint, scheme, &names, rows, cols)? {
        Some(q) => Ok((
            (
                Weight::absent(&[rows, cols]),
                checkpoint.get(&format!("{name}.bias"), &[rows])?,
            ),
            Some(q),
        )),
        None => Ok((pair(checkpoint, name, rows, cols)?, None)),
    }
}

impl Encoder {
    /// The encoder of a float checkpoint, or of a quantized one with its `scheme`.
    pub fn load(
        dims: Dimensions,
        checkpoint: &Checkpoint,
        scheme: Option<&Scheme>,
        head_kind: HeadKind,
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Encoder> {
        let h = dims.hidden;
        let prefix = checkpoint.base_prefix(dims.family)?;
        let p = |name: &str| format!("{prefix}{name}");
        let embeddings = Embeddings {
            word: checkpoint.get(&p("embeddings.word_embeddings.weight"), &[dims.vocab, h])?,
            position: checkpoint.get(
                &p("embeddings.position_embeddings.weight"),
                &[dims.max_positions, h],
            )?,
            token_type: if dims.type_vocab > 0 {
                Some(checkpoint.get(
                    &p("embeddings.token_type_embeddings.weight"),
                    &[dims.type_vocab, h],
                )?)
            } else {
                None
            },
            norm: norm(checkpoint, &p("embeddings.LayerNorm"), h)?,
        };
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let (q, k, v, out, attention_norm, up, down, output_norm) = match dims.family {
                Family::DistilBert => {
                    let l = p(&format!("transformer.layer.{i}"));
                    (
                        format!("{l}.attention.q_lin"),
                        format!("{l}.attention.k_lin"),
                        format!("{l}.attention.v_lin"),
                        format!("{l}.attention.out_lin"),
                        format!("{l}.sa_layer_norm"),
                        format!("{l}.ffn.lin1"),
                        format!("{l}.ffn.lin2"),
                        format!("{l}.output_layer_norm"),
                    )
                }
                Family::Bert | Family::Roberta => {
                    let l = p(&format!("encoder.layer.{i}"));
                    (
                        format!("{l}.attention.self.query"),
                        format!("{l}.attention.self.key"),
                        format!("{l}.attention.self.value"),
                        format!("{l}.attention.output.dense"),
                        format!("{l}.attention.output.LayerNorm"),
                        format!("{l}.intermediate.dense"),
                        format!("{l}.output.dense"),
                        format!("{l}.output.LayerNorm"),
                    )
                }
            };
            let qkv_names = vec![q.clone(), k.clone(), v.clone()];
            let qkv_int8 = QuantizedLinear::load(checkpoint, scheme, &qkv_names, h, h)?;
            let bias = |name: &str| checkpoint.get(&format!("{name}.bias"), &[h]);
            let (qkv_weight, qkv_bias) = match &qkv_int8 {
                Some(_) => (
                    Vec::new(),
                    [bias(&q)?.data(), bias(&k)?.data(), bias(&v)?.data()].concat(),
                ),
                None => {
                    let (qw, qb) = pair(checkpoint, &q, h, h)?;
                    let (kw, kb) = pair(checkpoint, &k, h, h)?;
                    let (vw, vb) = pair(checkpoint, &v, h, h)?;
                    (
                        [qw.data(), kw.data(), vw.data()].concat(),
                        [qb.data(), kb.data(), vb.data()].concat(),
                    )
                }
            };
            let (out_pair, out_int8) = linear(checkpoint, scheme, &out, h, h)?;
            let (up_pair, up_int8) = linear(checkpoint, scheme, &up, dims.intermediate, h)?;
            let (down_pair, down_int8) = linear(checkpoint, scheme, &down, h, dims.intermediate)?;
            layers.push(Layer {
                qkv_weight,
                qkv_bias,
                out: out_pair,
                attention_norm: norm(checkpoint, &attention_norm, h)?,
                up: up_pair,
                down: down_pair,
                output_norm: norm(checkpoint, &output_norm, h)?,
                packed: None,
                names: [qkv_names, vec![out], vec![up], vec![down]],
                int8: [qkv_int8, out_int8, up_int8, down_int8],
                bf16: Default::default(),
            });
        }
        let head = Self::load_head(&dims, checkpoint, head_kind, pooling, normalize)?;
        Ok(Encoder {
            dims,
            embeddings,
            layers,
            head,
            head_kind,
        })
    }

    fn load_head(
        dims: &Dimensions,
        checkpoint: &Checkpoint,
        kind: HeadKind,
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Head> {
        let h = dims.hidden;
        let labels = |name: &str| -> Result<usize> {
            let key = format!("{name}.weight");
            let rows = checkpoint_rows(checkpoint, &key)?;
            if !dims.labels.is_empty() && dims.labels.len() != rows {
                return Err(Error::invalid(format!(
                    "config.json has {} labels in id2label but tensor '{key}' has {rows} rows",
                    dims.labels.len()
                )));
            }
            Ok(rows)
        };
        Ok(match kind {
            HeadKind::Embedding => Head::Embedding { pooling, normalize },
            HeadKind::QuestionAnswering => {
                let (weight, bias) = pair(checkpoint, "qa_outputs", 2, h)?;
                Head::QuestionAnswering { weight, bias }
            }
            HeadKind::TokenClassification => {
                let n = labels("classifier")?;
                let (weight, bias) = pair(checkpoint, "classifier", n, h)?;
                Head::TokenClassification { weight, bias }
            }
            HeadKind::Classification => match dims.family {
                Family::Bert => {
                    let (pw, pb) = pair(checkpoint, "bert.pooler.dense", h, h)?;
                    let n = labels("classifier")?;
                    let (weight, bias) = pair(checkpoint, "classifier", n, h)?;
                    Head::Classification {
                        pre: Some((pw, pb, Activation::Tanh)),
                        weight,
                        bias,
                    }
                }
                Family::DistilBert => {
                    let (pw, pb) = pair(checkpoint, "pre_classifier", h, h)?;
                    let n = labels("classifier")?;
                    let (weight, bias) = pair(checkpoint, "classifier", n, h)?;
                    Head::Classification {
                        pre: Some((pw, pb, Activation::Relu)),
                        weight,
                        bias,
                    }
                }
                Family::Roberta => {
                    let (pw, pb) = pair(checkpoint, "classifier.dense", h, h)?;
                    let n = labels("classifier.out_proj")?;
                    let (weight, bias) = pair(checkpoint, "classifier.out_proj", n, h)?;
                    Head::Classification {
                        pre: Some((pw, pb, Activation::Tanh)),
                        weight,
                        bias,
                    }
                }
            },
        })
    }

    /// Whether the head L2-normalises its embeddings.
    pub fn normalizes(&self) -> bool {
        matches!(
            self.head,
            Head::Embedding {
                normalize: true,
                ..
            }
        )
    }

    /// How many values the head gives per sequence (classification) or per token.
    pub fn head_width(&self) -> usize {
        match &self.head {
            Head::Embedding { .. } => self.dims.hidden,
            Head::QuestionAnswering { .. } => 2,
            Head::Classification { bias, .. } | Head::TokenClassification { bias, .. } => {
                bias.shape[0]
            }
        }
    }

    /// Packs every layer's weights for few-row products where the CPU runs them
    /// (`panels`); returns the bytes it took (a second copy of the layer weights).
    pub fn pack_for_cpu(&mut self) -> usize {
        if !panels::available() {
            return 0;
        }
        let (h, inter) = (self.dims.hidden, self.dims.intermediate);
        let mut bytes = 0;
        for layer in &mut self.layers {
            if layer.int8.iter().any(Option::is_some) || layer.bf16.iter().any(Option::is_some) {
                // A quantized layer's f32 products are the sensitive few; they run on
                // the GEMM engine.
                continue;
            }
            let packed = LayerPanels {
                qkv: Panels::new(&layer.qkv_weight, 3 * h, h),
                out: Panels::new(layer.out.0.data(), h, h),
                up: Panels::new(layer.up.0.data(), inter, h),
                down: Panels::new(layer.down.0.data(), h, inter),
            };
            bytes +=
                packed.qkv.bytes() + packed.out.bytes() + packed.up.bytes() + packed.down.bytes();
            layer.packed = Some(packed);
        }
        bytes
    }

    /// A product's f32 weight ([n, k], Q, K and V stacked) and n. Empty where the
    /// checkpoint holds the product in INT8 only.
    pub fn product_weight(&self, layer: usize, product: Product) -> (&[f32], usize) {
        let l = &self.layers[layer];
        let (h, inter) = (self.dims.hidden, self.dims.intermediate);
        match product {
            Product::Qkv => (&l.qkv_weight, 3 * h),
            Product::AttentionOut => (l.out.0.data(), h),
            Product::FfnUp => (l.up.0.data(), inter),
            Product::FfnDown => (l.down.0.data(), h),
        }
    }

    /// A product's checkpoint names (Q, K and V for [`Product::Qkv`]).
    pub fn product_names(&self, layer: usize, product: Product) -> &[String] {
        &self.layers[layer].names[product as usize]
    }

    pub fn int8(&self, layer: usize, product: Product) -> Option<&QuantizedLinear> {
        self.layers[layer].int8[product as usize].as_ref()
    }

    /// Sets (or, with `None`, clears) a product's INT8 form, returning the one it had.
    /// Clearing needs the f32 weights (an encoder loaded from a float checkpoint).
    pub fn set_int8(
        &mut self,
        layer: usize,
        product: Product,
        linear: Option<QuantizedLinear>,
    ) -> Option<QuantizedLinear> {
        std::mem::replace(&mut self.layers[layer].int8[product as usize], linear)
    }

    /// Whether any product runs in INT8 (a checkpoint from `wisp quantize`).
    pub fn is_quantized(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.int8.iter().any(Option::is_some))
    }

    /// Whether the products run in BF16 ([`Encoder::use_bf16`]).
    pub fn is_bf16(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.bf16.iter().any(Option::is_some))
    }

    /// "int8" for a quantized checkpoint, "bf16" after [`Encoder::use_bf16`], else "f32".
    pub fn precision(&self) -> &'static str {
        if self.is_quantized() {
            "int8"
        } else if self.is_bf16() {
            "bf16"
        } else {
            "f32"
        }
    }

    /// Runs every layer's four float products in BF16 from now on: their weights
    /// rounded to bf16 and packed (exact for a checkpoint stored in BF16), the f32
    /// copies released. Returns the bytes the BF16 weights take.
    pub fn use_bf16(&mut self) -> usize {
        let (h, inter) = (self.dims.hidden, self.dims.intermediate);
        let mut bytes = 0;
        for layer in &mut self.layers {
            let shapes = [(3 * h, h), (h, h), (inter, h), (h, inter)];
            for (which, (n, k)) in Product::ALL.into_iter().zip(shapes) {
                if layer.int8[which as usize].is_some() {
                    continue;
                }
                let weight = match which {
                    Product::Qkv => std::mem::take(&mut layer.qkv_weight),
                    Product::AttentionOut => layer.out.0.data().to_vec(),
                    Product::FfnUp => layer.up.0.data().to_vec(),
                    Product::FfnDown => layer.down.0.data().to_vec(),
                };
                let panels = Bf16Panels::new(&weight, n, k);
                bytes += panels.bytes();
                layer.bf16[which as usize] = Some(panels);
                match which {
                    Product::Qkv => {}
                    Product::AttentionOut => layer.out.0 = Weight::absent(&[n, k]),
                    Product::FfnUp => layer.up.0 = Weight::absent(&[n, k]),
                    Product::FfnDown => layer.down.0 = Weight::absent(&[n, k]),
                }
            }
            layer.packed = None;
        }
        bytes
    }

    /// Runs the embeddings and every layer over `batch`; the last hidden states are
    /// left in `ws.hidden` ([tokens, hidden]).
    pub fn forward(&self, batch: &PackedBatch, ws: &mut Workspace, threads: Threads) {
        self.forward_observed(batch, ws, threads, None)
    }

    /// [`Encoder::forward`], showing each product's input to `observer`.
    pub fn forward_observed(
        &self,
        batch: &PackedBatch,
        ws: &mut Workspace,
        threads: Threads,
        mut observer: Option<Observer>,
    ) {
        let d = &self.dims;
        let (m, h) = (batch.tokens(), d.hidden);
        let _awake = crate::linear::KeepAwake::start(threads.0);
        let hidden = grow(&mut ws.hidden, m * h);
        self.embed(batch, hidden);
        let scale = 1.0 / ((h / d.heads) as f32).sqrt();
        let isa = int8::Isa::selected();
        // The INT8 input of the next product, and whether the LayerNorm before it already
        // quantized it (in the same pass: `normalize`).
        let rows = std::cell::RefCell::new(&mut ws.rows);
        let ahead = std::cell::Cell::new(false);
        let bf16_rows = &mut ws.bf16_rows;
        let observing = observer.is_some();
        let eps = d.layer_norm_eps;
        // hidden = LN(hidden + bias); when the product that reads it next runs in INT8
        // (and this is not a calibration pass, which observes its input), its input is
        // quantized in the same pass over the rows.
        let normalize = |hidden: &mut [f32],
                         bias: &[f32],
                         (gamma, beta): &(Weight, Weight),
                         next: Option<&QuantizedLinear>| {
            let (gamma, beta) = (gamma.data(), beta.data());
            match next.filter(|_| !observing) {
                Some(q) => {
                    let norm = |row: &mut [f32]| ops::layer_norm_row(row, bias, gamma, beta, eps);
                    rows.borrow_mut()
                        .normalize_and_quantize(isa, hidden, m, &q.panels, &q.input, &norm);
                    ahead.set(true);
                }
                None => ops::add_bias_layer_norm(hidden, h, Some(bias), gamma, beta, eps),
            }
        };
        for (index, layer) in self.layers.iter().enumerate() {
            let mut observe = |product: Product, x: &[f32]| {
                if let Some(observer) = observer.as_mut() {
                    observer(index, product, x)
                }
            };
            // y (+)= x · Wᵀ for one product: INT8 where the checkpoint is quantized, BF16
            // where the model runs in BF16 (their epilogues doing `fused`'s work too;
            // returns true), else f32 (the caller then does that work).
            let mut product = |which: Product,
                               y: &mut [f32],
                               x: &[f32],
                               weight: &[f32],
                               packed: Option<&Panels>,
                               (k, n): (usize, usize),
                               accumulate: bool,
                               fused: Fused|
             -> bool {
                let epilogue = Epilogue {
                    bias: fused.bias,
                    activation: fused.activation,
                    scale_first: fused.scale_first,
                    accumulate,
                };
                if let Some(w) = &layer.bf16[which as usize] {
                    let isa = bf16::Isa::selected();
                    bf16_rows.round(isa, x, m, w);
                    bf16::matmul(isa, y, bf16_rows, w, &epilogue, threads.0);
                    return true;
                }
                match &layer.int8[which as usize] {
                    Some(q) => {
                        let mut rows = rows.borrow_mut();
                        if !ahead.replace(false) {
                            rows.quantize(isa, x, m, &q.panels, &q.input);
                        }
                        int8::matmul(
                            isa,
                            y,
                            &rows,
                            &q.panels,
                            &q.column_scales,
                            &epilogue,
                            threads.0,
                        );
                        true
                    }
                    None => {
                        dense(y, x, weight, packed, m, k, n, accumulate, threads);
                        false
                    }
                }
            };
            let qkv = grow(&mut ws.qkv, m * 3 * h);
            let packed = layer.packed.as_ref();
            observe(Product::Qkv, hidden);
            let qkv_w = &layer.qkv_weight;
            let qkv_p = packed.map(|p| &p.qkv);
            let bias = &layer.qkv_bias;
            let fused = Fused {
                bias: Some(bias),
                activation: None,
                scale_first: Some((h, scale)),
            };
            let qkv_shape = (h, 3 * h);
            let done = product(
                Product::Qkv,
                qkv,
                hidden,
                qkv_w,
                qkv_p,
                qkv_shape,
                false,
                fused,
            );
            if !done {
                qkv.par_chunks_mut(3 * h * 16).for_each(|rows| {
                    for row in rows.chunks_exact_mut(3 * h) {
                        let (q, kv) = row.split_at_mut(h);
                        for (v, b) in q.iter_mut().zip(&bias[..h]) {
                            *v = (*v + b) * scale;
                        }
                        for (v, b) in kv.iter_mut().zip(&bias[h..]) {
                            *v += b;
                        }
                    }
                });
            }
            let context = grow(&mut ws.context, m * h);
            ops::attention(
                context,
                qkv,
                &batch.segments,
                batch.key_valid.as_deref(),
                h,
                d.heads,
            );
            // hidden += context·Woᵀ; hidden = LN(hidden + bo)
            observe(Product::AttentionOut, context);
            let (out_w, out_p) = (layer.out.0.data(), packed.map(|p| &p.out));
            product(
                Product::AttentionOut,
                hidden,
                context,
                out_w,
                out_p,
                (h, h),
                true,
                Fused::default(),
            );
            // The FFN: by blocks of rows when both products are INT8 and the batch is
            // large enough (not while calibrating, which observes the whole intermediate).
            let up_int8 = layer.int8[Product::FfnUp as usize].as_ref();
            let down_int8 = layer.int8[Product::FfnDown as usize].as_ref();
            let by_blocks = up_int8.is_some()
                && down_int8.is_some()
                && !observing
                && m >= 2 * quantized::FFN_BLOCK_ROWS;
            let up_input = up_int8.filter(|_| !by_blocks);
            normalize(hidden, layer.out.1.data(), &layer.attention_norm, up_input);
            match (up_int8, down_int8) {
                (Some(up), Some(down)) if by_blocks => {
                    let up_bias = layer.up.1.data();
                    quantized::feed_forward(isa, hidden, m, up, up_bias, d.activation, down);
                }
                _ => {
                    let inter = grow(&mut ws.intermediate, m * d.intermediate);
                    observe(Product::FfnUp, hidden);
                    let (up_w, up_p) = (layer.up.0.data(), packed.map(|p| &p.up));
                    let fused = Fused {
                        bias: Some(layer.up.1.data()),
                        activation: Some(d.activation),
                        scale_first: None,
                    };
                    let up_shape = (h, d.intermediate);
                    let up = Product::FfnUp;
                    if !product(up, inter, hidden, up_w, up_p, up_shape, false, fused) {
                        let bias = layer.up.1.data();
                        ops::add_bias_activation(inter, d.intermediate, bias, d.activation);
                    }
                    observe(Product::FfnDown, inter);
                    let (down_w, down_p) = (layer.down.0.data(), packed.map(|p| &p.down));
                    let down_shape = (d.intermediate, h);
                    let (down, no_fusion) = (Product::FfnDown, Fused::default());
                    product(
                        down, hidden, inter, down_w, down_p, down_shape, true, no_fusion,
                    );
                }
            }
            let next_qkv = self
                .layers
                .get(index + 1)
                .and_then(|l| l.int8[Product::Qkv as usize].as_ref());
            normalize(hidden, layer.down.1.data(), &layer.output_norm, next_qkv);
        }
    }

    /// The forward pass and the head: embeddings [segments, hidden], classification
    /// logits [segments, labels], or per-token outputs [tokens, width] in `out`.
    pub fn infer(
        &self,
        batch: &PackedBatch,
        ws: &mut Workspace,
        out: &mut Vec<f32>,
        threads: Threads,
    ) {
        self.forward(batch, ws, threads);
        match self.head_kind {
            HeadKind::Embedding => self.pool(batch, ws, out),
            HeadKind::Classification => self.classify(batch, ws, out),
            HeadKind::QuestionAnswering | HeadKind::TokenClassification => {
                self.per_token(batch, ws, out, threads)
            }
        }
    }

    fn embed(&self, batch: &PackedBatch, hidden: &mut [f32]) {
        let h = self.dims.hidden;
        let e = &self.embeddings;
        let (word, position) = (e.word.data(), e.position.data());
        let token_type = e.token_type.as_ref().map(|t| t.data());
        hidden.par_chunks_mut(h).enumerate().for_each(|(t, row)| {
            let w = &word[batch.ids[t] as usize * h..][..h];
            let p = &position[batch.positions[t] as usize * h..][..h];
            for i in 0..h {
                row[i] = w[i] + p[i];
            }
            if let Some(tt) = token_type {
                let r = &tt[batch.types[t] as usize * h..][..h];
                row.iter_mut().zip(r).for_each(|(v, x)| *v += x);
            }
        });
        ops::add_bias_layer_norm(
            hidden,
            h,
            None,
            e.norm.0.data(),
            e.norm.1.data(),
            self.dims.layer_norm_eps,
        );
    }

    /// Sequence-level head on the first token of each segment: [segments, labels].
    pub fn classify(&self, batch: &PackedBatch, ws: &Workspace, out: &mut Vec<f32>) {
        let Head::Classification { pre, weight, bias } = &self.head else {
            return;
        };
        let h = self.dims.hidden;
        let n = bias.shape[0];
        let first: Vec<f32> = batch
            .segments
            .iter()
            .flat_map(|s| ws.hidden[s.start * h..(s.start + 1) * h].iter().copied())
            .collect();
        let b = batch.segments.len();
        let mut x = first;
        if let Some((pw, pb, act)) = pre {
            let mut y = vec![0f32; b * h];
            matmul_transposed(&mut y, &x, pw.data(), b, h, h, false, Threads(1));
            for row in y.chunks_exact_mut(h) {
                for (v, bias) in row.iter_mut().zip(pb.data()) {
                    *v = act.apply(*v + bias);
                }
            }
            x = y;
        }
        out.clear();
        out.resize(b * n, 0.0);
        matmul_transposed(out, &x, weight.data(), b, h, n, false, Threads(1));
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(bias.data()).for_each(|(v, b)| *v += b);
        }
    }

    /// Token-level head (QA start/end, token classification): [tokens, width].
    pub fn per_token(
        &self,
        batch: &PackedBatch,
        ws: &Workspace,
        out: &mut Vec<f32>,
        threads: Threads,
    ) {
        let (weight, bias) = match &self.head {
            Head::QuestionAnswering { weight, bias }
            | Head::TokenClassification { weight, bias } => (weight, bias),
            _ => return,
        };
        let (m, h, n) = (batch.tokens(), self.dims.hidden, bias.shape[0]);
        out.clear();
        out.resize(m * n, 0.0);
        matmul_transposed(
            out,
            &ws.hidden[..m * h],
            weight.data(),
            m,
            h,
            n,
            false,
            threads,
        );
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(bias.data()).for_each(|(v, b)| *v += b);
        }
    }

    /// Sentence embeddings: pooled over each segment's real tokens, optionally
    /// L2-normalised. [segments, hidden].
    pub fn pool(&self, batch: &PackedBatch, ws: &Workspace, out: &mut Vec<f32>) {
        let Head::Embedding { pooling, normalize } = &self.head else {
            return;
        };
        let h = self.dims.hidden;
        out.clear();
        out.resize(batch.segments.len() * h, 0.0);
        let valid = |t: usize| batch.key_valid.as_ref().is_none_or(|v| v[t]);
        for (seg, row) in batch.segments.iter().zip(out.chunks_exact_mut(h)) {
            let tokens = (seg.start..seg.start + seg.len).filter(|&t| valid(t));
            match pooling {
                Pooling::Mean => {
                    let mut count = 0usize;
                    for t in tokens {
                        count += 1;
                        row.iter_mut()
                            .zip(&ws.hidden[t * h..(t + 1) * h])
                            .for_each(|(a, x)| *a += x);
                    }
                    let inv = 1.0 / count.max(1) as f32;
                    row.iter_mut().for_each(|v| *v *= inv);
                }
                Pooling::Max => {
                    row.iter_mut().for_each(|v| *v = f32::MIN);
                    for t in tokens {
                        row.iter_mut()
                            .zip(&ws.hidden[t * h..(t + 1) * h])
                            .for_each(|(a, x)| *a = a.max(*x));
                    }
                }
                Pooling::Cls => {
                    row.copy_from_slice(&ws.hidden[seg.start * h..(seg.start + 1) * h]);
                }
            }
            if *normalize {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
    }
}

fn checkpoint_rows(checkpoint: &Checkpoint, name: &str) -> Result<usize> {
    checkpoint
        .shape(name)
        .and_then(|s| s.first().copied())
        .ok_or_else(|| Error::invalid(format!("the checkpoint has no tensor '{name}'")))
}
