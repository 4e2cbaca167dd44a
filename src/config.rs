//! Settings: read once from flags, the environment and a `.env` file (flags
//! win, then the environment, then `.env`), checked once, with secrets wrapped
//! so they never print.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// A value that must never reach a log line, an error or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A username and the passwords accepted with it (the current one first; a
/// previous one during a rotation).
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub passwords: Vec<Secret>,
}

/// Where records are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite { path: PathBuf },
    DynamoDb { table: String },
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite { path } => write!(f, "sqlite://{}", path.display()),
            StoreLocation::DynamoDb { table } => write!(f, "dynamodb://{table}"),
        }
    }
}

impl StoreLocation {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(
                    "sqlite:// needs a file path, e.g. sqlite://./data/qualia-webhook.db".into(),
                );
            }
            Ok(StoreLocation::Sqlite {
                path: PathBuf::from(path),
            })
        } else if let Some(table) = s.strip_prefix("dynamodb://") {
            parse_table_name(table).map(|table| StoreLocation::DynamoDb { table })
        } else {
            Err("expected sqlite://PATH or dynamodb://TABLE".into())
        }
    }
}

/// DynamoDB's table-name rules: 3 to 255 of `[A-Za-z0-9_.-]`.
fn parse_table_name(s: &str) -> Result<String, String> {
    let ok_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if (3..=255).contains(&s.len()) && ok_chars {
        Ok(s.to_owned())
    } else {
        Err("a DynamoDB table name is 3 to 255 characters of A-Z a-z 0-9 _ - .".into())
    }
}

/// Credentials of the Qualia API.
#[derive(Debug, Clone)]
pub struct QualiaCredentials {
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QualiaEnvironment {
    Sandbox,
    Production,
}

/// How to reach Qualia's GraphQL API.
#[derive(Debug, Clone)]
pub struct QualiaSettings {
    pub environment: QualiaEnvironment,
    pub url: String,
    /// `None`: no credentials, so no enrichment (jobs wait).
    pub credentials: Option<QualiaCredentials>,
    pub timeout: Duration,
}

pub const DEFAULT_QUALIA_TIMEOUT: Duration = Duration::from_secs(10);

impl QualiaSettings {
    fn load(args: &QualiaArgs, defaulted: &mut Vec<&'static str>) -> Result<Self, ConfigError> {
        let environment = match non_empty(&args.qualia_environment)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => {
                defaulted.push("QUALIA_ENVIRONMENT");
                QualiaEnvironment::Sandbox
            }
            Some("sandbox") => QualiaEnvironment::Sandbox,
            Some("production") => QualiaEnvironment::Production,
            Some(other) => {
                return Err(ConfigError::new(
                    "QUALIA_ENVIRONMENT",
                    format!("{other:?} is not sandbox or production"),
                ));
            }
        };
        let url = match non_empty(&args.qualia_api_url) {
            Some(u) => {
                let ok = (u.starts_with("http://") || u.starts_with("https://"))
                    && reqwest::Url::parse(u).is_ok();
                if !ok {
                    return Err(ConfigError::new(
                        "QUALIA_API_URL",
                        format!("{u:?} is not an http(s) URL"),
                    ));
                }
                u.to_owned()
            }
            None => match environment {
                QualiaEnvironment::Sandbox => crate::qualia::SANDBOX_URL.to_owned(),
                QualiaEnvironment::Production => crate::qualia::PRODUCTION_URL.to_owned(),
            },
        };
        let credentials = match (
            non_empty(&args.qualia_api_username),
            non_empty(&args.qualia_api_password),
            non_empty(&args.qualia_api_token),
        ) {
            (Some(u), Some(p), _) => Some(QualiaCredentials {
                username: u.to_owned(),
                password: Secret::new(p),
            }),
            (Some(_), None, _) => {
                return Err(ConfigError::new(
                    "QUALIA_API_PASSWORD",
                    "is not set, but QUALIA_API_USERNAME is",
                ));
            }
            (None, Some(_), _) => {
                return Err(ConfigError::new(
                    "QUALIA_API_USERNAME",
                    "is not set, but QUALIA_API_PASSWORD is",
                ));
            }
            (None, None, Some(token)) => Some(parse_token(token)?),
            (None, None, None) => None,
        };
        let timeout = duration_setting(
            &args.qualia_timeout,
            "QUALIA_TIMEOUT",
            DEFAULT_QUALIA_TIMEOUT,
            defaulted,
        )?;
        if timeout.is_zero() {
            return Err(ConfigError::new("QUALIA_TIMEOUT", "must be more than 0"));
        }
        Ok(QualiaSettings {
            environment,
            url,
            credentials,
            timeout,
        })
    }
}

/// `QUALIA_API_TOKEN`: base64 of `user:password`, as in the original service.
fn parse_token(token: &str) -> Result<QualiaCredentials, ConfigError> {
    use base64::Engine;
    let bad = || ConfigError::new("QUALIA_API_TOKEN", "is not base64 of username:password");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let (u, p) = text.split_once(':').ok_or_else(bad)?;
    if u.is_empty() || p.is_empty() {
        return Err(bad());
    }
    Ok(QualiaCredentials {
        username: u.to_owned(),
        password: Secret::new(p),
    })
}

/// How the enrichment worker paces itself.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Whether this process runs the worker (`serve --no-worker` turns it off).
    pub enabled: bool,
    pub batch_size: u32,
    pub batch_window: Duration,
    pub poll_interval: Duration,
    pub lease: Duration,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub max_attempts: u32,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            enabled: true,
            batch_size: 500,
            batch_window: Duration::from_millis(200),
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(120),
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(300),
            max_attempts: 12,
        }
    }
}

fn duration_setting(
    v: &Option<String>,
    name: &'static str,
    default: Duration,
    defaulted: &mut Vec<&'static str>,
) -> Result<Duration, ConfigError> {
    match non_empty(v) {
        None => {
            defaulted.push(name);
            Ok(default)
        }
        Some(s) => parse_duration(s).map_err(|e| ConfigError::new(name, format!("{s:?}: {e}"))),
    }
}

fn count_setting(
    v: &Option<String>,
    name: &'static str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
    defaulted: &mut Vec<&'static str>,
) -> Result<u32, ConfigError> {
    match non_empty(v) {
        None => {
            defaulted.push(name);
            Ok(default)
        }
        Some(s) => s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                ConfigError::new(
                    name,
                    format!(
                        "{s:?} is not a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )
            }),
    }
}

impl WorkerSettings {
    fn load(args: &WorkerArgs, defaulted: &mut Vec<&'static str>) -> Result<Self, ConfigError> {
        let d = WorkerSettings::default();
        let w = WorkerSettings {
            enabled: true,
            batch_size: count_setting(
                &args.worker_batch_size,
                "WORKER_BATCH_SIZE",
                d.batch_size,
                1..=10_000,
                defaulted,
            )?,
            batch_window: duration_setting(
                &args.worker_batch_window,
                "WORKER_BATCH_WINDOW",
                d.batch_window,
                defaulted,
            )?,
            poll_interval: duration_setting(
                &args.worker_poll_interval,
                "WORKER_POLL_INTERVAL",
                d.poll_interval,
                defaulted,
            )?,
            lease: duration_setting(&args.job_lease, "JOB_LEASE", d.lease, defaulted)?,
            retry_base: duration_setting(&args.retry_base, "RETRY_BASE", d.retry_base, defaulted)?,
            retry_cap: duration_setting(&args.retry_cap, "RETRY_CAP", d.retry_cap, defaulted)?,
            max_attempts: count_setting(
                &args.retry_max_attempts,
                "RETRY_MAX_ATTEMPTS",
                d.max_attempts,
                1..=1000,
                defaulted,
            )?,
        };
        if w.poll_interval.is_zero() {
            return Err(ConfigError::new(
                "WORKER_POLL_INTERVAL",
                "must be more than 0",
            ));
        }
        if w.retry_base.is_zero() || w.retry_cap < w.retry_base {
            return Err(ConfigError::new(
                "RETRY_CAP",
                "RETRY_BASE must be more than 0 and RETRY_CAP at least RETRY_BASE",
            ));
        }
        Ok(w)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

pub const DEFAULT_BIND: &str = "0.0.0.0:8000";
pub const DEFAULT_STORE: &str = "sqlite://./data/qualia-webhook.db";
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(600);
pub const DEFAULT_QUARANTINE_MAX: u64 = 10_000;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the records are, as given.
#[derive(Debug, Clone, Default, Args)]
pub struct StoreArgs {
    /// Where to keep records: sqlite://PATH or dynamodb://TABLE
    /// [default: sqlite://./data/qualia-webhook.db].
    #[arg(long, env = "STORE", value_name = "URL")]
    pub store: Option<String>,
    /// DynamoDB table (the original service's setting); selects DynamoDB when
    /// STORE is not set.
    #[arg(long, env = "DYNAMODB_TABLE", value_name = "TABLE")]
    pub dynamodb_table: Option<String>,
}

impl StoreArgs {
    /// The store location; the second value is true when it was defaulted.
    pub fn location(&self) -> Result<(StoreLocation, bool), ConfigError> {
        match (non_empty(&self.store), non_empty(&self.dynamodb_table)) {
            (Some(s), _) => StoreLocation::parse(s)
                .map(|l| (l, false))
                .map_err(|e| ConfigError::new("STORE", format!("{s:?}: {e}"))),
            (None, Some(table)) => parse_table_name(table)
                .map(|table| (StoreLocation::DynamoDb { table }, false))
                .map_err(|e| ConfigError::new("DYNAMODB_TABLE", format!("{table:?}: {e}"))),
            (None, None) => StoreLocation::parse(DEFAULT_STORE)
                .map(|l| (l, true))
                .map_err(|e| ConfigError::new("STORE", e)),
        }
    }
}

/// Qualia API settings, as given.
#[derive(Debug, Clone, Default, Args)]
pub struct QualiaArgs {
    /// Which Qualia endpoint: sandbox or production [default: sandbox].
    #[arg(long, env = "QUALIA_ENVIRONMENT", value_name = "ENV")]
    pub qualia_environment: Option<String>,
    /// Qualia GraphQL URL, overriding QUALIA_ENVIRONMENT (a local stand-in, a proxy).
    #[arg(long, env = "QUALIA_API_URL", value_name = "URL")]
    pub qualia_api_url: Option<String>,
    /// Qualia API username.
    #[arg(long, env = "QUALIA_API_USERNAME", value_name = "NAME")]
    pub qualia_api_username: Option<String>,
    /// Qualia API password (prefer the environment).
    #[arg(
        long,
        env = "QUALIA_API_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub qualia_api_password: Option<String>,
    /// Qualia API credentials as base64 of user:password (the original
    /// service's setting), instead of the username and password.
    #[arg(
        long,
        env = "QUALIA_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub qualia_api_token: Option<String>,
    /// Timeout of one call to Qualia [default: 10s].
    #[arg(long, env = "QUALIA_TIMEOUT", value_name = "DURATION")]
    pub qualia_timeout: Option<String>,
}

/// Enrichment worker settings, as given.
#[derive(Debug, Clone, Default, Args)]
pub struct WorkerArgs {
    /// Most jobs completed by one `messages` call [default: 500].
    #[arg(long, env = "WORKER_BATCH_SIZE", value_name = "COUNT")]
    pub worker_batch_size: Option<String>,
    /// How long the worker gathers new jobs before calling Qualia [default: 200ms].
    #[arg(long, env = "WORKER_BATCH_WINDOW", value_name = "DURATION")]
    pub worker_batch_window: Option<String>,
    /// How often an idle worker looks for due jobs [default: 1s].
    #[arg(long, env = "WORKER_POLL_INTERVAL", value_name = "DURATION")]
    pub worker_poll_interval: Option<String>,
    /// How long a claimed job stays with its worker before another may take
    /// it [default: 2m]; must be longer than QUALIA_TIMEOUT.
    #[arg(long, env = "JOB_LEASE", value_name = "DURATION")]
    pub job_lease: Option<String>,
    /// First retry delay [default: 1s].
    #[arg(long, env = "RETRY_BASE", value_name = "DURATION")]
    pub retry_base: Option<String>,
    /// Longest retry delay [default: 5m].
    #[arg(long, env = "RETRY_CAP", value_name = "DURATION")]
    pub retry_cap: Option<String>,
    /// Attempts before a job whose message never appears goes dead [default: 12].
    #[arg(long, env = "RETRY_MAX_ATTEMPTS", value_name = "COUNT")]
    pub retry_max_attempts: Option<String>,
}

/// The settings as given (flags or environment). Everything is a string here
/// so that `Settings::load` can name the setting in a one-line error.
#[derive(Debug, Clone, Default, Args)]
pub struct SettingsArgs {
    /// Address to listen on.
    #[arg(long, env = "BIND", value_name = "ADDR")]
    pub bind: Option<String>,
    /// Username Qualia sends with each notification.
    #[arg(long, env = "WEBHOOK_USERNAME", value_name = "NAME")]
    pub webhook_username: Option<String>,
    /// Password Qualia sends with each notification (prefer the environment).
    #[arg(
        long,
        env = "WEBHOOK_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub webhook_password: Option<String>,
    /// Previous webhook password, still accepted while rotating.
    #[arg(
        long,
        env = "WEBHOOK_PASSWORD_PREVIOUS",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub webhook_password_previous: Option<String>,
    /// Username for the read API [default: the webhook username].
    #[arg(long, env = "API_USERNAME", value_name = "NAME")]
    pub api_username: Option<String>,
    /// Password for the read API [default: the webhook password(s)].
    #[arg(
        long,
        env = "API_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub api_password: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Largest accepted notification body, in bytes [default: 65536].
    #[arg(long, env = "MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<String>,
    /// How long a repeated non-message notification counts as a redelivery,
    /// e.g. 10m, 90s, 0 for off [default: 10m].
    #[arg(long, env = "DEDUP_WINDOW", value_name = "DURATION")]
    pub dedup_window: Option<String>,
    /// How many refused (authenticated but invalid) bodies to keep
    /// [default: 10000].
    #[arg(long, env = "QUARANTINE_MAX", value_name = "COUNT")]
    pub quarantine_max: Option<String>,
    /// Log format: json or pretty [default: json]; the level comes from RUST_LOG.
    #[arg(long, env = "LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// How long a client may take to send its request headers before it is
    /// disconnected [default: 10s].
    #[arg(long, env = "HEADER_TIMEOUT", value_name = "DURATION")]
    pub header_timeout: Option<String>,
    /// How long a client may take to send a notification's body before it is
    /// answered 408 [default: 30s].
    #[arg(long, env = "BODY_TIMEOUT", value_name = "DURATION")]
    pub body_timeout: Option<String>,
    /// Most connections served at once; more wait in the listen queue, so
    /// overload costs latency, never memory or a refused notification
    /// [default: 1024].
    #[arg(long, env = "MAX_CONNECTIONS", value_name = "COUNT")]
    pub max_connections: Option<String>,
    /// Require the read credentials on /metrics: true or false [default: false].
    #[arg(long, env = "METRICS_AUTH", value_name = "BOOL")]
    pub metrics_auth: Option<String>,
    #[command(flatten)]
    pub qualia: QualiaArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// A setting that is missing or malformed. Its `Display` is the one line
/// start-up prints; it never contains a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {detail}")]
pub struct ConfigError {
    pub name: &'static str,
    pub detail: String,
}

impl ConfigError {
    fn new(name: &'static str, detail: impl Into<String>) -> Self {
        ConfigError {
            name,
            detail: detail.into(),
        }
    }
}

/// The checked settings of one process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    pub webhook: Credentials,
    pub api: Credentials,
    pub store: StoreLocation,
    pub max_body_bytes: usize,
    pub dedup_window: Duration,
    pub quarantine_max: u64,
    pub log_format: LogFormat,
    /// Whether `/metrics` needs the read credentials.
    pub metrics_auth: bool,
    /// Disconnect clients that take longer to send their headers.
    pub header_timeout: Duration,
    /// Answer 408 to clients that take longer to send a body.
    pub body_timeout: Duration,
    /// Most connections served at once.
    pub max_connections: u32,
    pub qualia: QualiaSettings,
    pub worker: WorkerSettings,
    /// Names of the settings that were not given and took their default.
    pub defaulted: Vec<&'static str>,
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

fn required(v: &Option<String>, name: &'static str, flag: &str) -> Result<String, ConfigError> {
    non_empty(v).map(str::to_owned).ok_or_else(|| {
        ConfigError::new(
            name,
            format!("is not set (set it in the environment, in .env, or with {flag})"),
        )
    })
}

/// Parses `10m`, `90s`, `1h 30m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 10m, 90s, 0)"))
}

impl Settings {
    /// Reads `.env` from the working directory into the environment (values
    /// already set win). Call before parsing the command line.
    pub fn load_dotenv() -> Result<(), ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => Ok(()),
            Err(e) if e.not_found() => Ok(()),
            Err(e) => Err(ConfigError::new(".env", format!("cannot be read: {e}"))),
        }
    }

    /// Checks the given settings; the first problem found is returned.
    pub fn load(args: &SettingsArgs) -> Result<Self, ConfigError> {
        let mut defaulted = Vec::new();
        let mut or_default = |v: &Option<String>, name: &'static str, default: &str| -> String {
            match non_empty(v) {
                Some(s) => s.to_owned(),
                None => {
                    defaulted.push(name);
                    default.to_owned()
                }
            }
        };

        let bind_s = or_default(&args.bind, "BIND", DEFAULT_BIND);
        let bind = bind_s.parse::<SocketAddr>().map_err(|_| {
            ConfigError::new(
                "BIND",
                format!("{bind_s:?} is not an address like 0.0.0.0:8000"),
            )
        })?;

        let webhook_username = required(
            &args.webhook_username,
            "WEBHOOK_USERNAME",
            "--webhook-username",
        )?;
        let webhook_password = required(
            &args.webhook_password,
            "WEBHOOK_PASSWORD",
            "--webhook-password",
        )?;
        let mut webhook_passwords = vec![Secret::new(webhook_password)];
        if let Some(prev) = non_empty(&args.webhook_password_previous) {
            webhook_passwords.push(Secret::new(prev));
        }
        let webhook = Credentials {
            username: webhook_username,
            passwords: webhook_passwords,
        };

        let api = match (non_empty(&args.api_username), non_empty(&args.api_password)) {
            (None, None) => {
                defaulted.push("API_USERNAME");
                defaulted.push("API_PASSWORD");
                webhook.clone()
            }
            (Some(u), Some(p)) => Credentials {
                username: u.to_owned(),
                passwords: vec![Secret::new(p)],
            },
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "API_PASSWORD",
                    "is not set, but API_USERNAME is (set both or neither)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "API_USERNAME",
                    "is not set, but API_PASSWORD is (set both or neither)",
                ));
            }
        };

        let (store, store_defaulted) = args.store.location()?;
        if store_defaulted {
            defaulted.push("STORE");
        }

        let max_body_bytes = match non_empty(&args.max_body_bytes) {
            None => {
                defaulted.push("MAX_BODY_BYTES");
                DEFAULT_MAX_BODY_BYTES
            }
            Some(s) => match s.trim().parse::<usize>() {
                Ok(n) if (256..=16 * 1024 * 1024).contains(&n) => n,
                _ => {
                    return Err(ConfigError::new(
                        "MAX_BODY_BYTES",
                        format!("{s:?} is not a number of bytes between 256 and 16777216"),
                    ));
                }
            },
        };

        let dedup_window = match non_empty(&args.dedup_window) {
            None => {
                defaulted.push("DEDUP_WINDOW");
                DEFAULT_DEDUP_WINDOW
            }
            Some(s) => parse_duration(s)
                .map_err(|e| ConfigError::new("DEDUP_WINDOW", format!("{s:?}: {e}")))?,
        };

        let quarantine_max = match non_empty(&args.quarantine_max) {
            None => {
                defaulted.push("QUARANTINE_MAX");
                DEFAULT_QUARANTINE_MAX
            }
            Some(s) => s.trim().parse::<u64>().map_err(|_| {
                ConfigError::new("QUARANTINE_MAX", format!("{s:?} is not a whole number"))
            })?,
        };

        let log_format = match non_empty(&args.log_format)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => {
                defaulted.push("LOG_FORMAT");
                LogFormat::Json
            }
            Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("{other:?} is not json or pretty"),
                ));
            }
        };

        let metrics_auth = match non_empty(&args.metrics_auth)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => {
                defaulted.push("METRICS_AUTH");
                false
            }
            Some("true" | "1" | "yes" | "on") => true,
            Some("false" | "0" | "no" | "off") => false,
            Some(other) => {
                return Err(ConfigError::new(
                    "METRICS_AUTH",
                    format!("{other:?} is not true or false"),
                ));
            }
        };
        let header_timeout = duration_setting(
            &args.header_timeout,
            "HEADER_TIMEOUT",
            DEFAULT_HEADER_TIMEOUT,
            &mut defaulted,
        )?;
        if header_timeout.is_zero() {
            return Err(ConfigError::new("HEADER_TIMEOUT", "must be more than 0"));
        }
        let body_timeout = duration_setting(
            &args.body_timeout,
            "BODY_TIMEOUT",
            DEFAULT_BODY_TIMEOUT,
            &mut defaulted,
        )?;
        if body_timeout.is_zero() {
            return Err(ConfigError::new("BODY_TIMEOUT", "must be more than 0"));
        }
        let max_connections = count_setting(
            &args.max_connections,
            "MAX_CONNECTIONS",
            DEFAULT_MAX_CONNECTIONS,
            1..=1_000_000,
            &mut defaulted,
        )?;
        let qualia = QualiaSettings::load(&args.qualia, &mut defaulted)?;
        let worker = WorkerSettings::load(&args.worker, &mut defaulted)?;
        if worker.lease <= qualia.timeout + Duration::from_secs(5) {
            return Err(ConfigError::new(
                "JOB_LEASE",
                format!(
                    "{} must be longer than QUALIA_TIMEOUT ({}) plus 5s, or a slow call could \
                     let a second worker take the same jobs",
                    humantime::format_duration(worker.lease),
                    humantime::format_duration(qualia.timeout)
                ),
            ));
        }

        Ok(Settings {
            bind,
            webhook,
            api,
            store,
            max_body_bytes,
            dedup_window,
            quarantine_max,
            log_format,
            metrics_auth,
            header_timeout,
            body_timeout,
            max_connections,
            qualia,
            worker,
            defaulted,
        })
    }

    /// Settings for tests and embedding: the given webhook credentials, a
    /// SQLite file, every other setting at its default, listening on an
    /// ephemeral loopback port.
    pub fn new(username: &str, password: &str, store: StoreLocation) -> Self {
        let creds = Credentials {
            username: username.to_owned(),
            passwords: vec![Secret::new(password)],
        };
        Settings {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            webhook: creds.clone(),
            api: creds,
            store,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            dedup_window: DEFAULT_DEDUP_WINDOW,
            quarantine_max: DEFAULT_QUARANTINE_MAX,
            log_format: LogFormat::Json,
            metrics_auth: false,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            qualia: QualiaSettings {
                environment: QualiaEnvironment::Sandbox,
                url: crate::qualia::SANDBOX_URL.to_owned(),
                credentials: None,
                timeout: DEFAULT_QUALIA_TIMEOUT,
            },
            worker: WorkerSettings::default(),
            defaulted: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> SettingsArgs {
        SettingsArgs {
            webhook_username: Some("qualia".into()),
            webhook_password: Some("s3cret-Password".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_apply() {
        let s = Settings::load(&base()).unwrap();
        assert_eq!(s.bind.to_string(), "0.0.0.0:8000");
        assert_eq!(
            s.store,
            StoreLocation::Sqlite {
                path: "./data/qualia-webhook.db".into()
            }
        );
        assert_eq!(s.max_body_bytes, 65536);
        assert_eq!(s.dedup_window, Duration::from_secs(600));
        assert_eq!(s.api.username, "qualia");
        assert!(s.defaulted.contains(&"STORE"));
    }

    #[test]
    fn missing_and_malformed_settings_are_named() {
        let mut a = base();
        a.webhook_password = None;
        assert_eq!(Settings::load(&a).unwrap_err().name, "WEBHOOK_PASSWORD");
        let mut a = base();
        a.max_body_bytes = Some("lots".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "MAX_BODY_BYTES");
        let mut a = base();
        a.dedup_window = Some("soon".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "DEDUP_WINDOW");
        let mut a = base();
        a.bind = Some("nowhere".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "BIND");
        let mut a = base();
        a.store.store = Some("postgres://x".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "STORE");
        let mut a = base();
        a.api_username = Some("reader".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "API_PASSWORD");
    }

    #[test]
    fn dynamodb_table_selects_dynamodb() {
        let mut a = base();
        a.store.dynamodb_table = Some("qualia-activities".into());
        assert_eq!(
            Settings::load(&a).unwrap().store,
            StoreLocation::DynamoDb {
                table: "qualia-activities".into()
            }
        );
    }

    #[test]
    fn qualia_credentials_from_a_token_or_a_pair() {
        let mut a = base();
        // base64("vendor:pa:ss")
        a.qualia.qualia_api_token = Some("dmVuZG9yOnBhOnNz".into());
        let s = Settings::load(&a).unwrap();
        let c = s.qualia.credentials.unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.expose()),
            ("vendor", "pa:ss")
        );
        assert_eq!(s.qualia.url, crate::qualia::SANDBOX_URL);

        a.qualia.qualia_api_token = Some("not base64!".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "QUALIA_API_TOKEN");

        let mut a = base();
        a.qualia.qualia_environment = Some("production".into());
        a.qualia.qualia_api_username = Some("u".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "QUALIA_API_PASSWORD");
        a.qualia.qualia_api_password = Some("p".into());
        let s = Settings::load(&a).unwrap();
        assert_eq!(s.qualia.url, crate::qualia::PRODUCTION_URL);
        assert!(
            Settings::load(&base())
                .unwrap()
                .qualia
                .credentials
                .is_none()
        );
    }

    #[test]
    fn a_lease_shorter_than_the_qualia_timeout_is_refused() {
        let mut a = base();
        a.worker.job_lease = Some("5s".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "JOB_LEASE");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("later").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::load(&base()).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret-Password"), "{shown}");
    }
}
