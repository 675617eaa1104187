//! Every kernel against its CPU twin on random inputs, on a real GPU (`wisp gpu-check`
//! and the GPU tests). Outputs start as NaN, so an element a kernel forgets to write
//! fails the check.

use super::blas::{Blas, Epilogue};
use super::kernels::{Kernels, SLACK_ROWS};
use super::ops::Op;
use super::{twins, DeviceBuffer, Gpu};
use cudarc::driver::CudaStream;
use half::f16;
use std::sync::Arc;
use wisp_core::error::Result;

/// FP16 tolerance: |gpu − twin| ≤ ATOL + RTOL·|twin|.
const ATOL: f32 = 5e-3;
const RTOL: f32 = 1e-2;

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    /// Why the check could not run (a launch or copy failed).
    pub error: Option<String>,
    pub elements: usize,
    pub max_abs_error: f32,
    pub unwritten: usize,
    pub failures: usize,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.unwritten == 0 && self.failures == 0
    }

    fn failed_to_run(name: String, error: wisp_core::error::Error) -> Check {
        Check {
            name,
            error: Some(error.message),
            elements: 0,
            max_abs_error: 0.0,
            unwritten: 0,
            failures: 0,
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(error) = &self.error {
            return write!(f, "{:<44} FAILED: {error}", self.name);
        }
        write!(
            f,
            "{:<44} {:>8} elements  max |err| {:.2e}  unwritten {}  out of tolerance {}  {}",
            self.name,
            self.elements,
            self.max_abs_error,
            self.unwritten,
            self.failures,
            if self.passed() { "ok" } else { "FAILED" }
        )
    }
}

fn compare(name: String, gpu: &[f32], twin: &[f32]) -> Check {
    let mut check = Check {
        name,
        error: None,
        elements: twin.len(),
        max_abs_error: 0.0,
        unwritten: 0,
        failures: 0,
    };
    for (g, t) in gpu.iter().zip(twin) {
        if g.is_nan() {
            check.unwritten += 1;
            continue;
        }
        let error = (g - t).abs();
        check.max_abs_error = check.max_abs_error.max(error);
        if error > ATOL + RTOL * t.abs() {
            check.failures += 1;
        }
    }
    check
}

struct Inputs {
    rng: fastrand::Rng,
}

impl Inputs {
    fn halves(&mut self, n: usize) -> Vec<f16> {
        (0..n)
            .map(|_| f16::from_f32(self.rng.f32() * 2.0 - 1.0))
            .collect()
    }
}

fn to_f32(values: &[f16]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

fn nan_halves(gpu: &Gpu, stream: &Arc<CudaStream>, n: usize) -> Result<DeviceBuffer> {
    DeviceBuffer::from_slice(gpu, stream, &vec![f16::NAN; n])
}

fn nan_floats(gpu: &Gpu, stream: &Arc<CudaStream>, n: usize) -> Result<DeviceBuffer> {
    DeviceBuffer::from_slice(gpu, stream, &vec![f32::NAN; n])
}

/// A section that could not run to its end is a failed check of its own, so the
/// sections after it still run and report.
fn record_failure(checks: &mut Vec<Check>, name: &str, result: Result<()>) {
    if let Err(e) = result {
        checks.push(Check::failed_to_run(name.to_string(), e));
    }
}

fn seq_starts(lengths: &[usize]) -> Vec<i32> {
    let mut starts = vec![0i32];
    for len in lengths {
        starts.push(starts.last().unwrap() + *len as i32);
    }
    starts
}

/// Runs every check on `gpu`; the caller decides what a failure means.
pub fn run(gpu: &Gpu) -> Result<Vec<Check>> {
    let kernels = Kernels::of_device(gpu)?;
    let stream = gpu.new_stream()?;
    let s = stream.cu_stream();
    let sync = || {
        stream
            .synchronize()
            .map_err(|e| wisp_core::error::Error::internal(format!("kernel failed: {e:?}")))
    };
    let mut inputs = Inputs {
        rng: fastrand::Rng::with_seed(20261126),
    };
    let mut checks = Vec::new();

    // Embedding gather + LayerNorm.
    let result = (|| -> Result<()> {
        for (width, with_types) in [(384usize, true), (768, false)] {
            let (vocab, positions, tokens) = (50usize, 40usize, 37usize);
            let word = inputs.halves(vocab * width);
            let position = inputs.halves(positions * width);
            let types_table = inputs.halves(2 * width);
            let (gamma, beta) = (inputs.halves(width), inputs.halves(width));
            let ids: Vec<u32> = (0..tokens)
                .map(|_| inputs.rng.u32(0..vocab as u32))
                .collect();
            let pos: Vec<u32> = (0..tokens)
                .map(|_| inputs.rng.u32(0..positions as u32))
                .collect();
            let types: Vec<u32> = (0..tokens).map(|_| inputs.rng.u32(0..2)).collect();
            let out = nan_halves(gpu, &stream, tokens * width)?;
            let d = |v: &[f16]| DeviceBuffer::from_slice(gpu, &stream, v);
            let (dw, dp, dt, dg, db) = (
                d(&word)?,
                d(&position)?,
                d(&types_table)?,
                d(&gamma)?,
                d(&beta)?,
            );
            let (di, dpos, dty) = (
                DeviceBuffer::from_slice(gpu, &stream, &ids)?,
                DeviceBuffer::from_slice(gpu, &stream, &pos)?,
                DeviceBuffer::from_slice(gpu, &stream, &types)?,
            );
            kernels.launch(
                s,
                &Op::EmbedLayerNorm {
                    out: out.ptr,
                    ids: di.ptr,
                    positions: dpos.ptr,
                    types: dty.ptr,
                    word: dw.ptr,
                    position: dp.ptr,
                    token_type: if with_types { dt.ptr } else { 0 },
                    gamma: dg.ptr,
                    beta: db.ptr,
                    tokens,
                    width,
                    eps: 1e-12,
                },
            )?;
            sync()?;
            let twin = twins::embed_layernorm(
                &ids,
                &pos,
                &types,
                &word,
                &position,
                with_types.then_some(&types_table[..]),
                (&gamma, &beta),
                width,
                1e-12,
            );
            checks.push(compare(
                format!("embed_layernorm width {width} types {with_types}"),
                &to_f32(&out.to_vec::<f16>(tokens * width)?),
                &to_f32(&twin),
            ));
        }
        Ok(())
    })();
    record_failure(&mut checks, "embed_layernorm", result);

    // Residual + LayerNorm, out of place and in place.
    let result = (|| -> Result<()> {
        for in_place in [false, true] {
            let (width, tokens) = (768usize, 33usize);
            let (x, residual) = (inputs.halves(tokens * width), inputs.halves(tokens * width));
            let (gamma, beta) = (inputs.halves(width), inputs.halves(width));
            let dx = DeviceBuffer::from_slice(gpu, &stream, &x)?;
            let dr = DeviceBuffer::from_slice(gpu, &stream, &residual)?;
            let (dg, db) = (
                DeviceBuffer::from_slice(gpu, &stream, &gamma)?,
                DeviceBuffer::from_slice(gpu, &stream, &beta)?,
            );
            let out = nan_halves(gpu, &stream, tokens * width)?;
            let target = if in_place { dr.ptr } else { out.ptr };
            kernels.launch(
                s,
                &Op::ResidualLayerNorm {
                    out: target,
                    x: dx.ptr,
                    residual: dr.ptr,
                    gamma: dg.ptr,
                    beta: db.ptr,
                    tokens,
                    width,
                    eps: 1e-5,
                },
            )?;
            sync()?;
            let result = if in_place { &dr } else { &out };
            let twin = twins::residual_layernorm(&x, &residual, (&gamma, &beta), width, 1e-5);
            checks.push(compare(
                format!("residual_layernorm in place {in_place}"),
                &to_f32(&result.to_vec::<f16>(tokens * width)?),
                &to_f32(&twin),
            ));
        }
        Ok(())
    })();
    record_failure(&mut checks, "residual_layernorm", result);

    // Attention: every head size, short/odd/long sequences, packed and with padding.
    let cases: [(usize, usize, &[usize], bool); 5] = [
        (384, 12, &[1, 17, 64, 130, 3], false),
        (768, 12, &[128, 5, 77], false),
        (768, 12, &[512, 31], false),
        (512, 4, &[40, 100], false),
        (768, 12, &[9, 48, 48], true),
    ];
    for (hidden, heads, lengths, padded) in cases {
        let name = format!(
            "attention d{} lengths {lengths:?}{}",
            hidden / heads,
            if padded { " padded" } else { "" }
        );
        let starts = seq_starts(lengths);
        let tokens = *starts.last().unwrap() as usize;
        let mut qkv = inputs.halves(tokens * 3 * hidden);
        // The rows past the batch are stale memory in a reused buffer: non-finite
        // values there must not reach any output (0·Inf is NaN).
        let stale = [f16::INFINITY, f16::NEG_INFINITY, f16::NAN];
        qkv.extend((0..SLACK_ROWS * 3 * hidden).map(|i| stale[i % 3]));
        let valid: Option<Vec<u8>> = padded.then(|| {
            (0..tokens)
                .map(|t| u8::from(t == 0 || inputs.rng.f32() < 0.7))
                .collect()
        });
        let result = (|| -> Result<Check> {
            let dq = DeviceBuffer::from_slice(gpu, &stream, &qkv)?;
            let ds = DeviceBuffer::from_slice(gpu, &stream, &starts)?;
            let dv = match &valid {
                Some(v) => Some(DeviceBuffer::from_slice(gpu, &stream, v)?),
                None => None,
            };
            let out = nan_halves(gpu, &stream, (tokens + SLACK_ROWS) * hidden)?;
            let max_len = *lengths.iter().max().unwrap();
            kernels.launch(
                s,
                &Op::Attention {
                    out: out.ptr,
                    qkv: dq.ptr,
                    seq_start: ds.ptr,
                    key_valid: dv.as_ref().map_or(0, |b| b.ptr),
                    sequences: lengths.len(),
                    max_len,
                    hidden,
                    heads,
                },
            )?;
            sync()?;
            let mut twin = vec![f16::ZERO; tokens * hidden];
            twins::attention(&mut twin, &qkv, &starts, valid.as_deref(), hidden, heads);
            Ok(compare(
                name.clone(),
                &to_f32(&out.to_vec::<f16>(tokens * hidden)?),
                &to_f32(&twin),
            ))
        })();
        checks.push(result.unwrap_or_else(|e| Check::failed_to_run(name, e)));
    }

    // Heads.
    let width = 384;
    let lengths = [7usize, 0, 30, 1];
    let starts = seq_starts(&lengths);
    let tokens = *starts.last().unwrap() as usize;
    let hidden = inputs.halves(tokens * width);
    let valid: Vec<u8> = (0..tokens).map(|t| u8::from(t % 3 != 1)).collect();
    let head_inputs = (|| -> Result<_> {
        Ok((
            DeviceBuffer::from_slice(gpu, &stream, &hidden)?,
            DeviceBuffer::from_slice(gpu, &stream, &starts)?,
            DeviceBuffer::from_slice(gpu, &stream, &valid)?,
        ))
    })();
    let head_inputs = || head_inputs.as_ref().map_err(|e| e.clone());
    let result = (|| -> Result<()> {
        let (dh, ds, dv) = head_inputs()?;
        for (mode, name) in [(0, "mean"), (1, "cls"), (2, "max")] {
            for normalize in [false, true] {
                for with_valid in [false, true] {
                    let out = nan_floats(gpu, &stream, lengths.len() * width)?;
                    let valid_ptr = if with_valid { dv.ptr } else { 0 };
                    kernels.launch(
                        s,
                        &Op::PoolEmbedding {
                            out: out.ptr,
                            hidden: dh.ptr,
                            seq_start: ds.ptr,
                            key_valid: valid_ptr,
                            sequences: lengths.len(),
                            width,
                            mode,
                            normalize,
                        },
                    )?;
                    sync()?;
                    let twin = twins::pool_embedding(
                        &hidden,
                        &starts,
                        with_valid.then_some(&valid[..]),
                        width,
                        mode,
                        normalize,
                    );
                    checks.push(compare(
                        format!("pool_embedding {name} normalize {normalize} mask {with_valid}"),
                        &out.to_vec::<f32>(lengths.len() * width)?,
                        &twin,
                    ));
                }
            }
        }
        Ok(())
    })();
    record_failure(&mut checks, "pool_embedding", result);
    let result = (|| -> Result<()> {
        let (dh, _, _) = head_inputs()?;
        for labels in [2usize, 9] {
            let (weight, bias) = (inputs.halves(labels * width), inputs.halves(labels));
            let (dw, db) = (
                DeviceBuffer::from_slice(gpu, &stream, &weight)?,
                DeviceBuffer::from_slice(gpu, &stream, &bias)?,
            );
            let out = nan_floats(gpu, &stream, tokens * labels)?;
            kernels.launch(
                s,
                &Op::TokenHead {
                    out: out.ptr,
                    hidden: dh.ptr,
                    weight: dw.ptr,
                    bias: db.ptr,
                    tokens,
                    width,
                    labels,
                },
            )?;
            sync()?;
            checks.push(compare(
                format!("token_head labels {labels}"),
                &out.to_vec::<f32>(tokens * labels)?,
                &twins::token_head(&hidden, &weight, &bias, width),
            ));
        }
        Ok(())
    })();
    record_failure(&mut checks, "token_head", result);
    let result = (|| -> Result<()> {
        let (dh, ds, _) = head_inputs()?;
        for activation in [None, Some(1), Some(2)] {
            let labels = 3;
            let (pw, pb) = (inputs.halves(width * width), inputs.halves(width));
            let (weight, bias) = (inputs.halves(labels * width), inputs.halves(labels));
            let buffers =
                [&pw, &pb, &weight, &bias].map(|v| DeviceBuffer::from_slice(gpu, &stream, v));
            let [dpw, dpb, dw, db] = buffers;
            let (dpw, dpb, dw, db) = (dpw?, dpb?, dw?, db?);
            let out = nan_floats(gpu, &stream, lengths.len() * labels)?;
            kernels.launch(
                s,
                &Op::SequenceHead {
                    out: out.ptr,
                    hidden: dh.ptr,
                    seq_start: ds.ptr,
                    pre: activation.map(|a| (dpw.ptr, dpb.ptr, a)),
                    weight: dw.ptr,
                    bias: db.ptr,
                    sequences: lengths.len(),
                    width,
                    labels,
                },
            )?;
            sync()?;
            let twin = twins::sequence_head(
                &hidden,
                &starts,
                activation.map(|a| (&pw[..], &pb[..], a)),
                (&weight, &bias),
                width,
            );
            checks.push(compare(
                format!("sequence_head pre-activation {activation:?}"),
                &out.to_vec::<f32>(lengths.len() * labels)?,
                &twin,
            ));
        }

        Ok(())
    })();
    record_failure(&mut checks, "sequence_head", result);

    // cuBLASLt with fused epilogues.
    let result = (|| -> Result<()> {
        let mut blas = Blas::new(gpu, &stream)?;
        for epilogue in [Epilogue::Bias, Epilogue::GeluBias, Epilogue::ReluBias] {
            let (m, n, k) = (37usize, 96usize, 64usize);
            let (x, w, b) = (inputs.halves(m * k), inputs.halves(n * k), inputs.halves(n));
            let (dx, dw, db) = (
                DeviceBuffer::from_slice(gpu, &stream, &x)?,
                DeviceBuffer::from_slice(gpu, &stream, &w)?,
                DeviceBuffer::from_slice(gpu, &stream, &b)?,
            );
            let out = nan_halves(gpu, &stream, m * n)?;
            blas.linear(s, out.ptr, dx.ptr, dw.ptr, db.ptr, (m, n, k), epilogue)?;
            sync()?;
            checks.push(compare(
                format!("cublasLt linear {epilogue:?}"),
                &to_f32(&out.to_vec::<f16>(m * n)?),
                &to_f32(&twins::linear(&x, &w, &b, k, epilogue)),
            ));
        }
        Ok(())
    })();
    record_failure(&mut checks, "cublasLt linear", result);

    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_matches_its_cpu_twin_on_the_gpu() {
        let gpu = match Gpu::open(0) {
            Ok(gpu) => gpu,
            Err(e) => {
                eprintln!("skipped: no GPU here ({e})");
                return;
            }
        };
        let checks = run(&gpu).unwrap_or_else(|e| panic!("{e}"));
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| !c.passed())
            .map(|c| c.to_string())
            .collect();
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }
}
