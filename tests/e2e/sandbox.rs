//! Hostile plugins (tests/plugins/hostile): each attack is contained, the
//! failing instance is replaced, and the other models keep answering.

use crate::harness::*;
use serde_json::json;
use std::net::TcpListener;
use std::time::Duration;

fn hostile_config(attack: &str, extra: &str) -> String {
    format!(
        "backend = \"wasm\"\nmax_batch_size = 0\n\
         [[input]]\nname = \"INPUT0\"\ndatatype = \"INT32\"\ndims = [1]\n\
         [[output]]\nname = \"OUTPUT0\"\ndatatype = \"BYTES\"\ndims = [1]\n\
         [sandbox]\nexecution_timeout_ms = 500\nmemory_limit_mib = 64\n\
         [parameters]\nattack = \"{attack}\"\n{extra}"
    )
}

/// `attack = 1` runs the attack; `attack = 0` answers "harmless".
fn request(attack: bool) -> serde_json::Value {
    json!({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [attack as i32]}]})
}

/// Starts a server with `simple` and one hostile model; runs the attack and
/// returns (status, error message), after checking the server is still whole.
fn attack(name: &str, extra: &str) -> (u16, String, Server, TestRepo) {
    attack_prepared(name, extra, |_| {})
}

/// `attack`, with `prepare` adding files to the hostile model's version folder first.
fn attack_prepared(
    name: &str,
    extra: &str,
    prepare: impl FnOnce(&std::path::Path),
) -> (u16, String, Server, TestRepo) {
    let repo = TestRepo::new();
    repo.simple();
    repo.add(
        name,
        &hostile_config(name, extra),
        "wisp_test_hostile",
        &[1],
    );
    prepare(&repo.path().join(name).join("1"));
    let server = Server::start(repo.path(), &[]);
    assert_eq!(
        server.infer(name, &request(false)).ok()["outputs"][0]["data"],
        json!(["harmless"])
    );

    let reply = server.infer(name, &request(true));
    let message = String::from_utf8_lossy(&reply.body).into_owned();

    // Whatever happened, the server answers, the other model works, and the
    // hostile model's instance (fresh if it was discarded) answers too.
    assert_eq!(server.get("/v2/health/live").status, 200);
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
    assert_eq!(
        server.infer(name, &request(false)).ok()["outputs"][0]["data"],
        json!(["harmless"])
    );
    (reply.status, message, server, repo)
}

#[test]
fn infinite_loop_hits_the_deadline() {
    let (status, message, server, _repo) = attack("infinite_loop", "");
    assert_eq!(status, 503, "{message}");
    assert!(message.contains("deadline of 500 ms exceeded"), "{message}");
    assert!(server.log().contains("discarding the instance"));
    // Twice more: each time a fresh instance takes the slot.
    for _ in 0..2 {
        assert_eq!(server.infer("infinite_loop", &request(true)).status, 503);
    }
    server.infer("infinite_loop", &request(false)).ok();
}

#[test]
fn memory_bomb_is_capped() {
    let (status, message, _server, _repo) = attack("memory_bomb", "");
    assert_eq!(status, 500, "{message}");
    assert!(
        message.contains("memory limit of 64 MiB exceeded"),
        "{message}"
    );
}

#[test]
fn trap_fails_the_batch_cleanly() {
    let (status, message, _server, _repo) = attack("trap", "");
    assert_eq!(status, 500, "{message}");
    assert!(message.contains("unreachable"), "{message}");
}

#[test]
fn panic_message_reaches_the_client() {
    let (status, message, _server, _repo) = attack("panic", "");
    assert_eq!(status, 500, "{message}");
    assert!(
        message.contains("the hostile plugin panics on purpose"),
        "{message}"
    );
}

#[test]
fn reading_etc_passwd_is_denied() {
    let (status, message, _server, _repo) = attack("read_passwd", "");
    assert_eq!(status, 500, "{message}");
    assert!(message.contains("reading /etc/passwd failed"), "{message}");
    assert!(!message.contains("root:"), "{message}");
}

#[test]
fn escaping_the_version_folder_is_denied() {
    let (status, message, _server, _repo) = attack("escape_folder", "");
    assert_eq!(status, 200, "{message}");
    let reply: serde_json::Value = serde_json::from_str(&message).unwrap();
    let report = reply["outputs"][0]["data"][0].as_str().unwrap();
    // Every way up is refused; "/" is the version folder itself, holding only the component.
    for denied in [
        "../config.toml: denied",
        "../..: denied",
        "/../..: denied",
        "/etc/hostname: denied",
    ] {
        assert!(report.contains(denied), "expected '{denied}' in: {report}");
    }
    assert!(report.contains("/: listed [model.wasm]"), "{report}");
}

#[test]
fn network_connections_are_denied() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let (status, message, _server, _repo) = attack("network", &format!("target = \"{target}\"\n"));
    assert_eq!(status, 500, "{message}");
    assert!(
        message.contains(&format!("connecting to {target} failed")),
        "{message}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        listener.accept().is_err(),
        "the plugin reached the test's listener"
    );
}

#[test]
fn the_environment_is_empty() {
    let (status, message, _server, _repo) = attack("environment", "");
    assert_eq!(status, 500, "{message}");
    assert!(message.contains("the environment is empty"), "{message}");
}

#[test]
fn two_instances_execute_at_the_same_time() {
    // Two instances of a slow model; the plugin reports when each execution ran.
    let repo = TestRepo::new();
    repo.add(
        "slow",
        &format!(
            "{}\ndelay_ms = 700\n[[instance_group]]\ncount = 2\n",
            hostile_config("slow", "")
                .replace("execution_timeout_ms = 500", "execution_timeout_ms = 5000")
        ),
        "wisp_test_hostile",
        &[1],
    );
    let server = std::sync::Arc::new(Server::start(repo.path(), &[]));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let server = server.clone();
            std::thread::spawn(move || server.infer("slow", &request(true)).ok())
        })
        .collect();
    let spans: Vec<(i64, i64)> = handles
        .into_iter()
        .map(|h| {
            let reply = h.join().unwrap();
            assert_eq!(reply["outputs"][0]["data"], json!(["slept"]));
            let at = |k: &str| reply["parameters"][k].as_i64().unwrap();
            (at("started_ns"), at("finished_ns"))
        })
        .collect();
    let latest_start = spans[0].0.max(spans[1].0);
    let earliest_end = spans[0].1.min(spans[1].1);
    assert!(
        latest_start < earliest_end,
        "the executions did not overlap: {spans:?}"
    );
    let stats = server.get("/v2/models/slow/stats").ok();
    assert_eq!(stats["model_stats"][0]["execution_count"], 2);
}

#[test]
fn sleeping_past_the_deadline_is_cut_off() {
    // A host wait (a sleep through WASI) is not running code, so the epoch
    // alone would not stop it; the per-call timer must.
    let (status, message, _server, _repo) = attack("slow", "delay_ms = 3600000\n");
    assert_eq!(status, 503, "{message}");
    assert!(message.contains("deadline of 500 ms exceeded"), "{message}");
}

#[test]
fn hostile_init_fails_the_load_and_the_server_carries_on() {
    let repo = TestRepo::new();
    repo.simple();
    for attack in ["init_loop", "init_sleep"] {
        let config =
            hostile_config(attack, "").replace("[sandbox]\n", "[sandbox]\ninit_timeout_ms = 300\n");
        repo.add(attack, &config, "wisp_test_hostile", &[1]);
    }
    let server = Server::start(repo.path(), &["--strict-readiness", "false"]);
    let r = server.index_reason("init_loop");
    assert!(
        r.contains("plugin init trapped") && r.contains("deadline of 300 ms"),
        "{r}"
    );
    let r = server.index_reason("init_sleep");
    assert!(r.contains("did not finish within 300 ms"), "{r}");
    assert_eq!(server.infer("init_loop", &request(false)).status, 503);
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
}

#[test]
fn output_floods_are_refused_within_the_budget() {
    let repo = TestRepo::new();
    repo.simple();
    let config = hostile_config("output_flood", "").replace(
        "execution_timeout_ms = 500",
        "execution_timeout_ms = 20000\nmax_output_mib = 16",
    );
    repo.add("output_flood", &config, "wisp_test_hostile", &[1]);
    let server = Server::start(repo.path(), &[]);
    let e = server.infer("output_flood", &request(true)).error(500);
    assert!(e.contains("output limit of 16 MiB exceeded"), "{e}");
    server.infer("output_flood", &request(false)).ok();
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
}

/// The attack: emitting empty tensors in a loop grew the host by hundreds of MiB
/// under a 1 MiB output budget, because empty tensors cost nothing.
#[test]
fn empty_tensors_are_charged_against_the_output_budget() {
    let repo = TestRepo::new();
    repo.simple();
    let config = hostile_config("empty_flood", "").replace(
        "execution_timeout_ms = 500",
        "execution_timeout_ms = 20000\nmax_output_mib = 1",
    );
    repo.add("empty_flood", &config, "wisp_test_hostile", &[1]);
    let server = Server::start(repo.path(), &[]);
    let rss_before = rss_kib(server.pid());
    let e = server.infer("empty_flood", &request(true)).error(500);
    assert!(e.contains("output limit of 1 MiB exceeded"), "{e}");
    let grown_mib = (rss_kib(server.pid()) - rss_before) / 1024;
    assert!(grown_mib < 64, "the host grew by {grown_mib} MiB");
    server.infer("empty_flood", &request(false)).ok();
}

fn rss_kib(pid: i32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The attack: a plugin's log message with a newline forged a server log line.
#[test]
fn plugin_log_lines_cannot_forge_server_lines() {
    let (status, _, server, _repo) = attack("log_forgery", "");
    assert_eq!(status, 200);
    let log = server.log();
    assert!(
        log.contains(r"innocent\nERROR wisp: forged line\u{1b}[2J"),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("ERROR wisp: forged")),
        "{log}"
    );
}

/// The attack: a trap's 500 body carried the wasm backtrace and the plugin's output.
#[test]
fn trap_bodies_say_what_failed_without_the_backtrace() {
    let (status, message, server, _repo) = attack("panic", "");
    assert_eq!(status, 500, "{message}");
    assert!(
        message.contains("the hostile plugin panics on purpose"),
        "{message}"
    );
    assert!(!message.contains("backtrace"), "{message}");
    assert!(!message.contains("plugin output"), "{message}");
    // The server log reaches the harness through a pipe another thread reads: wait (bounded).
    let logged = (0..100).any(|_| {
        server.log().contains("backtrace")
            || (
                std::thread::sleep(std::time::Duration::from_millis(50)),
                false,
            )
                .1
    });
    assert!(logged, "the details go to the log");
}

/// The attack: `sandbox.component` naming a file outside the version folder.
#[test]
fn component_paths_stay_inside_the_version_folder() {
    let repo = TestRepo::new();
    repo.simple();
    let config = format!(
        "{}\n[sandbox]\ncomponent = \"../../simple/1/model.wasm\"\n",
        simple_config()
    );
    repo.add("escape", &config, "wisp_plugin_simple", &[1]);
    let server = Server::start(repo.path(), &["--strict-readiness", "false"]);
    let reason = server.index_reason("escape");
    assert!(reason.contains("'sandbox.component'"), "{reason}");
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
}

/// The attack: a plugin whose `init` sleeps held back every model after it, so
/// the server never loaded them. Models now load in parallel.
#[test]
fn a_slow_init_does_not_hold_back_other_models() {
    let repo = TestRepo::new();
    let config = hostile_config("init_sleep", "")
        .replace("[sandbox]\n", "[sandbox]\ninit_timeout_ms = 600000\n");
    // "a_…" sorts before "simple": it used to load first and block.
    repo.add("a_sleeper", &config, "wisp_test_hostile", &[1]);
    repo.simple();
    let server = Server::start_listening(repo.path(), &["--strict-readiness", "false"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .status
        != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "simple never loaded: {}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(server.infer("a_sleeper", &request(false)).status, 503);
}

/// Runs a `tokenizer_*` attack with the tiny WordPiece tokenizer.json in the version
/// folder (and a link from it to /etc/passwd); returns the plugin's report.
fn tokenizer_attack(name: &str) -> (u16, String, Server) {
    let (status, message, server, _repo) = attack_prepared(name, "", |version| {
        std::fs::copy(
            workspace_root().join("tests/fixtures/tiny_wordpiece_tokenizer.json"),
            version.join("tokenizer.json"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", version.join("link")).unwrap();
    });
    let report = match status {
        200 => serde_json::from_str::<serde_json::Value>(&message).unwrap()["outputs"][0]["data"]
            [0]
        .as_str()
        .unwrap()
        .to_string(),
        _ => message,
    };
    (status, report, server)
}

#[test]
fn the_tokenize_import_reads_nothing_outside_the_version_folder() {
    let (status, report, _server) = tokenizer_attack("tokenizer_escape");
    assert_eq!(status, 200, "{report}");
    for path in ["../config.toml", "/etc/passwd", "../../..", "link"] {
        assert!(
            report.contains(&format!(
                "{path}: tokenizer path '{path}' is not a file inside the version folder"
            )),
            "{path} in: {report}"
        );
    }
    assert!(!report.contains("opened"), "{report}");
    // The errors name the plugin's own paths, never the server's folders.
    assert!(!report.contains("/tmp"), "{report}");
}

#[test]
fn tokenizer_handles_and_text_per_call_are_bounded() {
    let (status, report, _server) = tokenizer_attack("tokenizer_hoard");
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report,
        "refused after 64: an instance may hold at most 64 open tokenizers"
    );
    let (status, report, _server) = tokenizer_attack("tokenizer_flood");
    assert_eq!(status, 200, "{report}");
    assert!(
        report.starts_with("refused: 1 texts of 6291456 bytes are more than the 1 MiB"),
        "{report}"
    );
}

/// A plugin built against the frozen wisp:plugin@0.1.0 (tests/plugins/compat_0_1_0), which
/// has no `tokenize`, loads on this host and runs.
#[test]
fn plugins_built_against_wit_0_1_0_still_load() {
    let repo = TestRepo::new();
    let config = "backend = \"wasm\"\nmax_batch_size = 8\n\
         [[input]]\nname = \"INPUT0\"\ndatatype = \"INT32\"\ndims = [2]\n\
         [[output]]\nname = \"OUTPUT0\"\ndatatype = \"INT32\"\ndims = [2]\n";
    repo.add("compat", config, "wisp_test_compat_0_1_0", &[1]);
    let server = Server::start(repo.path(), &[]);
    let reply = server.infer(
        "compat",
        &json!({"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "INT32", "data": [7, -3]}]}),
    );
    assert_eq!(reply.ok()["outputs"][0]["data"], json!([7, -3]));
    assert!(
        server.log().contains("a 0.1.0 plugin started"),
        "{}",
        server.log()
    );
}
