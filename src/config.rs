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
    /// Where to keep records: sqlite://PATH or dynamodb://TABLE
    /// [default: sqlite://./data/qualia-webhook.db].
    #[arg(long, env = "STORE", value_name = "URL")]
    pub store: Option<String>,
    /// DynamoDB table (the original service's setting); selects DynamoDB when
    /// STORE is not set.
    #[arg(long, env = "DYNAMODB_TABLE", value_name = "TABLE")]
    pub dynamodb_table: Option<String>,
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

        let store = match (non_empty(&args.store), non_empty(&args.dynamodb_table)) {
            (Some(s), _) => StoreLocation::parse(s)
                .map_err(|e| ConfigError::new("STORE", format!("{s:?}: {e}")))?,
            (None, Some(table)) => StoreLocation::DynamoDb {
                table: parse_table_name(table)
                    .map_err(|e| ConfigError::new("DYNAMODB_TABLE", format!("{table:?}: {e}")))?,
            },
            (None, None) => {
                defaulted.push("STORE");
                StoreLocation::parse(DEFAULT_STORE).map_err(|e| ConfigError::new("STORE", e))?
            }
        };

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

        Ok(Settings {
            bind,
            webhook,
            api,
            store,
            max_body_bytes,
            dedup_window,
            quarantine_max,
            log_format,
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
        a.store = Some("postgres://x".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "STORE");
        let mut a = base();
        a.api_username = Some("reader".into());
        assert_eq!(Settings::load(&a).unwrap_err().name, "API_PASSWORD");
    }

    #[test]
    fn dynamodb_table_selects_dynamodb() {
        let mut a = base();
        a.dynamodb_table = Some("qualia-activities".into());
        assert_eq!(
            Settings::load(&a).unwrap().store,
            StoreLocation::DynamoDb {
                table: "qualia-activities".into()
            }
        );
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
