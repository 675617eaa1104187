//! Shared by the benchmarks: start `wisp serve` on a loopback port.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts the release `wisp` over `repo` and returns it with its HTTP address,
/// once startup loading has finished.
#[allow(dead_code)] // each bench uses some of these
pub fn start_wisp(repo: &Path) -> (Child, String) {
    start_wisp_binary(Path::new(env!("CARGO_BIN_EXE_wisp")), repo)
}

/// Starts the release `wisp` over `repo` and returns it with its gRPC address.
#[allow(dead_code)]
pub fn start_wisp_grpc(repo: &Path) -> (Child, String) {
    start_wisp_listening(Path::new(env!("CARGO_BIN_EXE_wisp")), repo, "grpc=")
}

/// Starts the `wisp` binary at `binary` (another build, to compare side by side).
#[allow(dead_code)]
pub fn start_wisp_binary(binary: &Path, repo: &Path) -> (Child, String) {
    start_wisp_listening(binary, repo, "http=")
}

/// Starts `binary` and returns the address its listening line gives after `key`.
fn start_wisp_listening(binary: &Path, repo: &Path, key: &'static str) -> (Child, String) {
    let mut server = Command::new(binary)
        .args([
            "serve",
            "--http-address",
            "127.0.0.1",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
        ])
        // Builds before the gRPC front have no such flag (and no gRPC port to collide on).
        .args(if binary == Path::new(env!("CARGO_BIN_EXE_wisp")) {
            &["--grpc-port", "0"][..]
        } else {
            &[]
        })
        .arg("--model-repository")
        .arg(repo)
        .env("WISP_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting wisp");
    let lines = BufReader::new(server.stderr.take().expect("piped stderr")).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut addr = String::new();
        for line in lines.map_while(Result::ok) {
            if let Some(at) = line.find(key) {
                addr = line[at + key.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
            }
            if line.contains("startup loading finished") {
                let _ = tx.send(addr.clone());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("wisp finished loading");
    (server, addr)
}
