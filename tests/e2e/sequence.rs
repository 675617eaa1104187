//! The sequence batcher: sequences keep their order and state on their
//! instance, control inputs reach the model, idle sequences are released.

use crate::harness::*;
use serde_json::{json, Value};
use std::sync::Arc;

/// The default repository's `simple_sequence` made an accumulator keyed by its
/// correlation id: state that must stay on one instance.
fn sequence_config(idle_us: u64) -> String {
    let config = std::fs::read_to_string(
        workspace_root().join("model_repository/simple_sequence/config.toml"),
    )
    .unwrap();
    assert!(config.contains("[parameters]\nmode = \"add_start\""));
    config
        .replace(
            "max_sequence_idle_us = 5000000",
            &format!("max_sequence_idle_us = {idle_us}"),
        )
        .replace(
            "[parameters]\nmode = \"add_start\"",
            "[[sequence_batching.control_input]]\nname = \"CORRID\"\nkind = \"corrid\"\n\
             datatype = \"BYTES\"\n\n[parameters]\nmode = \"accumulate\"",
        )
}

fn step(id: Value, value: i32, start: bool, end: bool) -> Value {
    json!({
        "parameters": {"sequence_id": id, "sequence_start": start, "sequence_end": end},
        "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "INT32", "data": [value]}]
    })
}

fn output(reply: &Value) -> i64 {
    reply["outputs"][0]["data"][0].as_i64().unwrap()
}

#[test]
fn interleaved_sequences_keep_their_own_state_in_order() {
    let repo = TestRepo::new();
    repo.add(
        "seq",
        &sequence_config(5_000_000),
        "wisp_plugin_sequence",
        &[1],
    );
    let server = Arc::new(Server::start(repo.path(), &[]));
    // Three sequences at once (numeric and string ids), each from its own thread.
    let ids = [json!(1001), json!(1002), json!("user-7")];
    let handles: Vec<_> = ids
        .iter()
        .cloned()
        .enumerate()
        .map(|(k, id)| {
            let server = server.clone();
            std::thread::spawn(move || {
                let values: Vec<i32> = (1..=8).map(|v| v * (k as i32 + 1)).collect();
                let mut expected = 0;
                for (i, &v) in values.iter().enumerate() {
                    let last = i == values.len() - 1;
                    let reply = server.infer("seq", &step(id.clone(), v, i == 0, last)).ok();
                    expected += v;
                    assert_eq!(output(&reply), expected as i64, "sequence {id} step {i}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // START resets a sequence's state.
    server.infer("seq", &step(json!(1001), 5, true, false)).ok();
    assert_eq!(
        output(
            &server
                .infer("seq", &step(json!(1001), 5, false, false))
                .ok()
        ),
        10
    );
    assert_eq!(
        output(&server.infer("seq", &step(json!(1001), 1, true, true)).ok()),
        1
    );

    let config = server.get("/v2/models/seq/config").ok();
    assert_eq!(
        config["sequence_batching"]["control_input"][3]["control"][0]["kind"],
        "CONTROL_SEQUENCE_CORRID"
    );
}

#[test]
fn requests_outside_a_live_sequence_are_refused() {
    let repo = TestRepo::new();
    repo.add(
        "seq",
        &sequence_config(300_000),
        "wisp_plugin_sequence",
        &[1],
    );
    let server = Server::start(repo.path(), &[]);
    let e = server
        .infer("seq", &step(json!(5), 1, false, false))
        .error(400);
    assert!(e.contains("sequence 5") && e.contains("not active"), "{e}");
    let mut no_id = step(json!(5), 1, true, false);
    no_id["parameters"]
        .as_object_mut()
        .unwrap()
        .remove("sequence_id");
    assert!(server
        .infer("seq", &no_id)
        .error(400)
        .contains("sequence_id"));
    // An ended sequence takes no more requests.
    server.infer("seq", &step(json!(6), 1, true, true)).ok();
    assert!(server
        .infer("seq", &step(json!(6), 1, false, false))
        .error(400)
        .contains("not active"));
    // An idle sequence is released; its next request is refused.
    server.infer("seq", &step(json!(7), 2, true, false)).ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !server.log().contains("released an idle sequence") {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle sequence was never released"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let e = server
        .infer("seq", &step(json!(7), 2, false, false))
        .error(400);
    assert!(e.contains("max_sequence_idle_us"), "{e}");
}

#[test]
fn direct_sequences_wait_for_a_free_slot() {
    let repo = TestRepo::new();
    // One instance with one slot: a second sequence waits for the first to end.
    let config = sequence_config(5_000_000)
        .replace("max_batch_size = 8", "max_batch_size = 1")
        .replace("count = 2", "count = 1");
    repo.add("seq", &config, "wisp_plugin_sequence", &[1]);
    let server = Arc::new(Server::start(repo.path(), &[]));
    assert_eq!(
        output(&server.infer("seq", &step(json!(1), 4, true, false)).ok()),
        4
    );
    let second = {
        let server = server.clone();
        std::thread::spawn(move || {
            output(&server.infer("seq", &step(json!(2), 9, true, false)).ok())
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !second.is_finished(),
        "sequence 2 ran while sequence 1 held the only slot"
    );
    assert_eq!(
        output(&server.infer("seq", &step(json!(1), 1, false, true)).ok()),
        5
    );
    assert_eq!(second.join().unwrap(), 9);
}

#[test]
fn oldest_strategy_batches_across_sequences() {
    let repo = TestRepo::new();
    let config = sequence_config(5_000_000)
        .replace(
            "strategy = \"direct\"",
            "strategy = \"oldest\"\nmax_queue_delay_us = 30000000\npreferred_batch_size = [3]",
        )
        .replace("count = 2", "count = 1");
    repo.add("seq", &config, "wisp_plugin_sequence", &[1]);
    let server = Arc::new(Server::start(repo.path(), &[]));
    let handles: Vec<_> = (1..=3)
        .map(|id| {
            let server = server.clone();
            std::thread::spawn(move || {
                output(
                    &server
                        .infer("seq", &step(json!(id), id * 10, true, false))
                        .ok(),
                )
            })
        })
        .collect();
    let mut sums: Vec<i64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    sums.sort();
    assert_eq!(sums, vec![10, 20, 30]);
    let stats = server.get("/v2/models/seq/stats").ok();
    assert_eq!(stats["model_stats"][0]["batch_stats"][0]["batch_size"], 3);
    assert_eq!(stats["model_stats"][0]["execution_count"], 1);
    let config = server.get("/v2/models/seq/config").ok();
    assert_eq!(
        config["sequence_batching"]["strategy"]["oldest"]["preferred_batch_size"],
        json!([3])
    );
}

/// A model whose correlation id control is numeric takes numeric ids (or strings that
/// hold a number) and names the problem otherwise.
#[test]
fn a_numeric_correlation_id_refuses_a_string_id() {
    let repo = TestRepo::new();
    let config = std::fs::read_to_string(
        workspace_root().join("model_repository/simple_dyna_sequence/config.toml"),
    )
    .unwrap();
    repo.add("dyna", &config, "wisp_plugin_sequence", &[1]);
    let server = Server::start(repo.path(), &[]);
    let error = server
        .infer("dyna", &step(json!("user-7"), 1, true, false))
        .error(400);
    assert!(
        error.contains("takes numeric sequence ids")
            && error.contains("'CORRID' is UINT64")
            && error.contains("'user-7'"),
        "{error}"
    );
    // INPUT + START, and the end adds the id, as Triton's example model computes.
    assert_eq!(
        output(
            &server
                .infer("dyna", &step(json!("41"), 1, true, false))
                .ok()
        ),
        2
    );
    assert_eq!(
        output(&server.infer("dyna", &step(json!(41), 5, false, false)).ok()),
        5
    );
    assert_eq!(
        output(&server.infer("dyna", &step(json!(41), 1, false, true)).ok()),
        42
    );
}
