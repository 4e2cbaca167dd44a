//! Spawning the real application and talking to it over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use qualia_webhook::activity::ActivityType;
use qualia_webhook::config::{Settings, StoreLocation};
use qualia_webhook::startup::Application;
use qualia_webhook::store::Store;
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const USER: &str = "qualia-test";
pub const PASSWORD: &str = "correct-horse-battery-staple";

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub settings: Settings,
    pub dir: Arc<TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

pub fn db_location(dir: &TempDir) -> StoreLocation {
    StoreLocation::Sqlite {
        path: dir.path().join("data").join("test.db"),
    }
}

pub fn test_settings(dir: &TempDir) -> Settings {
    Settings::new(USER, PASSWORD, db_location(dir))
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

pub async fn spawn_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let mut settings = test_settings(&dir);
    adjust(&mut settings);
    spawn_on(settings, dir).await
}

/// Starts the application with these settings; `dir` is kept alive with it.
pub async fn spawn_on(settings: Settings, dir: Arc<TempDir>) -> TestApp {
    let app = Application::build(&settings)
        .await
        .expect("application builds");
    spawn_built(app, settings, dir)
}

pub fn spawn_built(app: Application, settings: Settings, dir: Arc<TempDir>) -> TestApp {
    let addr = app.local_addr();
    let store = app.store();
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        client: reqwest::Client::new(),
        store,
        settings,
        dir,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Posts a notification with the right credentials and content type.
    pub async fn post(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/webhook/activity"))
            .basic_auth(USER, Some(PASSWORD))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Posts, expects 200, returns the answer.
    pub async fn post_ok(&self, body: &Value) -> Value {
        let res = self.post(body).await;
        assert_eq!(res.status(), 200, "posting {body}");
        res.json().await.expect("JSON answer")
    }

    /// GET with the read credentials; expects 200 and returns the JSON answer.
    pub async fn get_json(&self, path: &str) -> Value {
        let res = self
            .client
            .get(self.url(path))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("request sent");
        assert_eq!(res.status(), 200, "GET {path}");
        res.json().await.expect("JSON answer")
    }

    pub async fn timeline(&self, order_id: &str) -> Vec<Value> {
        let v = self
            .get_json(&format!("/orders/{order_id}/activities"))
            .await;
        v["activities"].as_array().cloned().unwrap_or_default()
    }

    /// Stops gracefully (in-flight requests finish, the store closes) and
    /// hands back the folder holding the store.
    pub async fn stop(mut self) -> (Settings, Arc<TempDir>) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await
                .expect("server task")
                .expect("server stopped cleanly");
        }
        (self.settings.clone(), Arc::clone(&self.dir))
    }
}

/// A fresh id in Qualia's style (17 alphanumerics).
pub fn new_id() -> String {
    let u = ulid::Ulid::generate().to_string();
    u[u.len() - 17..].to_owned()
}

/// The sample notification of each type, as documented by Qualia, for a
/// given order (a fresh message id for a message): the same samples `fire`
/// sends.
pub fn sample(t: ActivityType, order_id: &str) -> Value {
    qualia_webhook::tools::fire::sample(t, order_id)
}

/// `Basic base64(user:password)`.
pub fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Sends raw bytes over one connection and returns everything answered
/// until the server closes it (or 10 s pass).
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut out),
    )
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

pub const QUALIA_USER: &str = "vendor-api";
pub const QUALIA_PASSWORD: &str = "vendor-api-password";

/// A Qualia stand-in on a free loopback port.
pub struct Qualia {
    pub standin: qualia_webhook::standin::StandIn,
    pub url: String,
    _task: tokio::task::JoinHandle<()>,
}

pub async fn spawn_qualia() -> Qualia {
    let standin =
        qualia_webhook::standin::StandIn::new(QUALIA_USER, QUALIA_PASSWORD, Default::default());
    let (addr, task) = standin
        .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("stand-in listens");
    Qualia {
        standin,
        url: format!("http://{addr}{}", qualia_webhook::standin::GRAPHQL_PATH),
        _task: task,
    }
}

/// Points the settings at the stand-in with fast, test-sized timings.
pub fn use_qualia(s: &mut Settings, url: &str) {
    s.qualia.url = url.to_owned();
    s.qualia.credentials = Some(qualia_webhook::config::QualiaCredentials {
        username: QUALIA_USER.into(),
        password: qualia_webhook::config::Secret::new(QUALIA_PASSWORD),
    });
    s.qualia.timeout = std::time::Duration::from_secs(2);
    s.worker.batch_window = std::time::Duration::from_millis(30);
    s.worker.poll_interval = std::time::Duration::from_millis(50);
    s.worker.retry_base = std::time::Duration::from_millis(20);
    s.worker.retry_cap = std::time::Duration::from_millis(200);
    s.worker.lease = std::time::Duration::from_secs(5);
}

/// The app with its worker talking to a fresh stand-in.
pub async fn spawn_with_qualia(adjust: impl FnOnce(&mut Settings)) -> (TestApp, Qualia) {
    let qualia = spawn_qualia().await;
    let app = spawn_with(|s| {
        use_qualia(s, &qualia.url);
        adjust(s);
    })
    .await;
    (app, qualia)
}

/// Waits until `check` is true, polling every 20 ms, for at most `limit`.
pub async fn eventually<F, Fut>(limit: std::time::Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

impl TestApp {
    pub async fn job_count(&self, state: &str) -> u64 {
        self.get_json(&format!("/jobs?state={state}&limit=500"))
            .await["count"]
            .as_u64()
            .unwrap_or(0)
    }

    pub async fn messages_of(&self, order_id: &str) -> Vec<Value> {
        self.get_json(&format!("/webhook/activity/{order_id}"))
            .await["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// Whether the DynamoDB-compatible test server is up (`scripts/test` starts
/// one and sets `QW_TEST_DYNAMODB=1` with the AWS_* settings pointing at it).
pub fn dynamodb_enabled() -> bool {
    let on = std::env::var("QW_TEST_DYNAMODB").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("SKIPPED: no DynamoDB test server (run ./scripts/test to include these tests)");
    }
    on
}

/// Creates a fresh table with `table create`'s code; `None` when DynamoDB
/// tests are not enabled.
pub async fn dynamodb_table() -> Option<String> {
    if !dynamodb_enabled() {
        return None;
    }
    let table = format!(
        "qw-test-{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    );
    let client = qualia_webhook::store::dynamodb::client().await;
    qualia_webhook::store::dynamodb::create_table(&client, &table)
        .await
        .expect("test table created");
    Some(table)
}
