//! The subcommands besides `serve`.

#[cfg(feature = "encoder")]
pub mod gpu;
#[cfg(feature = "encoder")]
pub mod import;
pub mod perf;
pub mod plugin;
#[cfg(feature = "encoder")]
pub mod quantize;
