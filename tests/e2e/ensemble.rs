//! Ensembles: the DAG gives what calling the steps by hand gives, invalid DAGs
//! are UNAVAILABLE with reasons naming the step and tensor, and a model inside a
//! pipeline batches across concurrent pipelines.

use crate::harness::*;
use serde_json::{json, Value};
use std::sync::Arc;

fn ensemble_config() -> String {
    std::fs::read_to_string(workspace_root().join("model_repository/ensemble_add_sub/config.toml"))
        .unwrap()
}

fn add_ensemble(repo: &TestRepo, name: &str, config: &str) {
    let dir = repo.path().join(name);
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(dir.join("config.toml"), config).unwrap();
}

fn outputs(reply: &Value) -> (Value, Value) {
    (
        reply["outputs"][0]["data"].clone(),
        reply["outputs"][1]["data"].clone(),
    )
}

#[test]
fn an_ensemble_equals_its_steps_called_by_hand() {
    let repo = TestRepo::new();
    repo.simple();
    add_ensemble(&repo, "ensemble_add_sub", &ensemble_config());
    let server = Server::start(repo.path(), &[]);
    let a: Vec<i32> = (0..16).map(|v| v * 3 - 7).collect();
    let b: Vec<i32> = (0..16).map(|v| 100 - v).collect();

    let (sum, diff) = outputs(&server.infer("simple", &simple_request(&a, &b)).ok());
    let to_vec = |v: &Value| -> Vec<i32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect()
    };
    let by_hand = outputs(
        &server
            .infer("simple", &simple_request(&to_vec(&sum), &to_vec(&diff)))
            .ok(),
    );

    let reply = server
        .infer("ensemble_add_sub", &simple_request(&a, &b))
        .ok();
    assert_eq!(reply["model_name"], "ensemble_add_sub");
    assert_eq!(outputs(&reply), by_hand);
    let doubled: Vec<i32> = a.iter().map(|v| v * 2).collect();
    assert_eq!(reply["outputs"][0]["data"], json!(doubled));

    let config = server.get("/v2/models/ensemble_add_sub/config").ok();
    assert_eq!(config["platform"], "ensemble");
    assert_eq!(
        config["ensemble_scheduling"]["step"][1]["input_map"]["INPUT0"],
        "SUM"
    );
    // The composing model counted both steps of the pipeline.
    let stats = server.get("/v2/models/simple/stats").ok();
    assert_eq!(
        stats["model_stats"][0]["inference_stats"]["success"]["count"],
        4
    );
    // A step's failure names the step.
    let e = server
        .infer("ensemble_add_sub", &simple_request(&[1; 15], &[1; 15]))
        .error(400);
    assert!(e.contains("INPUT0"), "{e}");
}

#[test]
fn invalid_ensembles_are_unavailable_with_reasons() {
    let repo = TestRepo::new();
    repo.simple();
    repo.simple_string();
    let base = ensemble_config();
    add_ensemble(
        &repo,
        "unknown_model",
        &base.replacen("model = \"simple\"", "model = \"nosuch\"", 1),
    );
    add_ensemble(
        &repo,
        "unproduced",
        &base.replace("INPUT0 = \"SUM\"", "INPUT0 = \"TOTAL\""),
    );
    add_ensemble(
        &repo,
        "cycle",
        &base.replace(
            "input_map = { INPUT0 = \"INPUT0\", INPUT1 = \"INPUT1\" }",
            "input_map = { INPUT0 = \"OUTPUT0\", INPUT1 = \"INPUT1\" }",
        ),
    );
    add_ensemble(
        &repo,
        "mismatch",
        &base.replacen("model = \"simple\"", "model = \"simple_string\"", 1),
    );
    add_ensemble(
        &repo,
        "no_such_output",
        &base.replace("OUTPUT1 = \"DIFF\"", "OUTPUT9 = \"DIFF\""),
    );
    add_ensemble(&repo, "no_steps", &base[..base.find("[[step]]").unwrap()]);
    let server = Server::start(repo.path(), &["--strict-readiness", "false"]);
    let r = server.index_reason("unknown_model");
    assert!(r.contains("step 0") && r.contains("nosuch"), "{r}");
    let r = server.index_reason("unproduced");
    assert!(
        r.contains("step 1") && r.contains("'TOTAL'") && r.contains("neither"),
        "{r}"
    );
    let r = server.index_reason("cycle");
    assert!(r.contains("cycle") && r.contains("step 0"), "{r}");
    let r = server.index_reason("mismatch");
    assert!(
        r.contains("step 0") && r.contains("INT32") && r.contains("BYTES"),
        "{r}"
    );
    let r = server.index_reason("no_such_output");
    assert!(r.contains("step 0") && r.contains("OUTPUT9"), "{r}");
    let r = server.index_reason("no_steps");
    assert!(r.contains("[[step]]"), "{r}");
    server
        .infer("simple", &simple_request(&ramp(), &ramp()))
        .ok();
}

#[test]
fn a_model_inside_pipelines_batches_across_them() {
    let repo = TestRepo::new();
    // `simple` with a long batching window and preferred size 4: only requests
    // from concurrent pipelines can fill it.
    let batched = format!(
        "{}\n[dynamic_batching]\npreferred_batch_size = [4]\nmax_queue_delay_us = 30000000\n",
        simple_config()
    );
    repo.add("simple", &batched, "wisp_plugin_simple", &[1]);
    add_ensemble(&repo, "ensemble_add_sub", &ensemble_config());
    let server = Arc::new(Server::start(repo.path(), &[]));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let server = server.clone();
            std::thread::spawn(move || {
                let a = vec![i; 16];
                let reply = server
                    .infer("ensemble_add_sub", &simple_request(&a, &ramp()))
                    .ok();
                assert_eq!(reply["outputs"][0]["data"], json!(vec![2 * i; 16]));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let batches = server.batch_stats("simple");
    // Step 0 of all four pipelines ran as one batch, then step 1 of all four.
    assert_eq!(batches, vec![(4, 2)]);
}
