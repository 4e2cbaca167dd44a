//! The crash harness in its short form: a few kill -9 cycles under load,
//! then reconciliation (the long runs are documented in docs/reliability.md).

use std::process::Command;

use crate::helpers::dynamodb_enabled;

fn harness(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_crash-harness"))
        .args(args)
        .args(["--server", env!("CARGO_BIN_EXE_qualia-webhook")])
        .output()
        .expect("crash harness runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "crash harness failed:\n{stdout}\n{stderr}"
    );
    stdout
}

fn figure(line: &str, name: &str) -> u64 {
    line.split(" | ")
        .find_map(|part| {
            part.strip_prefix(name)?
                .trim()
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

#[test]
fn kill_9_under_load_loses_nothing_on_sqlite() {
    let out = harness(&[
        "--cycles",
        "3",
        "--concurrency",
        "8",
        "--min-run-ms",
        "300",
        "--max-run-ms",
        "800",
    ]);
    let line = out.lines().next().unwrap_or_default();
    assert!(figure(line, "acked ") > 100, "{line}");
    assert_eq!(figure(line, "lost "), 0, "{line}");
    assert_eq!(figure(line, "duplicated "), 0, "{line}");
    assert_eq!(figure(line, "jobs lost "), 0, "{line}");
}

#[test]
fn kill_9_under_load_loses_nothing_on_dynamodb() {
    if !dynamodb_enabled() {
        return;
    }
    let out = harness(&[
        "--store",
        "dynamodb",
        "--cycles",
        "2",
        "--concurrency",
        "4",
        "--min-run-ms",
        "500",
        "--max-run-ms",
        "1000",
    ]);
    let line = out.lines().next().unwrap_or_default();
    assert!(figure(line, "acked ") > 10, "{line}");
    assert_eq!(figure(line, "lost "), 0, "{line}");
    assert_eq!(figure(line, "duplicated "), 0, "{line}");
    assert_eq!(figure(line, "jobs lost "), 0, "{line}");
}
