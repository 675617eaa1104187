//! wisp: an inference server for NLP models, speaking the Open Inference
//! Protocol with Triton's extensions, with models and pre/post-processing as
//! sandboxed WebAssembly components.

pub mod api;
pub mod backend;
pub mod cli;
pub mod error;
pub mod gpu;
pub mod gpu_cli;
pub mod import;
pub mod metrics;
pub mod model;
pub mod perf;
pub mod repository;
pub mod scheduler;
pub mod server;
pub mod tensor;
