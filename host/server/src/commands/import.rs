//! `wisp import`: turns a Hugging Face checkpoint folder into model repository
//! entries — a tokenizer plugin model, an encoder model with the checkpoint's head,
//! (for QA) the span-decoding plugin model, and the ensemble that joins them — so
//! serving a fine-tuned model needs no hand-written config.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use wisp_backend_encoder::checkpoint::{Dimensions, Family};
use wisp_backend_encoder::model::HeadKind;

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// The checkpoint folder: config.json, model.safetensors, tokenizer.json
    /// (sentence-transformers' 1_Pooling/ and modules.json are used when present).
    pub checkpoint: PathBuf,
    /// The model repository to write into.
    #[arg(long)]
    pub repository: PathBuf,
    /// Name of the pipeline; its parts are NAME_tokenizer, NAME_encoder (and NAME_decode).
    #[arg(long)]
    pub name: String,
    /// The head to serve: embedding, qa, classification, token_classification (or ner:
    /// entities with character spans), or rerank (a one-label cross-encoder over (query,
    /// document) pairs); default: from `architectures` in config.json.
    #[arg(long)]
    pub head: Option<String>,
    /// Longest tokenized input, special tokens included (default: sentence-transformers'
    /// max_seq_length, else 384 for QA and 512 otherwise, capped by the position table).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Tokens shared by consecutive windows over a long context (QA, default 128) or a long
    /// text (`--long-input mean`, default an eighth of max_length).
    #[arg(long)]
    pub doc_stride: Option<usize>,
    /// Embeddings: what to do with a text longer than max_length: `truncate` it, or embed
    /// overlapping windows of it and average them (`mean`; the pipeline then takes one
    /// text a request, and the encoder batches the windows of concurrent requests).
    #[arg(long, default_value = "truncate", value_parser = ["truncate", "mean"])]
    pub long_input: String,
    /// Largest batch the encoder runs at once.
    #[arg(long, default_value_t = 64)]
    pub max_batch_size: u32,
    /// Encoder instances (each gets its share of the cores).
    #[arg(long, default_value_t = 1)]
    pub instances: u32,
    /// Folder with the built plugin components (wisp_plugin_tokenizer.wasm,
    /// wisp_plugin_qa_decode.wasm, wisp_plugin_ner_decode.wasm); default: target/wasm32-wasip2/plugin beside the binary.
    #[arg(long, env = "WISP_COMPONENTS")]
    pub components: Option<PathBuf>,
    /// Replace existing models of the same names.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ImportArgs) -> Result<()> {
    let plan = Plan::new(&args)?;
    plan.write(&args)?;
    for (name, _) in &plan.models {
        println!("wrote {}", args.repository.join(name).display());
    }
    Ok(())
}

/// Everything `import` writes: (model name, config.toml text) plus the files to copy.
pub struct Plan {
    pub models: Vec<(String, String)>,
    copies: Vec<(PathBuf, PathBuf)>,
}

fn components_dir(args: &ImportArgs) -> Result<PathBuf> {
    if let Some(dir) = &args.components {
        return Ok(dir.clone());
    }
    let exe = std::env::current_exe().context("cannot find the wisp binary's folder")?;
    Ok(exe
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("wasm32-wasip2/plugin"))
        .unwrap_or_default())
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Plan {
    pub fn new(args: &ImportArgs) -> Result<Plan> {
        let src = &args.checkpoint;
        let dims = Dimensions::read(src).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        for file in ["model.safetensors", "tokenizer.json"] {
            if !src.join(file).is_file() {
                bail!("{} has no {file}", src.display());
            }
        }
        if !args
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            bail!(
                "--name '{}' may hold only letters, digits, '_' and '-'",
                args.name
            );
        }
        // A reranker is a cross-encoder: one logit per (query, document) pair.
        let rerank = args.head.as_deref() == Some("rerank");
        let head = match &args.head {
            Some(_) if rerank => HeadKind::Classification,
            Some(h) => HeadKind::parse(h).with_context(|| {
                format!("--head '{h}' is not one of embedding, qa, classification, token_classification, rerank")
            })?,
            None => HeadKind::from_architecture(&dims.architecture),
        };
        if rerank && dims.labels.len() > 1 {
            bail!(
                "--head rerank needs a cross-encoder with one label (a relevance logit); {} has {}",
                src.display(),
                dims.labels.len()
            );
        }
        let position_limit = match dims.family {
            Family::Roberta => dims
                .max_positions
                .saturating_sub(dims.pad_token_id as usize + 1),
            _ => dims.max_positions,
        };
        let st_length = read_json(&src.join("sentence_bert_config.json"))
            .and_then(|c| c.get("max_seq_length")?.as_u64())
            .map(|v| v as usize);
        let default_length = match head {
            HeadKind::QuestionAnswering => 384,
            _ => st_length.unwrap_or(512),
        };
        let max_length = args
            .max_length
            .unwrap_or(default_length)
            .min(position_limit);
        let windows = args.long_input == "mean";
        if windows && head != HeadKind::Embedding {
            bail!(
                "--long-input mean is for embedding pipelines; this is {}",
                head.as_str()
            );
        }
        let doc_stride = args
            .doc_stride
            .unwrap_or(if windows { max_length / 8 } else { 128 });
        if (head == HeadKind::QuestionAnswering || windows) && doc_stride >= max_length / 2 {
            bail!("--doc-stride {doc_stride} must be below half of max_length {max_length}");
        }
        let components = components_dir(args)?;
        let component = |file: &str| -> Result<PathBuf> {
            let path = components.join(file);
            if !path.is_file() {
                bail!(
                    "component {} not found; build the plugins (scripts/build-plugins.sh) or pass --components",
                    path.display()
                );
            }
            Ok(path)
        };

        let name = &args.name;
        let tokenizer = format!("{name}_tokenizer");
        let encoder = format!("{name}_encoder");
        let decode = format!("{name}_decode");
        let source = src.display().to_string();
        let header = |what: &str| {
            format!(
                "# {what}\n# Generated by `wisp import` from {}.\n",
                source.replace('\n', " ")
            )
        };
        let labels = if dims.labels.is_empty() {
            String::new()
        } else {
            format!(
                "labels = [{}]\n",
                dims.labels
                    .iter()
                    .map(|l| toml_string(l))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let num_labels = dims.labels.len().max(1);
        let has_types = dims.type_vocab > 0;
        let qa = head == HeadKind::QuestionAnswering;
        let ner = head == HeadKind::TokenClassification;
        let mut copies = Vec::new();

        // The tokenizer plugin.
        let mut t = header("Tokenizer (Wasm plugin, Hugging Face tokenizers).");
        t += "backend = \"wasm\"\n";
        if qa {
            t += "max_batch_size = 0\n\n";
            t += &tensor("input", "QUESTION", "BYTES", "[-1]", "");
            t += &tensor("input", "CONTEXT", "BYTES", "[-1]", "");
            for out in ["input_ids", "attention_mask", "token_type_ids"] {
                t += &tensor("output", out, "INT64", "[-1, -1]", "");
            }
            t += &tensor("output", "offsets", "INT64", "[-1, -1, 2]", "");
            t += &tensor("output", "window_owner", "INT64", "[-1]", "");
        } else {
            let _ = writeln!(t, "max_batch_size = {}\n", args.max_batch_size);
            t += &tensor("input", "TEXT", "BYTES", "[1]", "");
            if rerank {
                t += &tensor("input", "TEXT_PAIR", "BYTES", "[1]", "");
            }
            for out in ["input_ids", "attention_mask", "token_type_ids"] {
                t += &tensor("output", out, "INT64", "[-1]", "");
            }
            if ner {
                t += &tensor("output", "offsets", "INT64", "[-1, 2]", "");
                t += &tensor("output", "word_ids", "INT64", "[-1]", "");
            }
            if windows {
                t += &tensor("output", "window_owner", "INT64", "[1]", "");
            } else if head == HeadKind::Embedding {
                // For a pipeline that sends only texts past max_length down a windowed path.
                t += "# Whether each text lost tokens past max_length (given when asked for).\n";
                t += &tensor("output", "truncated", "BOOL", "[1]", "");
            }
        }
        t += "[[instance_group]]\ncount = 2\n\n[parameters]\n";
        let mode = match (qa, rerank) {
            (true, _) => "qa",
            (_, true) => "pair",
            _ => "single",
        };
        let _ = writeln!(t, "mode = \"{mode}\"");
        let _ = writeln!(t, "max_length = {max_length}");
        if ner {
            t += "spans = true\n";
        }
        if windows {
            t += "long_input = \"mean\"\n";
        }
        if qa || windows {
            // A request's windows must fit one encoder batch.
            let _ = writeln!(t, "doc_stride = {doc_stride}");
            let _ = writeln!(t, "max_windows = {}", args.max_batch_size);
        }
        copies.push((
            src.join("tokenizer.json"),
            format!("{tokenizer}/1/tokenizer.json").into(),
        ));
        copies.push((
            component("wisp_plugin_tokenizer.wasm")?,
            format!("{tokenizer}/1/model.wasm").into(),
        ));

        // The encoder.
        let mut e = header(&format!(
            "{} encoder ({}), {} head, run natively by wisp.",
            dims.family.as_str(),
            if dims.architecture.is_empty() {
                "no architectures entry"
            } else {
                &dims.architecture
            },
            head.as_str()
        ));
        e += "backend = \"encoder\"\n";
        let _ = writeln!(e, "max_batch_size = {}\n", args.max_batch_size);
        e += &tensor("input", "input_ids", "INT64", "[-1]", "");
        e += &tensor(
            "input",
            "attention_mask",
            "INT64",
            "[-1]",
            "optional = true\n",
        );
        if has_types {
            e += &tensor(
                "input",
                "token_type_ids",
                "INT64",
                "[-1]",
                "optional = true\n",
            );
        }
        if head == HeadKind::Embedding {
            // A tokenizer with long_input = "mean" sends a long text as windows.
            e += "# Long texts as windows (tokenizer long_input = \"mean\"): rows of one owner are averaged.\n";
            e += &tensor("input", "window_owner", "INT64", "[1]", "optional = true\n");
        }
        match head {
            HeadKind::Embedding => {
                e += &tensor(
                    "output",
                    "embedding",
                    "FP32",
                    &format!("[{}]", dims.hidden),
                    "",
                )
            }
            HeadKind::QuestionAnswering => {
                e += &tensor("output", "start_logits", "FP32", "[-1]", "");
                e += &tensor("output", "end_logits", "FP32", "[-1]", "");
            }
            HeadKind::Classification => {
                e += &tensor(
                    "output",
                    "logits",
                    "FP32",
                    &format!("[{num_labels}]"),
                    &labels,
                )
            }
            HeadKind::TokenClassification => {
                e += &tensor(
                    "output",
                    "logits",
                    "FP32",
                    &format!("[-1, {num_labels}]"),
                    &labels,
                )
            }
        }
        // Eager dispatch: a free instance takes what is queued at once (no request waits
        // for a batch while an instance idles); batches form while the instances are
        // busy. A few batches of backlog per instance absorb bursts; past it the encoder
        // answers 503 at once. Under a sustained overload, what would wait longer than
        // SHED_WAIT_US is refused at once, since a standing queue only turns into latency
        // and client timeouts.
        let _ = writeln!(
            e,
            "[[instance_group]]\ncount = {}\nkind = \"cpu\"\n\n[dynamic_batching]\ndispatch = \"eager\"\n\
             # Past {} ms of sustained overload, requests that would wait longer than\n\
             # max_expected_wait_us are refused at once (503); shorter bursts queue.\n\
             overload_window_us = {}\n\n\
             [dynamic_batching.default_queue_policy]\nmax_queue_size = {}\nmax_expected_wait_us = {}\n\n\
             [parameters]\nhead = \"{}\"",
            args.instances,
            OVERLOAD_WINDOW_US / 1000,
            OVERLOAD_WINDOW_US,
            queue_size(args.max_batch_size, args.instances),
            SHED_WAIT_US,
            head.as_str()
        );
        // A checkpoint from `wisp quantize` runs in the precision it was written for;
        // saying so in the config makes it visible (and, for INT8, a float checkpoint put
        // there later an error).
        let scheme = wisp_backend_encoder::quantized::Scheme::read(src)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        if let Some(scheme) = scheme {
            let _ = writeln!(e, "precision = \"{}\"", scheme.precision);
        }
        for file in [
            "config.json",
            "model.safetensors",
            "modules.json",
            "sentence_bert_config.json",
            wisp_backend_encoder::quantized::SCHEME_FILE,
        ] {
            if src.join(file).is_file() {
                copies.push((src.join(file), format!("{encoder}/1/{file}").into()));
            }
        }
        if let Ok(entries) = std::fs::read_dir(src) {
            for entry in entries.flatten() {
                let path = entry.path();
                let file_name = entry.file_name().to_string_lossy().to_string();
                if path.join("config.json").is_file() && file_name.ends_with("_Pooling") {
                    copies.push((
                        path.join("config.json"),
                        format!("{encoder}/1/{file_name}/config.json").into(),
                    ));
                }
            }
        }

        let mut models = vec![(tokenizer.clone(), t), (encoder.clone(), e)];

        // The pipeline.
        let mut p = header(&format!(
            "The {} pipeline: {tokenizer} → {encoder}{}.",
            head.as_str(),
            if qa || ner {
                format!(" → {decode}")
            } else {
                String::new()
            }
        ));
        p += "backend = \"ensemble\"\n";
        let token_map = if has_types {
            "{ input_ids = \"input_ids\", attention_mask = \"attention_mask\", token_type_ids = \"token_type_ids\" }"
        } else {
            "{ input_ids = \"input_ids\", attention_mask = \"attention_mask\" }"
        };
        if qa {
            p += "max_batch_size = 0\n\n";
            p += &tensor("input", "QUESTION", "BYTES", "[-1]", "");
            p += &tensor("input", "CONTEXT", "BYTES", "[-1]", "");
            p += &tensor("output", "ANSWER", "BYTES", "[-1, -1]", "");
            p += &tensor("output", "SCORE", "FP32", "[-1, -1]", "");
            p += &tensor("output", "ANSWER_START", "INT64", "[-1, -1]", "");
            p += &tensor("output", "ANSWER_END", "INT64", "[-1, -1]", "");
            let _ = writeln!(p, "[[step]]\nmodel = \"{tokenizer}\"\ninput_map = {{ QUESTION = \"QUESTION\", CONTEXT = \"CONTEXT\" }}\noutput_map = {{ input_ids = \"input_ids\", attention_mask = \"attention_mask\", token_type_ids = \"token_type_ids\", offsets = \"offsets\", window_owner = \"window_owner\" }}\n");
            let _ = writeln!(p, "[[step]]\nmodel = \"{encoder}\"\ninput_map = {token_map}\noutput_map = {{ start_logits = \"start_logits\", end_logits = \"end_logits\" }}\n");
            let _ = writeln!(p, "[[step]]\nmodel = \"{decode}\"\ninput_map = {{ start_logits = \"start_logits\", end_logits = \"end_logits\", offsets = \"offsets\", window_owner = \"window_owner\", CONTEXT = \"CONTEXT\" }}\noutput_map = {{ ANSWER = \"ANSWER\", SCORE = \"SCORE\", ANSWER_START = \"ANSWER_START\", ANSWER_END = \"ANSWER_END\" }}");

            let mut d = header("Extractive QA span decoding (Wasm plugin).");
            d += "backend = \"wasm\"\nmax_batch_size = 0\n\n";
            d += &tensor("input", "start_logits", "FP32", "[-1, -1]", "");
            d += &tensor("input", "end_logits", "FP32", "[-1, -1]", "");
            d += &tensor("input", "offsets", "INT64", "[-1, -1, 2]", "");
            d += &tensor("input", "window_owner", "INT64", "[-1]", "");
            d += &tensor("input", "CONTEXT", "BYTES", "[-1]", "");
            d += &tensor("output", "ANSWER", "BYTES", "[-1, -1]", "");
            d += &tensor("output", "SCORE", "FP32", "[-1, -1]", "");
            d += &tensor("output", "ANSWER_START", "INT64", "[-1, -1]", "");
            d += &tensor("output", "ANSWER_END", "INT64", "[-1, -1]", "");
            d += "[[instance_group]]\ncount = 2\n\n[parameters]\ntop_k = 1\nmax_answer_length = 30\nhandle_impossible_answer = false\n";
            copies.push((
                component("wisp_plugin_qa_decode.wasm")?,
                format!("{decode}/1/model.wasm").into(),
            ));
            models.push((decode, d));
        } else if rerank {
            // (query, document) → the cross-encoder's relevance logit; /v1/rerank sorts
            // by its sigmoid.
            let _ = writeln!(p, "max_batch_size = {}\n", args.max_batch_size);
            p += &tensor("input", "QUERY", "BYTES", "[1]", "");
            p += &tensor("input", "DOCUMENT", "BYTES", "[1]", "");
            p += &tensor("output", "SCORE", "FP32", "[1]", "");
            p += "# Each pair's tokens (1 per token), for the token counts of /v1/rerank.\n";
            p += &tensor("output", "attention_mask", "INT64", "[-1]", "");
            let _ = writeln!(p, "[[step]]\nmodel = \"{tokenizer}\"\ninput_map = {{ TEXT = \"QUERY\", TEXT_PAIR = \"DOCUMENT\" }}\noutput_map = {token_map}\n");
            let _ = writeln!(p, "[[step]]\nmodel = \"{encoder}\"\ninput_map = {token_map}\noutput_map = {{ logits = \"SCORE\" }}");
        } else if ner {
            // Per-token logits → entities with character spans.
            let _ = writeln!(p, "max_batch_size = {}\n", args.max_batch_size);
            p += &tensor("input", "TEXT", "BYTES", "[1]", "");
            p += "# Each text's entities, a JSON array (transformers' token-classification output).\n";
            p += &tensor("output", "ENTITIES", "BYTES", "[1]", "");
            p += &tensor(
                "output",
                "LOGITS",
                "FP32",
                &format!("[-1, {num_labels}]"),
                &labels,
            );
            let spans = format!(
                "{}, offsets = \"offsets\", word_ids = \"word_ids\" }}",
                token_map.trim_end_matches(" }")
            );
            let _ = writeln!(p, "[[step]]\nmodel = \"{tokenizer}\"\ninput_map = {{ TEXT = \"TEXT\" }}\noutput_map = {spans}\n");
            let _ = writeln!(p, "[[step]]\nmodel = \"{encoder}\"\ninput_map = {token_map}\noutput_map = {{ logits = \"LOGITS\" }}\n");
            let _ = writeln!(p, "[[step]]\nmodel = \"{decode}\"\ninput_map = {{ logits = \"LOGITS\", offsets = \"offsets\", word_ids = \"word_ids\", TEXT = \"TEXT\" }}\noutput_map = {{ ENTITIES = \"ENTITIES\" }}");

            let mut d = header("Token classification to entities (Wasm plugin): labels from config.json's id2label.");
            let _ = writeln!(
                d,
                "backend = \"wasm\"\nmax_batch_size = {}\n",
                args.max_batch_size
            );
            d += &tensor(
                "input",
                "logits",
                "FP32",
                &format!("[-1, {num_labels}]"),
                "",
            );
            d += &tensor("input", "offsets", "INT64", "[-1, 2]", "");
            d += &tensor("input", "word_ids", "INT64", "[-1]", "");
            d += &tensor("input", "TEXT", "BYTES", "[1]", "");
            d += &tensor("output", "ENTITIES", "BYTES", "[1]", "");
            d += "[[instance_group]]\ncount = 2\n\n[parameters]\n# none, simple, first, average or max; a request may choose its own.\naggregation_strategy = \"simple\"\nignore_labels = \"O\"\n";
            copies.push((
                component("wisp_plugin_ner_decode.wasm")?,
                format!("{decode}/1/model.wasm").into(),
            ));
            copies.push((
                src.join("config.json"),
                format!("{decode}/1/config.json").into(),
            ));
            models.push((decode, d));
        } else {
            // By windows, one text a request: its windows fill the encoder's batches.
            let pipeline_batch = if windows { 1 } else { args.max_batch_size };
            let _ = writeln!(p, "max_batch_size = {pipeline_batch}\n");
            p += &tensor("input", "TEXT", "BYTES", "[1]", "");
            let (out, pipeline_out, dims_text) = match head {
                HeadKind::Embedding => ("embedding", "EMBEDDING", format!("[{}]", dims.hidden)),
                HeadKind::Classification => ("logits", "LOGITS", format!("[{num_labels}]")),
                _ => ("logits", "LOGITS", format!("[-1, {num_labels}]")),
            };
            p += &tensor("output", pipeline_out, "FP32", &dims_text, &labels);
            if head == HeadKind::Embedding {
                // Each text's tokens: the count /v1/embeddings reports in `usage`.
                p +=
                    "# Each text's tokens (1 per token), for the token counts of /v1/embeddings.\n";
                p += &tensor("output", "attention_mask", "INT64", "[-1]", "");
            }
            let token_map = if windows {
                format!(
                    "{}, window_owner = \"window_owner\" }}",
                    token_map.trim_end_matches(" }")
                )
            } else {
                token_map.to_string()
            };
            let _ = writeln!(p, "[[step]]\nmodel = \"{tokenizer}\"\ninput_map = {{ TEXT = \"TEXT\" }}\noutput_map = {token_map}\n");
            let _ = writeln!(p, "[[step]]\nmodel = \"{encoder}\"\ninput_map = {token_map}\noutput_map = {{ {out} = \"{pipeline_out}\" }}");
        }
        models.push((name.clone(), p));
        Ok(Plan { models, copies })
    }

    fn write(&self, args: &ImportArgs) -> Result<()> {
        let repo = &args.repository;
        for (name, _) in &self.models {
            let dir = repo.join(name);
            if dir.exists() {
                if !args.force {
                    bail!("{} exists; pass --force to replace it", dir.display());
                }
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("cannot remove {}", dir.display()))?;
            }
        }
        for (name, config) in &self.models {
            let dir = repo.join(name);
            std::fs::create_dir_all(dir.join("1"))
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::write(dir.join("config.toml"), config)
                .with_context(|| format!("cannot write {}/config.toml", dir.display()))?;
        }
        for (from, to) in &self.copies {
            let to = repo.join(to);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // A hard link shares the (large) weights file; copy across file systems.
            if std::fs::hard_link(from, &to).is_err() {
                std::fs::copy(from, &to).with_context(|| {
                    format!("cannot copy {} to {}", from.display(), to.display())
                })?;
            }
        }
        Ok(())
    }
}

fn tensor(kind: &str, name: &str, datatype: &str, dims: &str, extra: &str) -> String {
    format!("[[{kind}]]\nname = \"{name}\"\ndatatype = \"{datatype}\"\ndims = {dims}\n{extra}\n")
}

/// The encoder's wait bound under sustained overload (`max_expected_wait_us`) and how
/// long an overload lasts before it applies (`overload_window_us`), written by import.
/// At 2x a CPU's peak they kept the p99 of admitted embeddings near the p99 at 80 % of
/// peak, and at 80 % they refused nothing (bench/soak.sh, docs/MEASUREMENTS.md).
const SHED_WAIT_US: u64 = 50_000;
const OVERLOAD_WINDOW_US: u64 = 150_000;

/// The encoder's queue bound written by import: two full batches per instance. Under
/// overload every accepted request waits behind a full queue, so it is kept short
/// (four batches kept requests 4 s in line at 2x a CPU's peak); one batch refused
/// bursts at 80% of peak (bench/soak.sh, docs/MEASUREMENTS.md).
fn queue_size(max_batch_size: u32, instances: u32) -> u32 {
    (2 * max_batch_size.max(1)).saturating_mul(instances.max(1))
}
