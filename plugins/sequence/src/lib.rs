//! Triton's example sequence models as one plugin, chosen by `[parameters]`:
//!
//! - `mode = "add_start"` (default): `simple_sequence` and `simple_dyna_sequence`.
//!   OUTPUT = INPUT + START, computed per request (no state).
//! - `mode = "accumulate"`: `simple_string_dyna_sequence`. OUTPUT is the sum of the
//!   sequence's INPUTs so far; START restarts it, END forgets it. The state lives in this
//!   instance's memory, keyed by CORRID, which is why a sequence stays on one instance.
//! - `add_corrid_at_end = true` (the two dyna models): the END request's OUTPUT also
//!   adds the correlation id (CORRID as UINT64/INT64, or a BYTES id holding an integer).
//!
//! The sequence batcher supplies START, END, READY and CORRID as control inputs.

use std::collections::HashMap;
use wisp_plugin_sdk::{
    export_model, Datatype, Error, Model, ModelInfo, ParameterValue, Request, Response, Tensor,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    AddStart,
    Accumulate,
}

struct Sequences {
    mode: Mode,
    add_corrid_at_end: bool,
    sums: HashMap<Vec<u8>, i32>,
}

fn flag(request: &Request, name: &str) -> Result<bool, Error> {
    Ok(request
        .input(name)?
        .to_vec::<i32>()?
        .first()
        .copied()
        .unwrap_or(0)
        != 0)
}

/// The correlation id as the example models add it: its integer value.
fn corrid_value(request: &Request) -> Result<i64, Error> {
    let corrid = request.input("CORRID")?;
    match corrid.datatype {
        Datatype::Uint64 => Ok(corrid.to_vec::<u64>()?.first().copied().unwrap_or(0) as i64),
        Datatype::Int64 => Ok(corrid.to_vec::<i64>()?.first().copied().unwrap_or(0)),
        _ => {
            let id = corrid.bytes_elements()?.concat();
            let text = String::from_utf8_lossy(&id);
            text.trim().parse::<i64>().map_err(|_| {
                Error::InvalidInput(format!(
                    "this model adds the sequence id to the last OUTPUT, so the id must be an integer; got '{text}'"
                ))
            })
        }
    }
}

impl Model for Sequences {
    fn init(info: ModelInfo) -> Result<Self, Error> {
        let mut mode = Mode::AddStart;
        let mut add_corrid_at_end = false;
        for parameter in &info.parameters {
            match (parameter.name.as_str(), &parameter.value) {
                ("mode", ParameterValue::Text(m)) if m == "add_start" => mode = Mode::AddStart,
                ("mode", ParameterValue::Text(m)) if m == "accumulate" => mode = Mode::Accumulate,
                ("mode", other) => {
                    return Err(Error::InvalidInput(format!(
                        "parameter 'mode' must be \"add_start\" or \"accumulate\", got {other:?}"
                    )))
                }
                ("add_corrid_at_end", ParameterValue::Boolean(b)) => add_corrid_at_end = *b,
                ("add_corrid_at_end", other) => {
                    return Err(Error::InvalidInput(format!(
                        "parameter 'add_corrid_at_end' must be a bool, got {other:?}"
                    )))
                }
                _ => {}
            }
        }
        Ok(Sequences {
            mode,
            add_corrid_at_end,
            sums: HashMap::new(),
        })
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let input = request.input("INPUT")?;
        let value: i32 = input.to_vec::<i32>()?.iter().sum();
        let (start, end, ready) = (
            flag(&request, "START")?,
            flag(&request, "END")?,
            flag(&request, "READY")?,
        );
        let mut out = match self.mode {
            Mode::AddStart if ready => value.wrapping_add(i32::from(start)),
            Mode::AddStart => 0,
            Mode::Accumulate => {
                let id = request.input("CORRID")?.bytes_elements()?.concat();
                let sum = self.sums.entry(id.clone()).or_insert(0);
                if start {
                    *sum = 0;
                }
                if ready {
                    *sum = sum.wrapping_add(value);
                }
                let out = *sum;
                if end {
                    self.sums.remove(&id);
                }
                out
            }
        };
        if end && ready && self.add_corrid_at_end {
            out = out.wrapping_add(corrid_value(&request)? as i32);
        }
        Ok(Response::new().with_output(Tensor::from_slice("OUTPUT", &input.shape, &[out])))
    }
}

export_model!(Sequences);
