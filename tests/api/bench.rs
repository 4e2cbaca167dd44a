//! The benchmark's smoke mode, so the harness stays alive: every target
//! runs, every acknowledged notification is read back, enrichment finishes.

use std::process::Command;

use serde_json::Value;

#[test]
fn the_benchmark_runs_in_smoke_mode_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--smoke", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("baseline (bare axum)"), "{stdout}");
    assert!(stdout.contains("enrichment: 100 messages"), "{stdout}");

    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let targets = report["targets"].as_array().unwrap();
    let with_dynamodb = std::env::var_os("QW_MOTO_PYTHON").is_some();
    assert_eq!(targets.len(), if with_dynamodb { 3 } else { 2 }, "{report}");
    for t in targets {
        assert!(t["rps"].as_f64().unwrap() > 0.0, "{t}");
        if t["target"] != "baseline (bare axum)" {
            assert!(t["acked"].as_u64().unwrap() > 0, "{t}");
            assert_eq!(t["lost"], 0, "{t}");
            assert!(
                t["stored"].as_u64().unwrap() >= t["acked"].as_u64().unwrap(),
                "{t}"
            );
            let expected = if t["target"] == "qualia-webhook, SQLite" {
                2
            } else {
                1
            };
            assert_eq!(t["open_loop"].as_array().unwrap().len(), expected, "{t}");
        }
    }
    let enrichment = &report["enrichment"];
    assert_eq!(enrichment["done"], 100, "{enrichment}");
    assert!(
        enrichment["messages_calls"].as_u64().unwrap() <= 10,
        "{enrichment}"
    );
}
