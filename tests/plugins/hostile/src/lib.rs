//! A plugin that attacks its host. The model's `attack` parameter picks the attack,
//! which runs on every `execute`; a request whose input holds a non-zero INT32
//! runs it, a zero answers normally (so tests can check the instance is usable).
//!
//! Where an attack is denied by the sandbox, the plugin reports what the denial
//! said as an `internal` error; if an attack ever succeeded, it answers with
//! what it got, so the test sees the leak.

use std::hint::black_box;
use wisp_plugin_sdk::{
    export_model, Error, Model, ModelInfo, Parameter, ParameterValue, Parameters, Request,
    Response, Tensor, Tokenizer,
};

struct Hostile {
    attack: String,
    /// Where the `network` attack connects (the test's listener).
    target: String,
    delay_ms: u64,
}

fn leak(what: String) -> Result<Response, Error> {
    Ok(Response::new().with_output(Tensor::from_bytes_elements("OUTPUT0", &[1], [what])))
}

impl Hostile {
    fn attack(&self, scale: i32) -> Result<Response, Error> {
        match self.attack.as_str() {
            "infinite_loop" => {
                let mut i: u64 = 0;
                loop {
                    i = black_box(i.wrapping_add(1));
                }
            }
            "memory_bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 16 << 20]));
                }
            }
            "trap" => {
                #[cfg(target_arch = "wasm32")]
                core::arch::wasm32::unreachable();
                #[cfg(not(target_arch = "wasm32"))]
                std::process::abort();
            }
            "slow" => {
                // Not an attack: a model that takes `delay_ms`, for shutdown, load and
                // scheduling tests. It reports when it ran (the host's wall clock), so
                // tests can see whether two executions overlapped.
                let now = || {
                    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                    since.map(|d| d.as_nanos() as i64).unwrap_or(0)
                };
                let started = now();
                // The input value scales the delay, so tests can make one request slower.
                std::thread::sleep(std::time::Duration::from_millis(
                    self.delay_ms * scale as u64,
                ));
                let mut response = leak("slept".into())?;
                for (name, at) in [("started_ns", started), ("finished_ns", now())] {
                    response.parameters.push(Parameter {
                        name: name.into(),
                        value: ParameterValue::Integer(at),
                    });
                }
                Ok(response)
            }
            "output_flood" => {
                // Hands the host the same 4 MiB tensor a hundred times (400 MiB
                // if the host kept them all), ignoring every refusal.
                let big = Tensor {
                    name: "OUTPUT0".into(),
                    datatype: wisp_plugin_sdk::Datatype::Uint8,
                    shape: vec![4 << 20],
                    data: vec![7u8; 4 << 20],
                };
                for _ in 0..100 {
                    let _ = wisp_plugin_sdk::bindings::wisp::plugin::output::emit(0, &big);
                }
                leak("flooded".into())
            }
            "empty_flood" => {
                // Empty tensors cost the host a record each: 200,000 of them (25 MiB
                // of records at the host's charge), ignoring every refusal, must run
                // into a 1 MiB output budget.
                let empty = Tensor {
                    name: "OUTPUT0".into(),
                    datatype: wisp_plugin_sdk::Datatype::Uint8,
                    shape: vec![0],
                    data: Vec::new(),
                };
                let mut refused = false;
                for _ in 0..200_000 {
                    refused |=
                        wisp_plugin_sdk::bindings::wisp::plugin::output::emit(0, &empty).is_err();
                }
                leak(format!("flooded, refused: {refused}"))
            }
            "log_forgery" => {
                wisp_plugin_sdk::log(
                    wisp_plugin_sdk::Level::Warn,
                    "innocent\nERROR wisp: forged line\u{1b}[2J",
                );
                leak("logged".into())
            }
            "panic" => panic!("the hostile plugin panics on purpose"),
            "read_passwd" => match std::fs::read_to_string("/etc/passwd") {
                Ok(text) => leak(text),
                Err(e) => Err(Error::Internal(format!("reading /etc/passwd failed: {e}"))),
            },
            "escape_folder" => {
                // The version folder is preopened as "."; try to climb out of it
                // to the model folder's config.toml and to the host's root, and
                // report what each path showed.
                let mut report = Vec::new();
                for path in ["../config.toml", "../..", "/", "/../..", "/etc/hostname"] {
                    let seen = match std::fs::read_dir(path) {
                        Ok(entries) => {
                            let mut names: Vec<String> = entries
                                .flatten()
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .collect();
                            names.sort();
                            format!("listed [{}]", names.join(","))
                        }
                        Err(_) => match std::fs::read(path) {
                            Ok(bytes) => format!("read {} bytes", bytes.len()),
                            Err(e) => format!("denied ({e})"),
                        },
                    };
                    report.push(format!("{path}: {seen}"));
                }
                leak(report.join("; "))
            }
            "network" => {
                let target = &self.target;
                match std::net::TcpStream::connect(target) {
                    Ok(_) => leak(format!("connected to {target}")),
                    Err(e) => Err(Error::Internal(format!(
                        "connecting to {target} failed: {e}"
                    ))),
                }
            }
            "tokenizer_escape" => {
                // The host reads tokenizer files for the plugin: it must not read
                // anything outside the version folder either.
                let report: Vec<String> = ["../config.toml", "/etc/passwd", "../../..", "link"]
                    .iter()
                    .map(|path| match Tokenizer::open(path, 0) {
                        Ok(_) => format!("{path}: opened"),
                        Err(e) => format!("{path}: {e}"),
                    })
                    .collect();
                leak(report.join("; "))
            }
            "tokenizer_hoard" => {
                // Opens handles without end and keeps them: the host's table must not grow
                // without bound.
                let mut hoard = Vec::new();
                loop {
                    match Tokenizer::open("tokenizer.json", 0) {
                        Ok(t) => hoard.push(t),
                        Err(e) => {
                            return leak(format!("refused after {}: {e}", hoard.len()));
                        }
                    }
                }
            }
            "tokenizer_flood" => {
                // Asks the host to tokenize 6 MiB of text in one call.
                let tokenizer = Tokenizer::open("tokenizer.json", 0)
                    .map_err(|e| Error::Internal(format!("open failed: {e}")))?;
                let text = "hello world ".repeat(512 << 10);
                match tokenizer.encode(&[text], &[], true, true) {
                    Ok(encodings) => leak(format!("tokenized {} tokens", encodings[0].ids.len())),
                    Err(e) => leak(format!("refused: {e}")),
                }
            }
            "environment" => {
                let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                if vars.is_empty() {
                    Err(Error::Internal("the environment is empty".into()))
                } else {
                    leak(vars.join(","))
                }
            }
            other => Err(Error::InvalidInput(format!("unknown attack '{other}'"))),
        }
    }
}

impl Model for Hostile {
    fn init(info: ModelInfo) -> Result<Self, Error> {
        let attack = info
            .parameters
            .get_str("attack")
            .ok_or_else(|| Error::InvalidInput("parameter 'attack' is required".into()))?
            .to_string();
        let target = info
            .parameters
            .get_str("target")
            .unwrap_or("127.0.0.1:80")
            .to_string();
        let delay_ms = info.parameters.get_i64("delay_ms").unwrap_or(0).max(0) as u64;
        // Attacks on `init`, which runs while the server loads the model.
        match attack.as_str() {
            "init_loop" => {
                let mut i: u64 = 0;
                loop {
                    i = black_box(i.wrapping_add(1));
                }
            }
            "init_sleep" => std::thread::sleep(std::time::Duration::MAX),
            _ => {}
        }
        Ok(Hostile {
            attack,
            target,
            delay_ms,
        })
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let input = request.input("INPUT0")?.to_vec::<i32>()?;
        if let Some(&scale) = input.iter().find(|&&v| v != 0) {
            self.attack(scale.max(1))
        } else {
            leak("harmless".into())
        }
    }
}

export_model!(Hostile);
