//! Configuration shared by the reference participants, and the loader every binary uses.
//!
//! Each binary has one typed `Config` (in its module). It is built from, in order: the
//! defaults, an optional TOML file (`--config FILE` or `JETSAGA_CONFIG`), then environment
//! variables `JETSAGA_<SECTION>__<KEY>` (e.g. `JETSAGA_NATS__URL`,
//! `JETSAGA_FAULTS__FAIL_RATE=0.1`; the key's `_` stand for the file's `-`; values are TOML
//! values or plain strings), and finally `validate()`. Any error names the field; the binaries
//! exit with status 64 on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "JETSAGA_";
/// The environment variable naming a config file.
pub const CONFIG_ENV: &str = "JETSAGA_CONFIG";

/// A configuration that is not usable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A field has the wrong type or is unknown.
    #[error("config field `{field}`: {message}")]
    Field {
        /// Dotted path, e.g. `faults.latency`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Bad command-line arguments.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// A field error, for `validate()` implementations.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::Field {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// A binary's configuration.
pub trait Load: Serialize + DeserializeOwned + Default {
    /// Checks what serde cannot.
    ///
    /// # Errors
    ///
    /// [`Error::Field`] naming the first invalid field.
    fn validate(&self) -> Result<(), Error>;

    /// Its logging and tracing settings.
    fn telemetry(&self) -> &Telemetry;
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Cli<T> {
    /// Run with this configuration.
    Run(T),
    /// Print this help text and exit.
    Help(String),
}

/// Loads `T` from the command line (`--config FILE`, `--help`) and the process environment.
///
/// # Errors
///
/// Any [`Error`], naming the field or file.
pub fn from_args<T: Load>(
    binary: &str,
    args: impl IntoIterator<Item = String>,
) -> Result<Cli<T>, Error> {
    let mut file = None;
    let mut args = args.into_iter().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                return Ok(Cli::Help(format!(
                    "usage: {binary} [--config FILE]\n\n\
                     Configuration: defaults, then FILE (or ${CONFIG_ENV}), then environment \
                     variables {ENV_PREFIX}<SECTION>__<KEY>.\nDefaults:\n\n{}",
                    toml::to_string(&T::default()).unwrap_or_default()
                )));
            }
            "-c" | "--config" => {
                let path = args
                    .next()
                    .ok_or_else(|| Error::Usage("--config needs a file".to_owned()))?;
                file = Some(PathBuf::from(path));
            }
            other => {
                if let Some(path) = other.strip_prefix("--config=") {
                    file = Some(PathBuf::from(path));
                } else {
                    return Err(Error::Usage(format!(
                        "unknown argument {other:?} (try --help)"
                    )));
                }
            }
        }
    }
    let file = file.or_else(|| {
        std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    load(file.as_deref(), std::env::vars()).map(Cli::Run)
}

/// Loads `T`: defaults, then `file`, then `env` overrides, then `validate()`.
///
/// # Errors
///
/// Any [`Error`], naming the field or file.
pub fn load<T: Load>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, Error> {
    let mut value = toml::Value::try_from(T::default())
        .map_err(|e| Error::field("(defaults)", e.to_string()))?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let overlay: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        merge(&mut value, toml::Value::Table(overlay));
    }
    if let toml::Value::Table(root) = &mut value {
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let section = section.to_ascii_lowercase().replace('_', "-");
            let key = key.to_ascii_lowercase().replace('_', "-");
            // Other services' variables share the prefix: only sections this binary has count.
            if let Some(toml::Value::Table(table)) = root.get_mut(&section) {
                table.insert(key, env_value(&raw));
            }
        }
    }
    let config: T = serde_path_to_error::deserialize(value).map_err(|e| Error::Field {
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    config.validate()?;
    Ok(config)
}

/// An environment value as TOML (`0.5`, `true`, `["a"]`, `{ sku-1 = 5 }`) or else a string.
fn env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut table) => table
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(base), toml::Value::Table(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    // Maps the user writes (a catalogue) replace the default rather than extend it.
                    Some(existing @ toml::Value::Table(_))
                        if value.is_table() && key != "catalogue" =>
                    {
                        merge(existing, value);
                    }
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// `Duration`s as strings: `250ms`, `10s`, `5m`, `1h`, `1m30s`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `d` as text.
    ///
    /// # Errors
    ///
    /// Those of the serializer.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&jetsaga_sagas::definition::format_duration(*d))
    }

    /// Reads a duration from text.
    ///
    /// # Errors
    ///
    /// When the text is not a duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        jetsaga_sagas::definition::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// How to reach NATS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Nats {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// A `.creds` file (JWT + nkey), if the server requires one.
    pub creds_file: Option<PathBuf>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// Require TLS.
    pub tls: bool,
    /// Replicas of the streams and KV buckets this service creates when missing.
    pub replicas: usize,
}

impl Default for Nats {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            creds_file: None,
            user: None,
            password: None,
            token: None,
            tls: false,
            replicas: 1,
        }
    }
}

impl Nats {
    /// Checks the section.
    ///
    /// # Errors
    ///
    /// Naming the invalid field.
    pub fn validate(&self) -> Result<(), Error> {
        if self.url.trim().is_empty() {
            return Err(Error::field("nats.url", "must not be empty"));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(Error::field(
                "nats.password",
                "user and password go together",
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(Error::field("nats.replicas", "must be between 1 and 5"));
        }
        Ok(())
    }

    /// Connects with these settings.
    ///
    /// # Errors
    ///
    /// When the server cannot be reached or refuses the credentials.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, crate::Error> {
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .require_tls(self.tls);
        if let Some(file) = &self.creds_file {
            options = options
                .credentials_file(file)
                .await
                .map_err(|e| crate::Error::Nats(format!("credentials file: {e}")))?;
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        let urls: Vec<async_nats::ServerAddr> = self
            .url
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| crate::Error::Nats(format!("nats.url: {e}")))?;
        options
            .connect(urls)
            .await
            .map_err(|e| crate::Error::Nats(e.to_string()))
    }
}

/// The durable consumer and its handlers' pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Consumer {
    /// Commands handled at the same time.
    pub concurrency: usize,
    /// Delivered but unacknowledged commands, across instances.
    pub max_ack_pending: i64,
    /// Redelivery after this long without an ack.
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    /// Deliveries per command before a retryable failure is recorded.
    pub max_deliver: u32,
    /// How long shutdown waits for commands in flight.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
}

impl Default for Consumer {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_ack_pending: 1024,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Consumer {
    /// Checks the section.
    ///
    /// # Errors
    ///
    /// Naming the invalid field.
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=4096).contains(&self.concurrency) {
            return Err(Error::field(
                "consumer.concurrency",
                "must be between 1 and 4096",
            ));
        }
        if self.max_ack_pending < self.concurrency as i64 {
            return Err(Error::field(
                "consumer.max-ack-pending",
                "must be at least consumer.concurrency",
            ));
        }
        if self.ack_wait < Duration::from_secs(1) {
            return Err(Error::field("consumer.ack-wait", "must be at least 1s"));
        }
        if self.max_deliver == 0 {
            return Err(Error::field("consumer.max-deliver", "must be at least 1"));
        }
        Ok(())
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Metrics {
    /// Where `/metrics` and `/healthz` are served; empty to serve nothing.
    pub listen: String,
}

impl Metrics {
    /// The default for a binary listening on `port`.
    pub fn on_port(port: u16) -> Self {
        Self {
            listen: format!("127.0.0.1:{port}"),
        }
    }

    /// The parsed address, `None` when disabled.
    pub fn address(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    /// Checks the section.
    ///
    /// # Errors
    ///
    /// Naming the invalid field.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.listen.is_empty() && self.address().is_none() {
            return Err(Error::field(
                "metrics.listen",
                format!("{:?} is not an address like 127.0.0.1:9101", self.listen),
            ));
        }
        Ok(())
    }
}

/// Logs and traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Telemetry {
    /// OTLP/gRPC endpoint for traces (e.g. `http://127.0.0.1:4317`); empty: no export.
    pub otlp_endpoint: String,
    /// `text` or `json` log lines.
    pub log_format: String,
    /// Log filter (`RUST_LOG` syntax), e.g. `info` or `jetsaga_participant=debug`.
    pub log_filter: String,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            log_format: "text".to_owned(),
            log_filter: "info".to_owned(),
        }
    }
}

impl Telemetry {
    /// Checks the section.
    ///
    /// # Errors
    ///
    /// Naming the invalid field.
    pub fn validate(&self) -> Result<(), Error> {
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(Error::field(
                "telemetry.log-format",
                "must be \"text\" or \"json\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::inventory::Config;

    #[test]
    fn defaults_then_file_then_env_then_validate() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "[nats]\nurl = \"nats://file:4222\"\n[faults]\nlatency = \"50ms\"\n[inventory]\ncatalogue = {{ a = 1 }}").unwrap();
        let env = [
            ("JETSAGA_FAULTS__FAIL_RATE", "0.25"),
            ("JETSAGA_FAULTS__FAIL_ACTIONS", "[\"commit\"]"),
            ("JETSAGA_CONSUMER__ACK_WAIT", "1m"),
            (
                "JETSAGA_HTTP__LISTEN",
                "ignored: not a section of this binary",
            ),
            ("OTHER", "x"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config: Config = load(Some(file.path()), env).unwrap();
        assert_eq!(config.nats.url, "nats://file:4222");
        assert_eq!(config.faults.latency, Duration::from_millis(50));
        assert_eq!(config.faults.fail_rate, 0.25);
        assert_eq!(config.faults.fail_actions, ["commit"]);
        assert_eq!(config.consumer.ack_wait, Duration::from_secs(60));
        assert_eq!(
            config.inventory.catalogue.len(),
            1,
            "a catalogue replaces the default"
        );
        assert_eq!(config.metrics.listen, "127.0.0.1:9101");

        let bad = |k: &str, v: &str| {
            let err = load::<Config>(None, [(k.to_owned(), v.to_owned())]).unwrap_err();
            match err {
                Error::Field { field, .. } => field,
                other => panic!("{other}"),
            }
        };
        assert_eq!(bad("JETSAGA_FAULTS__FAIL_RATE", "2"), "faults.fail-rate");
        assert_eq!(bad("JETSAGA_FAULTS__LATENCY", "soon"), "faults.latency");
        assert_eq!(
            bad("JETSAGA_CONSUMER__CONCURRENCY", "0"),
            "consumer.concurrency"
        );
        assert_eq!(bad("JETSAGA_NATS__TYPO", "1"), "nats.typo");
    }
}
