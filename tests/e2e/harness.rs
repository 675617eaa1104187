//! Starts the real `wisp` binary on loopback ports over a scratch model
//! repository, and talks to it with a real HTTP client.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A component built by scripts/build-plugins.sh.
pub fn component(name: &str) -> PathBuf {
    let path = workspace_root()
        .join("tests/components")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-plugins.sh (the README's test command does)",
        path.display()
    );
    path
}

/// The config of the default repository's `simple` (Triton's example shape).
pub fn simple_config() -> String {
    std::fs::read_to_string(workspace_root().join("model_repository/simple/config.toml")).unwrap()
}

/// A scratch model repository in a temporary folder.
pub struct TestRepo {
    pub dir: tempfile::TempDir,
}

impl TestRepo {
    pub fn new() -> Self {
        TestRepo {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name/config.toml` and `name/<v>/model.wasm` for each version.
    pub fn add(&self, name: &str, config: &str, component_name: &str, versions: &[u64]) -> &Self {
        let dir = self.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), config).unwrap();
        for v in versions {
            self.add_version(name, component_name, *v);
        }
        self
    }

    pub fn add_version(&self, name: &str, component_name: &str, version: u64) {
        let vdir = self.path().join(name).join(version.to_string());
        std::fs::create_dir_all(&vdir).unwrap();
        std::fs::copy(component(component_name), vdir.join("model.wasm")).unwrap();
    }

    pub fn simple(&self) -> &Self {
        self.add("simple", &simple_config(), "wisp_plugin_simple", &[1])
    }

    /// `simple` on BYTES holding decimal strings.
    pub fn simple_string(&self) -> &Self {
        let config = std::fs::read_to_string(
            workspace_root().join("model_repository/simple_string/config.toml"),
        )
        .unwrap();
        self.add("simple_string", &config, "wisp_plugin_simple_string", &[1])
    }

    pub fn write_config(&self, name: &str, config: &str) {
        std::fs::write(self.path().join(name).join("config.toml"), config).unwrap();
    }
}

pub struct Server {
    child: Child,
    pub base: String,
    pub metrics: String,
    /// host:port of the gRPC port ("off" when started with --allow-grpc false).
    pub grpc: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `wisp serve` on free ports and waits until it is ready.
    pub fn start(repo: &Path, extra: &[&str]) -> Server {
        let server = Self::start_listening(repo, extra);
        server.wait_loaded(Duration::from_secs(60));
        server
    }

    /// Starts `wisp serve` and returns once it listens, models still loading.
    pub fn start_listening(repo: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wisp"))
            .args(["serve", "--model-repository"])
            .arg(repo)
            .args([
                "--http-address",
                "127.0.0.1",
                "--http-port",
                "0",
                "--metrics-port",
                "0",
                "--grpc-port",
                "0",
            ])
            .args(extra)
            .env("WISP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting wisp");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("wisp listening") {
                    let _ = tx.send(line.clone());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("wisp did not start: {}", log.lock().unwrap()));
        let field = |key: &str| -> String {
            let start = line.find(&format!("{key}=")).unwrap() + key.len() + 1;
            line[start..].split_whitespace().next().unwrap().to_string()
        };
        let server = Server {
            base: format!("http://{}", field("http")),
            metrics: format!("http://{}/metrics", field("metrics")),
            grpc: field("grpc"),
            child,
            log,
        };
        server
    }

    /// Waits until startup loading finished (ready or not: broken models are a test case).
    pub fn wait_loaded(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains("startup loading finished") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("wisp never finished loading: {}", self.log());
    }

    /// host:port of the HTTP port.
    pub fn http_addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// host:port of the metrics port.
    pub fn metrics_addr(&self) -> String {
        self.metrics
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn get(&self, path: &str) -> Reply {
        Reply::from(ureq::get(&self.url(path)).call())
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Reply {
        Reply::from(ureq::post(&self.url(path)).send_json(body.clone()))
    }

    pub fn post_bytes(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut req = ureq::post(&self.url(path));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        Reply::from(req.send_bytes(body))
    }

    pub fn infer(&self, model: &str, body: &Value) -> Reply {
        self.post_json(&format!("/v2/models/{model}/infer"), body)
    }

    /// The repository index's `reason` for a model (its first row).
    pub fn index_reason(&self, name: &str) -> String {
        let rows = self
            .post_json("/v2/repository/index", &serde_json::json!({}))
            .ok();
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned();
        let row = row.unwrap_or_else(|| panic!("{name} not in the index: {rows}"));
        row["reason"].as_str().unwrap_or_default().to_string()
    }

    /// (batch size, executions) from a model's `batch_stats`.
    pub fn batch_stats(&self, model: &str) -> Vec<(u64, u64)> {
        let stats = self.get(&format!("/v2/models/{model}/stats")).ok();
        stats["model_stats"][0]["batch_stats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["batch_size"].as_u64().unwrap(),
                    b["compute_infer"]["count"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    pub fn metrics_text(&self) -> String {
        ureq::get(&self.metrics)
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "wisp did not exit after SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response of any status, with its headers and body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    fn from(result: Result<ureq::Response, ureq::Error>) -> Reply {
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("HTTP transport error: {e}"),
        };
        let status = response.status();
        let headers = response
            .headers_names()
            .into_iter()
            .map(|h| {
                let v = response.header(&h).unwrap_or_default().to_string();
                (h, v)
            })
            .collect();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut response.into_reader(), &mut body).unwrap();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `error` message of an error reply, asserting the status.
    pub fn error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()["error"]
            .as_str()
            .expect("an error message")
            .to_string()
    }

    pub fn ok(&self) -> Value {
        assert_eq!(
            self.status,
            200,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }
}

/// The JSON body of a `simple` request with batch 1.
pub fn simple_request(a: &[i32], b: &[i32]) -> Value {
    serde_json::json!({
        "inputs": [
            {"name": "INPUT0", "shape": [1, a.len()], "datatype": "INT32", "data": a},
            {"name": "INPUT1", "shape": [1, b.len()], "datatype": "INT32", "data": b},
        ]
    })
}

pub fn ramp() -> Vec<i32> {
    (0..16).collect()
}

/// Builds a binary-extension body: JSON header, then the tensors' bytes.
pub fn binary_body(header: &Value, tensors: &[&[u8]]) -> (Vec<u8>, String) {
    let mut body = serde_json::to_vec(header).unwrap();
    let header_len = body.len().to_string();
    for t in tensors {
        body.extend_from_slice(t);
    }
    (body, header_len)
}

/// Splits a binary-extension response into its JSON header and the rest.
pub fn split_binary(reply: &Reply) -> (Value, Vec<u8>) {
    let len: usize = reply
        .header("Inference-Header-Content-Length")
        .expect("Inference-Header-Content-Length")
        .parse()
        .unwrap();
    (
        serde_json::from_slice(&reply.body[..len]).unwrap(),
        reply.body[len..].to_vec(),
    )
}

pub fn i32_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A POSIX shared-memory object (`/dev/shm/NAME`) of zeros, removed on drop.
pub struct ShmObject {
    pub name: String,
    pub path: PathBuf,
}

impl ShmObject {
    pub fn new(prefix: &str, len: usize) -> ShmObject {
        let name = format!("{prefix}-{}", std::process::id());
        let path = Path::new("/dev/shm").join(&name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        ShmObject { name, path }
    }
}

impl Drop for ShmObject {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
