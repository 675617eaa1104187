//! wisp's core: what every other crate shares. Tensors, errors (kinds, not
//! transport status codes), the model config schema, the `Backend` trait with
//! the registry that maps a config's `backend` to a factory, and the worker
//! pool every backend runs its instances on.

pub mod backend;
pub mod config;
pub mod config_override;
pub mod error;
pub mod paths;
pub mod tensor;
pub mod trace;
pub mod worker;

pub use error::{Error, ErrorKind, Result};
