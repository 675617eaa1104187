//! Compiles Triton's gRPC protocol (proto/) into the server's gRPC types and service
//! traits. protox parses the .proto files in Rust, so building wisp needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "grpc")]
    grpc()?;
    Ok(())
}

#[cfg(feature = "grpc")]
fn grpc() -> Result<(), Box<dyn std::error::Error>> {
    use prost::Message;
    let protos = ["proto/grpc_service.proto", "proto/health.proto"];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto"])?;
    // The descriptors at run time too: the gRPC front converts Triton's JSON (model
    // config, statistics, index) into these messages by reflection.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("descriptors.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        // Tensor payloads stay reference-counted slices of the received message.
        .bytes(".")
        // RPCs a service leaves out answer UNIMPLEMENTED (the benchmark's bare echo
        // server implements one).
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
