//! `wisp quantize`: post-training INT8 quantization (or BF16 rounding) of a checkpoint
//! folder into a new checkpoint folder that `wisp import` and the encoder backend load like any other
//! (the work is `wisp_backend_encoder::quantize`; this is its command line and report).

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use wisp_backend_encoder::quantize::{self, Method, Options};

#[derive(Args, Debug, Clone)]
pub struct QuantizeArgs {
    /// The f32 (or f16/bf16) checkpoint folder: config.json, model.safetensors,
    /// tokenizer.json.
    pub checkpoint: PathBuf,
    /// The folder to write the quantized checkpoint into (new or empty).
    #[arg(long)]
    pub out: PathBuf,
    /// int8 (weights per output channel, activations as --method says), or bf16 (the
    /// products' weights rounded to BF16; no calibration needed, accuracy still
    /// measured on the held-out texts).
    #[arg(long, default_value = "int8")]
    pub precision: String,
    /// Calibration texts, one per line (default: the corpus shipped with wisp). One in
    /// five is held out to measure accuracy.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Activation ranges: dynamic (each row's own, at run time), or calibrated per
    /// tensor by max, percentile, entropy (TensorRT's) or mse.
    #[arg(long, default_value = "dynamic")]
    pub method: String,
    /// The percentile of |x| that --method percentile keeps.
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f64,
    /// Mean cosine to the f32 model's outputs on the held-out texts to reach; the most
    /// sensitive products stay in f32 until it is met.
    #[arg(long, default_value_t = 0.995)]
    pub target_cosine: f32,
    /// The worst held-out text's cosine to reach.
    #[arg(long, default_value_t = 0.99)]
    pub target_min_cosine: f32,
    /// SmoothQuant's migration strength α (0 turns smoothing off).
    #[arg(long, default_value_t = 0.5)]
    pub smoothquant_alpha: f32,
    /// Calibration texts are cut to this many tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// The tokenizer for the calibration texts (default: CHECKPOINT/tokenizer.json; an
    /// encoder in a model repository has it in its tokenizer model's folder).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    if !matches!(args.precision.as_str(), "int8" | "bf16") {
        bail!("--precision {:?}: choose int8 or bf16", args.precision);
    }
    let method = Method::parse(&args.method, args.percentile).with_context(|| {
        format!(
            "--method {:?}: choose dynamic, max, percentile, entropy or mse",
            args.method
        )
    })?;
    if !(0.0..=100.0).contains(&args.percentile) || args.percentile == 0.0 {
        bail!("--percentile {} must be in (0, 100]", args.percentile);
    }
    if !(0.0..1.0).contains(&args.smoothquant_alpha) && args.smoothquant_alpha != 1.0 {
        bail!(
            "--smoothquant-alpha {} must be in [0, 1]",
            args.smoothquant_alpha
        );
    }
    let text = match &args.calibration {
        Some(file) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the calibration file {}", file.display()))?,
        None => quantize::DEFAULT_CALIBRATION.to_string(),
    };
    let texts = quantize::read_texts(&text);
    let options = Options {
        method,
        smoothquant_alpha: (args.smoothquant_alpha > 0.0).then_some(args.smoothquant_alpha),
        target_mean_cosine: args.target_cosine,
        target_min_cosine: args.target_min_cosine,
        max_tokens: args.max_tokens.max(2),
        tokenizer: args.tokenizer.clone(),
        ..Options::default()
    };
    let mut log = |line: String| eprintln!("{line}");
    let scheme = if args.precision == "bf16" {
        quantize::quantize_bf16(&args.checkpoint, &args.out, &texts, &options, &mut log)?
    } else {
        quantize::quantize(&args.checkpoint, &args.out, &texts, &options, &mut log)?
    };
    let report = &scheme.report;
    println!("{}", serde_json::to_string_pretty(report)?);
    let held_out = &report["held_out"];
    println!(
        "wrote {}: {} products {}/{}, held-out cosine to f32 mean {:.5}, worst {:.5}{}",
        args.out.display(),
        scheme.precision.to_uppercase(),
        scheme.products.len(),
        report["products"]
            .as_array()
            .map_or(scheme.products.len(), Vec::len),
        held_out["mean_cosine"].as_f64().unwrap_or(0.0),
        held_out["min_cosine"].as_f64().unwrap_or(0.0),
        if report["targets_met"] == true {
            ""
        } else {
            " (targets NOT met)"
        }
    );
    Ok(())
}
