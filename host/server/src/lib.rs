//! wisp's server: the HTTP and gRPC fronts (Open Inference Protocol with Triton's
//! extensions), the mapping of the core's error kinds to status codes, and
//! `wisp serve`. The other subcommands (`perf`, `import`, `gpu`) live in the
//! binary, outside this library.

pub mod api;
pub mod cli;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod log;
pub mod server;
pub mod trace;
