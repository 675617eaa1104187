//! The subcommands besides `serve`.

#[cfg(feature = "encoder")]
pub mod gpu;
#[cfg(feature = "encoder")]
pub mod import;
pub mod perf;
#[cfg(feature = "encoder")]
pub mod quantize;
