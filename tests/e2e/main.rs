//! End-to-end tests: the real `wisp` binary on loopback ports, a real HTTP client.
//! The Wasm components come from scripts/build-plugins.sh.

mod ensemble;
mod grpc;
mod harness;
mod limits;
mod protocol;
mod repository;
mod sandbox;
mod scheduling;
mod sequence;
mod trace;
