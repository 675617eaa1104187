//! wisp's serving layer: the repository of models (versions, control modes,
//! reloads), each loaded model with its scheduler (direct, dynamic batching,
//! sequences) and statistics, ensembles, and the Prometheus metrics.

pub mod ensemble;
pub mod metrics;
pub mod model;
pub mod repository;
pub mod scheduler;
