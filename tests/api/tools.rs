//! The operator tools (`check`, `fire`, `health`) as an operator runs them,
//! and the ops endpoints (`/metrics`, `/openapi.json`).

use std::path::Path;

use qualia_webhook::activity::ActivityType;
use serde_json::Value;

use crate::helpers::*;
use crate::process::command;

const STRONG: &str = "Xq7-long-random-webhook-pass";
const QUALIA_SECRET: &str = QUALIA_PASSWORD;

/// Runs `check` in `dir` with a good setup plus `extra`; returns (exit code, stdout).
fn check(dir: &Path, qualia_url: &str, extra: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = command(dir);
    cmd.args(["check"])
        .env("WEBHOOK_USERNAME", "qualia")
        .env("WEBHOOK_PASSWORD", STRONG)
        .env("BIND", "127.0.0.1:0")
        .env(
            "STORE",
            format!("sqlite://{}", dir.join("data/q.db").display()),
        )
        .env("QUALIA_API_URL", qualia_url)
        .env("QUALIA_API_USERNAME", QUALIA_USER)
        .env("QUALIA_API_PASSWORD", QUALIA_SECRET);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for secret in [STRONG, QUALIA_SECRET] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret was printed:\n{stdout}{stderr}"
        );
    }
    (out.status.code(), stdout)
}

fn line<'a>(out: &'a str, check: &str) -> &'a str {
    out.lines()
        .find(|l| l[l.char_indices().nth(2).map(|(i, _)| i).unwrap_or(0)..].starts_with(check))
        .unwrap_or_else(|| panic!("no {check} line in:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_good_setup() {
    let qualia = spawn_qualia().await;
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = check(dir.path(), &qualia.url, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(out.lines().all(|l| l.starts_with('✓')), "{out}");
    assert!(line(&out, "qualia api").contains("accepts the credentials"));
    assert_eq!(
        qualia.standin.calls().orders,
        1,
        "the cheap orders query was used"
    );

    let mut cmd = command(dir.path());
    let json = cmd
        .args(["check", "--json"])
        .env("WEBHOOK_USERNAME", "qualia")
        .env("WEBHOOK_PASSWORD", STRONG)
        .env("BIND", "127.0.0.1:0")
        .env(
            "STORE",
            format!("sqlite://{}", dir.path().join("data/q.db").display()),
        )
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false, "no Qualia credentials");
    let qualia_check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "qualia api")
        .unwrap();
    assert_eq!(qualia_check["ok"], false);
    assert!(
        qualia_check["detail"]
            .as_str()
            .unwrap()
            .contains("no credentials")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_an_unwritable_store() {
    let qualia = spawn_qualia().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-file"), b"x").unwrap();
    let store = format!("sqlite://{}/a-file/q.db", dir.path().display());
    let (code, out) = check(dir.path(), &qualia.url, &[("STORE", &store)]);
    assert_eq!(code, Some(1));
    let l = line(&out, "store");
    assert!(
        l.starts_with('✗') && l.contains("cannot create folder"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_weak_password_and_a_busy_address() {
    let qualia = spawn_qualia().await;
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (code, out) = check(
        dir.path(),
        &qualia.url,
        &[("WEBHOOK_PASSWORD", "password"), ("BIND", &addr)],
    );
    assert_eq!(code, Some(1));
    assert!(line(&out, "webhook credentials").starts_with('✗'), "{out}");
    assert!(
        line(&out, "listen address").contains("already running"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_refused_qualia_credentials() {
    let qualia = spawn_qualia().await;
    qualia
        .standin
        .set_credentials(QUALIA_USER, "something-else");
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = check(dir.path(), &qualia.url, &[]);
    assert_eq!(code, Some(1));
    let l = line(&out, "qualia api");
    assert!(
        l.starts_with('✗') && l.contains("refused the credentials (HTTP 401)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_an_unreachable_qualia() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = check(dir.path(), "http://127.0.0.1:9/api/vendor/graphql", &[]);
    assert_eq!(code, Some(1));
    let l = line(&out, "qualia api");
    assert!(
        l.starts_with('✗') && l.contains("could not connect"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_missing_table() {
    if !dynamodb_enabled() {
        return;
    }
    let qualia = spawn_qualia().await;
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = check(
        dir.path(),
        &qualia.url,
        &[("STORE", "dynamodb://no-such-table")],
    );
    assert_eq!(code, Some(1));
    let l = line(&out, "store");
    assert!(l.starts_with('✗') && l.contains("does not exist"), "{out}");
}

fn fire(app: &TestApp, password: &str, extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path())
        .args([
            "fire",
            "--url",
            &format!("http://{}", app.addr),
            "--username",
            USER,
        ])
        .args(extra)
        .env("WEBHOOK_PASSWORD", password)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The summary line: (passed, failed).
fn summary(out: &str) -> (usize, usize) {
    let last = out.lines().last().unwrap_or_default();
    let (p, f) = last
        .split_once(" passed, ")
        .unwrap_or_else(|| panic!("summary: {last:?}"));
    (
        p.parse().unwrap(),
        f.trim_end_matches(" failed").parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_passes_against_a_running_service() {
    let app = spawn_app().await;
    let (code, out) = fire(&app, PASSWORD, &["--order-id", "bK8bg5tajNkDpDk25"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(summary(&out), (12, 0));
    assert_eq!(
        app.timeline("bK8bg5tajNkDpDk25").await.len(),
        6,
        "the six samples were stored"
    );
    let (code, out) = fire(&app, PASSWORD, &["--type", "message"]);
    assert_eq!(code, Some(0));
    assert_eq!(summary(&out), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_fails_with_the_wrong_password() {
    let app = spawn_app().await;
    let (code, out) = fire(&app, "not-the-password", &[]);
    assert_eq!(code, Some(1), "{out}");
    let (passed, failed) = summary(&out);
    assert_eq!(
        (passed, failed),
        (2, 10),
        "only the two auth cases pass:\n{out}"
    );
    assert!(out.contains("FAIL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_command_follows_the_service() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let ok = command(dir.path())
        .args(["health", "--url", &app.url("/health")])
        .status()
        .unwrap();
    assert!(ok.success());
    let gone = command(dir.path())
        .args(["health", "--url", "http://127.0.0.1:9/health"])
        .status()
        .unwrap();
    assert_eq!(gone.code(), Some(1));
}

/// The value of one sample line of the exposition, 0 if absent.
fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_sequence() {
    let app = spawn_app().await;
    let order = new_id();
    let doc = sample(ActivityType::Documents, &order);
    app.post_ok(&doc).await;
    app.post_ok(&doc).await; // duplicate
    app.post_ok(&sample(ActivityType::Message, &order)).await;
    let bad = app
        .client
        .post(app.url("/webhook/activity"))
        .basic_auth(USER, Some(PASSWORD))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let unauth = app
        .client
        .post(app.url("/webhook/activity"))
        .json(&doc)
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    let _ = app
        .client
        .get(app.url("/no-such-route"))
        .send()
        .await
        .unwrap();

    let res = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = res.text().await.unwrap();
    let m = |k: &str| metric(&text, k);
    assert_eq!(
        m(r#"qualia_webhook_activities_stored_total{type="documents"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        m(r#"qualia_webhook_activities_stored_total{type="message"}"#),
        1.0
    );
    assert_eq!(
        m(r#"qualia_webhook_duplicates_total{type="documents"}"#),
        1.0
    );
    assert_eq!(
        m(r#"qualia_webhook_quarantined_total{reason="invalid_json"}"#),
        1.0
    );
    assert_eq!(
        m(
            r#"qualia_webhook_http_requests_total{route="/webhook/activity",method="POST",status="200"}"#
        ),
        3.0
    );
    assert_eq!(
        m(
            r#"qualia_webhook_http_requests_total{route="/webhook/activity",method="POST",status="401"}"#
        ),
        1.0
    );
    assert_eq!(
        m(r#"qualia_webhook_http_requests_total{route="unmatched",method="GET",status="404"}"#),
        1.0
    );
    assert_eq!(
        m("qualia_webhook_ingest_duration_seconds_count"),
        4.0,
        "authenticated ingests only"
    );
    assert_eq!(m(r#"qualia_webhook_jobs{state="pending"}"#), 1.0);
    assert_eq!(m(r#"qualia_webhook_jobs{state="dead"}"#), 0.0);
    assert_eq!(m("qualia_webhook_worker_paused"), 0.0);
    for name in [
        "qualia_webhook_qualia_calls",
        "qualia_webhook_qualia_call_duration_seconds",
        "qualia_webhook_store_errors",
        "qualia_webhook_jobs_finished",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name}")),
            "{name} is exported"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_the_read_credentials() {
    let app = spawn_with(|s| s.metrics_auth = true).await;
    let res = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = app
        .client
        .get(app.url("/metrics"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enrichment_metrics_move() {
    let (app, qualia) = spawn_with_qualia(|_| {}).await;
    qualia.standin.inject(qualia_webhook::standin::Fault {
        status: Some(500),
        ..Default::default()
    });
    let order = new_id();
    let body = sample(ActivityType::Message, &order);
    let mid = body["message_id"].as_str().unwrap().to_owned();
    qualia
        .standin
        .add_messages([qualia_webhook::standin::sample_message(&order, &mid, "t")]);
    app.post_ok(&body).await;
    eventually(std::time::Duration::from_secs(15), "enriched", || async {
        app.job_count("done").await == 1
    })
    .await;
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &text,
            r#"qualia_webhook_qualia_calls_total{outcome="retryable"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"qualia_webhook_qualia_calls_total{outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"qualia_webhook_jobs_finished_total{outcome="done"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"qualia_webhook_jobs_finished_total{outcome="retried"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "qualia_webhook_qualia_call_duration_seconds_count"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_covers_every_route() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut routes: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    routes.sort();
    let mut contract: Vec<(String, String)> = [
        ("POST", "/webhook/activity"),
        ("GET", "/webhook/activity/{order_id}"),
        ("GET", "/orders/{order_id}/activities"),
        ("GET", "/activities"),
        ("GET", "/jobs"),
        ("POST", "/jobs/{job_id}/retry"),
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    contract.sort();
    assert_eq!(routes, contract);

    // Every documented route is served (none falls through to "no route").
    for (method, path) in &routes {
        let url = app.url(
            &path
                .replace("{order_id}", "bK8bg5tajNkDpDk25")
                .replace("{job_id}", &ulid::Ulid::generate().to_string()),
        );
        let req = app
            .client
            .request(method.parse().unwrap(), url)
            .basic_auth(USER, Some(PASSWORD));
        let res = req.send().await.unwrap();
        let body = res.text().await.unwrap();
        assert!(
            !body.contains("no route for"),
            "{method} {path} is not served: {body}"
        );
        // Every operation documents its answers and, where it needs them, its credentials.
        let op = &doc["paths"][path][method.to_lowercase()];
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{method} {path}"
        );
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(schemes["webhook_basic"]["scheme"], "basic");
    assert_eq!(schemes["read_basic"]["scheme"], "basic");
    assert_eq!(
        doc["paths"]["/webhook/activity"]["post"]["security"][0]["webhook_basic"],
        serde_json::json!([])
    );
    for code in ["200", "400", "401", "413", "415", "422", "503"] {
        assert!(
            !doc["paths"]["/webhook/activity"]["post"]["responses"][code].is_null(),
            "ingest documents {code}"
        );
    }
}

#[test]
fn the_env_example_lists_every_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
    let names: Vec<&str> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap_or(""))
        .collect();
    assert!(names.len() >= 25, "{names:?}");
    for name in names {
        assert!(
            example.contains(&format!("{name}=")),
            ".env.example lacks {name}"
        );
    }
}
