//! `qualia-webhook check`: is this setup right? One line per check, each
//! failure with its cause and what to do. Never prints a secret.

use std::time::Duration;

use serde::Serialize;

use crate::config::{Credentials, Settings, SettingsArgs, StoreLocation};
use crate::http::error::chain;
use crate::qualia::{QualiaClient, QualiaError};
use crate::store;

#[derive(Debug, Clone, Serialize)]
pub struct CheckLine {
    pub check: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl CheckLine {
    fn pass(check: &'static str, detail: impl Into<String>) -> Self {
        CheckLine {
            check,
            ok: true,
            detail: detail.into(),
        }
    }
    fn fail(check: &'static str, detail: impl Into<String>) -> Self {
        CheckLine {
            check,
            ok: false,
            detail: detail.into(),
        }
    }

    /// `✓ check: detail` or `✗ check: detail`.
    pub fn render(&self) -> String {
        format!(
            "{} {}: {}",
            if self.ok { "✓" } else { "✗" },
            self.check,
            self.detail
        )
    }
}

const COMMON_PASSWORDS: &[&str] = &[
    "password",
    "passw0rd",
    "changeme",
    "change-me",
    "change-me-now",
    "secret",
    "qualia",
    "webhook",
    "admin",
    "letmein",
    "123456",
    "12345678",
    "123456789",
    "qwerty",
    "test",
];

/// Why a password is too weak to guard the webhook, if it is.
pub fn weakness(credentials: &Credentials) -> Option<String> {
    for password in &credentials.passwords {
        let p = password.expose();
        let lower = p.to_ascii_lowercase();
        if p.chars().count() < 12 {
            return Some("is shorter than 12 characters".into());
        }
        if lower == credentials.username.to_ascii_lowercase() {
            return Some("equals the username".into());
        }
        if COMMON_PASSWORDS.iter().any(|c| lower == *c) {
            return Some("is a common password".into());
        }
        let first = p.chars().next();
        if p.chars().all(|c| Some(c) == first) {
            return Some("repeats one character".into());
        }
    }
    None
}

/// Runs every check. The settings come first; the others need them.
pub async fn run(args: &SettingsArgs) -> Vec<CheckLine> {
    let settings = match Settings::load(args) {
        Ok(s) => s,
        Err(e) => {
            return vec![CheckLine::fail(
                "settings",
                format!("{e} — fix it in the environment, .env or the flags"),
            )];
        }
    };
    let mut lines = Vec::new();
    lines.push(CheckLine::pass(
        "settings",
        if settings.defaulted.is_empty() {
            "all given".to_owned()
        } else {
            format!("parse; defaulted: {}", settings.defaulted.join(", "))
        },
    ));
    lines.push(credentials_line(
        "webhook credentials",
        "WEBHOOK_PASSWORD",
        &settings.webhook,
    ));
    if settings.api.username != settings.webhook.username
        || !settings.defaulted.contains(&"API_PASSWORD")
    {
        lines.push(credentials_line(
            "read credentials",
            "API_PASSWORD",
            &settings.api,
        ));
    }
    lines.push(store_line(&settings).await);
    lines.push(qualia_line(&settings).await);
    lines.push(listen_line(&settings).await);
    lines
}

fn credentials_line(check: &'static str, setting: &str, c: &Credentials) -> CheckLine {
    match weakness(c) {
        None => CheckLine::pass(check, format!("set for user {:?}", c.username)),
        Some(why) => CheckLine::fail(
            check,
            format!(
                "{setting} {why} — choose a long random one (e.g. `openssl rand -base64 24`) \
                 and enter the same in Qualia"
            ),
        ),
    }
}

async fn store_line(settings: &Settings) -> CheckLine {
    let opened = tokio::time::timeout(
        Duration::from_secs(30),
        store::open(&settings.store, settings.quarantine_max),
    )
    .await;
    let store = match opened {
        Err(_) => {
            return CheckLine::fail(
                "store",
                format!("{} did not answer within 30 s", settings.store),
            );
        }
        Ok(Err(e)) => {
            let hint = match &settings.store {
                StoreLocation::Sqlite { .. } => {
                    "— check that the folder exists or can be created and is writable, or set STORE"
                }
                StoreLocation::DynamoDb { .. } => {
                    "— check AWS_REGION, the AWS credentials and the table"
                }
            };
            return CheckLine::fail("store", format!("{} {hint}", chain(&e)));
        }
        Ok(Ok(s)) => s,
    };
    let pinged = store.ping().await;
    store.close().await;
    match (pinged, &settings.store) {
        (Err(e), _) => CheckLine::fail(
            "store",
            format!("{} does not answer: {}", settings.store, chain(&e)),
        ),
        (Ok(()), StoreLocation::Sqlite { .. }) => CheckLine::pass(
            "store",
            format!("{} is writable and its schema is current", settings.store),
        ),
        (Ok(()), StoreLocation::DynamoDb { .. }) => CheckLine::pass(
            "store",
            format!(
                "{}: table, keys, index GSI1 and TTL as expected",
                settings.store
            ),
        ),
    }
}

async fn qualia_line(settings: &Settings) -> CheckLine {
    let client = match QualiaClient::new(&settings.qualia) {
        Err(e) => return CheckLine::fail("qualia api", e),
        Ok(None) => {
            return CheckLine::fail(
                "qualia api",
                "no credentials: message details will not be fetched and message jobs wait — set \
                 QUALIA_API_USERNAME and QUALIA_API_PASSWORD (or QUALIA_API_TOKEN) from Qualia's \
                 Manage > API page",
            );
        }
        Ok(Some(c)) => c,
    };
    let url = client.url().to_owned();
    match client.check_credentials().await {
        Ok(()) => CheckLine::pass("qualia api", format!("{url} accepts the credentials")),
        Err(QualiaError::Auth { status }) => CheckLine::fail(
            "qualia api",
            format!(
                "{url} refused the credentials (HTTP {status}) — check QUALIA_API_USERNAME/\
                 QUALIA_API_PASSWORD (or QUALIA_API_TOKEN) and QUALIA_ENVIRONMENT: sandbox and \
                 production credentials differ"
            ),
        ),
        Err(QualiaError::RateLimited { .. }) => CheckLine::fail(
            "qualia api",
            format!("{url} is rate-limiting these credentials — try again in a minute"),
        ),
        Err(e) => CheckLine::fail(
            "qualia api",
            format!(
                "cannot use {url}: {e} — check the network, QUALIA_API_URL and QUALIA_ENVIRONMENT"
            ),
        ),
    }
}

async fn listen_line(settings: &Settings) -> CheckLine {
    match tokio::net::TcpListener::bind(settings.bind).await {
        Ok(_) => CheckLine::pass("listen address", format!("{} is free", settings.bind)),
        Err(e) => CheckLine::fail(
            "listen address",
            format!(
                "cannot listen on {}: {e} — is qualia-webhook already running? choose another BIND",
                settings.bind
            ),
        ),
    }
}
