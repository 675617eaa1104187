//! The subcommands besides `serve`.

pub mod gpu;
pub mod import;
pub mod perf;
