//! Triton's `simple_sequence` as a plugin: an accumulator per sequence.
//! OUTPUT is the sum of the sequence's INPUTs so far; START resets it, END
//! forgets it. The sequence batcher supplies START, END, READY and CORRID; the
//! state lives in this instance's memory, keyed by CORRID, which is why a
//! sequence stays on one instance.

use std::collections::HashMap;
use wisp_plugin_sdk::{export_model, Error, Model, ModelInfo, Request, Response, Tensor};

struct Accumulator {
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

impl Model for Accumulator {
    fn init(_info: ModelInfo) -> Result<Self, Error> {
        Ok(Accumulator {
            sums: HashMap::new(),
        })
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let input = request.input("INPUT")?;
        let value: i32 = input.to_vec::<i32>()?.iter().sum();
        let id = request.input("CORRID")?.bytes_elements()?.concat();
        let (start, end, ready) = (
            flag(&request, "START")?,
            flag(&request, "END")?,
            flag(&request, "READY")?,
        );
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
        Ok(Response::new().with_output(Tensor::from_slice("OUTPUT", &input.shape, &[out])))
    }
}

export_model!(Accumulator);
