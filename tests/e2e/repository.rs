//! The model repository: control modes, versions, broken models, restricted
//! APIs, reloads under load, graceful shutdown.

use crate::harness::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn index(server: &Server, ready: bool) -> Vec<Value> {
    server
        .post_json("/v2/repository/index", &json!({"ready": ready}))
        .ok()
        .as_array()
        .unwrap()
        .clone()
}

fn row<'a>(rows: &'a [Value], name: &str, version: &str) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["name"] == name && r["version"] == version)
}

#[test]
fn explicit_mode_loads_and_unloads() {
    let repo = TestRepo::new();
    repo.simple();
    repo.simple_string();
    let server = Server::start(
        repo.path(),
        &["--model-control-mode", "explicit", "--load-model", "simple"],
    );

    let rows = index(&server, false);
    assert_eq!(row(&rows, "simple", "1").unwrap()["state"], "READY");
    assert!(rows.contains(&json!({"name": "simple_string"})), "{rows:?}");
    assert_eq!(index(&server, true).len(), 1);
    assert_eq!(server.get("/v2/models/simple_string/ready").status, 404);

    assert_eq!(
        server
            .post_json("/v2/repository/models/simple_string/load", &json!({}))
            .status,
        200
    );
    assert_eq!(server.get("/v2/models/simple_string/ready").status, 200);
    assert_eq!(index(&server, true).len(), 2);

    let request = simple_request(&ramp(), &ramp());
    server.infer("simple", &request).ok();
    assert_eq!(
        server
            .post_bytes("/v2/repository/models/simple/unload", &[], b"")
            .status,
        200
    );
    let rows = index(&server, false);
    assert_eq!(row(&rows, "simple", "1").unwrap()["state"], "UNAVAILABLE");
    assert_eq!(row(&rows, "simple", "1").unwrap()["reason"], "unloaded");
    let e = server.infer("simple", &request).error(503);
    assert!(e.contains("simple") && e.contains("unloaded"), "{e}");
    assert!(server
        .metrics_text()
        .contains("wisp_model_ready{model=\"simple\",version=\"1\"} 0"));

    // Reload after unload.
    assert_eq!(
        server
            .post_json("/v2/repository/models/simple/load", &json!({}))
            .status,
        200
    );
    server.infer("simple", &request).ok();

    let e = server
        .post_json("/v2/repository/models/absent/load", &json!({}))
        .error(400);
    assert!(e.starts_with("failed to load 'absent'"), "{e}");
    let e = server
        .post_json("/v2/repository/models/..%2Fetc/load", &json!({}))
        .error(400);
    assert!(e.contains("invalid model name"), "{e}");
    let e = server
        .post_json("/v2/repository/models/absent/unload", &json!({}))
        .error(404);
    assert!(e.contains("absent"), "{e}");
}

#[test]
fn none_mode_refuses_load_and_unload() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(repo.path(), &[]);
    let e = server
        .post_json("/v2/repository/models/simple/unload", &json!({}))
        .error(503);
    assert!(e.contains("--model-control-mode explicit"), "{e}");
    assert_eq!(server.get("/v2/models/simple/ready").status, 200);
}

#[test]
fn version_policies() {
    let repo = TestRepo::new();
    let with_policy = |policy: &str| format!("version_policy = {policy}\n{}", simple_config());
    repo.add(
        "latest2",
        &with_policy("{ latest = 2 }"),
        "wisp_plugin_simple",
        &[1, 2, 3],
    );
    repo.add(
        "all",
        &with_policy("\"all\""),
        "wisp_plugin_simple",
        &[1, 2, 3],
    );
    repo.add(
        "specific",
        &with_policy("{ specific = [1, 3] }"),
        "wisp_plugin_simple",
        &[1, 2, 3],
    );
    repo.add(
        "default",
        &simple_config(),
        "wisp_plugin_simple",
        &[1, 2, 10],
    );
    let server = Server::start(repo.path(), &[]);
    let versions = |m: &str| server.get(&format!("/v2/models/{m}")).ok()["versions"].clone();
    assert_eq!(versions("latest2"), json!(["2", "3"]));
    assert_eq!(versions("all"), json!(["1", "2", "3"]));
    assert_eq!(versions("specific"), json!(["1", "3"]));
    assert_eq!(versions("default"), json!(["10"]));
    let request = simple_request(&ramp(), &ramp());
    assert_eq!(
        server
            .post_json("/v2/models/specific/versions/3/infer", &request)
            .ok()["model_version"],
        "3"
    );
    assert_eq!(
        server
            .post_json("/v2/models/specific/versions/2/infer", &request)
            .status,
        400
    );
    assert_eq!(server.infer("latest2", &request).ok()["model_version"], "3");
}

#[test]
fn broken_models_are_unavailable_with_reasons_and_others_serve() {
    let repo = TestRepo::new();
    repo.simple();
    repo.add(
        "typo",
        &format!("{}\nmax_batch = 4\n", simple_config()),
        "wisp_plugin_simple",
        &[1],
    );
    repo.add(
        "bad_type",
        &simple_config().replacen("INT32", "INT3", 1),
        "wisp_plugin_simple",
        &[1],
    );
    repo.add("no_versions", &simple_config(), "wisp_plugin_simple", &[]);
    repo.add("no_component", &simple_config(), "wisp_plugin_simple", &[1]);
    std::fs::remove_file(repo.path().join("no_component/1/model.wasm")).unwrap();
    repo.add("not_wasm", &simple_config(), "wisp_plugin_simple", &[1]);
    std::fs::write(
        repo.path().join("not_wasm/1/model.wasm"),
        b"MZ this is not wasm",
    )
    .unwrap();
    std::fs::create_dir_all(repo.path().join("no_config")).unwrap();
    let server = Server::start(repo.path(), &[]);

    let r = server.index_reason("typo");
    assert!(
        r.contains("typo/config.toml") && r.contains("max_batch"),
        "{r}"
    );
    let r = server.index_reason("bad_type");
    assert!(
        r.contains("bad_type/config.toml") && r.contains("INT3") && r.contains("datatype"),
        "{r}"
    );
    let r = server.index_reason("no_versions");
    assert!(r.contains("no version folder"), "{r}");
    let r = server.index_reason("no_component");
    assert!(r.contains("model.wasm") && r.contains("not found"), "{r}");
    let r = server.index_reason("not_wasm");
    assert!(r.contains("not a valid component"), "{r}");
    let r = server.index_reason("no_config");
    assert!(r.contains("no_config/config.toml"), "{r}");

    assert_eq!(server.get("/v2/models/typo/ready").status, 400);
    let e = server
        .infer("typo", &simple_request(&ramp(), &ramp()))
        .error(503);
    assert!(e.contains("max_batch"), "{e}");
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
    // Triton's strict readiness: not ready while a model failed; live all the same.
    assert_eq!(server.get("/v2/health/ready").status, 503);
    assert_eq!(server.get("/v2/health/live").status, 200);
    drop(server);
    let lenient = Server::start(repo.path(), &["--strict-readiness", "false"]);
    assert_eq!(lenient.get("/v2/health/ready").status, 200);
}

#[test]
fn a_failed_reload_leaves_the_loaded_version_serving() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(
        repo.path(),
        &["--model-control-mode", "explicit", "--load-model", "simple"],
    );
    let request = simple_request(&ramp(), &ramp());
    // A broken version 2 under the default policy (latest 1).
    std::fs::create_dir_all(repo.path().join("simple/2")).unwrap();
    std::fs::write(repo.path().join("simple/2/model.wasm"), b"not a component").unwrap();
    let e = server
        .post_json("/v2/repository/models/simple/load", &json!({}))
        .error(400);
    assert!(
        e.contains("version 2") && e.contains("not a valid component"),
        "{e}"
    );
    assert_eq!(server.infer("simple", &request).ok()["model_version"], "1");
    let rows = index(&server, false);
    let v1 = row(&rows, "simple", "1").unwrap();
    assert_eq!(v1["state"], "READY");
    assert!(
        v1["reason"].as_str().unwrap().contains("reload failed"),
        "{v1}"
    );
    assert_eq!(row(&rows, "simple", "2").unwrap()["state"], "UNAVAILABLE");
    assert_eq!(server.get("/v2/health/ready").status, 503);
    // Fixed files load, and version 2 takes over.
    repo.add_version("simple", "wisp_plugin_simple", 2);
    let status = server
        .post_json("/v2/repository/models/simple/load", &json!({}))
        .status;
    assert_eq!(status, 200);
    assert_eq!(server.infer("simple", &request).ok()["model_version"], "2");
    assert_eq!(server.get("/v2/health/ready").status, 200);
}

#[test]
fn poll_mode_picks_up_changes() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(
        repo.path(),
        &[
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            "1",
        ],
    );
    assert_eq!(
        server.get("/v2/models/simple/config").ok()["max_batch_size"],
        8
    );

    let wait_for = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "poll mode never picked up {what}: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // A changed config is reloaded.
    repo.write_config(
        "simple",
        &simple_config().replace("max_batch_size = 8", "max_batch_size = 4"),
    );
    wait_for("the new max_batch_size", &|| {
        server.get("/v2/models/simple/config").json()["max_batch_size"] == 4
    });
    // A new model folder is loaded.
    repo.add("second", &simple_config(), "wisp_plugin_simple", &[1]);
    wait_for("the new model", &|| {
        server.get("/v2/models/second/ready").status == 200
    });
    // A new version replaces the old under the default policy (latest 1).
    repo.add_version("second", "wisp_plugin_simple", 2);
    wait_for("version 2", &|| {
        server.get("/v2/models/second").json()["versions"] == json!(["2"])
    });
    // A broken config keeps the loaded version serving and says why.
    repo.write_config("simple", "backend = \"wasm\"\nbogus_key = 1\n");
    wait_for("the broken config", &|| {
        index(&server, false).iter().any(|r| {
            r["name"] == "simple" && r["reason"].as_str().unwrap_or("").contains("bogus_key")
        })
    });
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
    // A removed folder is unloaded.
    std::fs::remove_dir_all(repo.path().join("second")).unwrap();
    wait_for("the removal", &|| {
        server.get("/v2/models/second/ready").status == 404
    });
}

#[test]
fn reloading_a_new_version_under_load_fails_no_request() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Arc::new(Server::start(
        repo.path(),
        &["--model-control-mode", "explicit", "--load-model", "simple"],
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::<String>::new())),
    );
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (server, stop, done, failed) =
                (server.clone(), stop.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                let request = simple_request(&ramp(), &ramp());
                while !stop.load(Ordering::Relaxed) {
                    let reply = server.infer("simple", &request);
                    if reply.status != 200 {
                        failed
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&reply.body).into_owned());
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for version in 2..=4 {
        repo.add_version("simple", "wisp_plugin_simple", version);
        assert_eq!(
            server
                .post_json("/v2/repository/models/simple/load", &json!({}))
                .status,
            200
        );
        assert_eq!(
            server.get("/v2/models/simple").ok()["versions"],
            json!([version.to_string()])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(
        done.load(Ordering::Relaxed) > 20,
        "too few requests ran: {}",
        done.load(Ordering::Relaxed)
    );
    assert_eq!(*failed.lock().unwrap(), Vec::<String>::new());
}

use std::sync::Mutex;

#[test]
fn restricted_repository_api() {
    let repo = TestRepo::new();
    repo.simple();
    let server = Server::start(
        repo.path(),
        &[
            "--model-control-mode",
            "explicit",
            "--load-model",
            "simple",
            "--http-restricted-api",
            "model-repository:admin-key=s3cret",
        ],
    );
    let e = server
        .post_json("/v2/repository/index", &json!({}))
        .error(403);
    assert!(e.contains("admin-key"), "{e}");
    assert_eq!(
        server
            .post_bytes(
                "/v2/repository/models/simple/unload",
                &[("admin-key", "wrong")],
                b""
            )
            .status,
        403
    );
    assert_eq!(server.get("/v2/models/simple/ready").status, 200);
    assert_eq!(
        server
            .post_bytes("/v2/repository/index", &[("admin-key", "s3cret")], b"{}")
            .status,
        200
    );
    // Inference, metadata and statistics stay open.
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
    server.get("/v2/models/simple").ok();
    server.get("/v2/models/simple/stats").ok();
    assert_eq!(
        server
            .post_bytes(
                "/v2/repository/models/simple/unload",
                &[("admin-key", "s3cret")],
                b""
            )
            .status,
        200
    );
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests() {
    let repo = TestRepo::new();
    repo.add(
        "slow",
        "backend = \"wasm\"\nmax_batch_size = 0\n[[input]]\nname = \"INPUT0\"\ndatatype = \"INT32\"\ndims = [1]\n\
         [[output]]\nname = \"OUTPUT0\"\ndatatype = \"BYTES\"\ndims = [1]\n\
         [parameters]\nattack = \"slow\"\ndelay_ms = 1500\n",
        "wisp_test_hostile",
        &[1],
    );
    let server = Server::start(repo.path(), &[]);
    let url = server.url("/v2/models/slow/infer");
    let in_flight = std::thread::spawn(move || {
        ureq::post(&url)
            .send_json(json!({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [1]}]}))
            .map(|r| r.into_json::<Value>().unwrap())
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(400));
    let status = server.terminate();
    let reply = in_flight
        .join()
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(reply["outputs"][0]["data"], json!(["slept"]));
    assert_eq!(status.code(), Some(0));
}
