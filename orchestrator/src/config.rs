//! The orchestrator's configuration: defaults, then an optional TOML file, then
//! `JETSAGA_<SECTION>__<KEY>` environment variables, then [`Config::validate`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a configuration was refused; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file, or an environment override, does not fit the schema.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value is out of range.
    #[error("invalid config: {field}: {problem}")]
    Invalid {
        /// `section.key` of the field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// Everything `jetsaga serve` needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// How to reach NATS.
    pub nats: Nats,
    /// The HTTP listener.
    pub http: Http,
    /// How the streams are created.
    pub streams: Streams,
    /// The driver.
    pub engine: Engine,
}

/// NATS connection settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Nats {
    /// Server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// A `.creds` file (JWT + nkey seed).
    pub credentials_file: Option<PathBuf>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password, with `user`.
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// A CA certificate (PEM) to trust; enables TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `tls-key-file`.
    pub tls_cert_file: Option<PathBuf>,
    /// Client key (PEM), with `tls-cert-file`.
    pub tls_key_file: Option<PathBuf>,
    /// How long to wait for the first connection.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
}

impl Default for Nats {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            credentials_file: None,
            user: None,
            password: None,
            token: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// HTTP settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Http {
    /// Listen address of the API, web page and `/metrics`. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// Where JetStream keeps the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    /// On disk (the default).
    File,
    /// In memory (tests, benchmarks).
    Memory,
}

/// Stream settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Streams {
    /// File or memory storage.
    pub storage: Storage,
    /// Replicas per stream (3 in a 3-node cluster).
    pub replicas: usize,
    /// How long journals (saga state), commands and replies are kept. Finished sagas
    /// can be inspected, and participants' recorded replies stay valid, this long.
    #[serde(with = "duration")]
    pub retention: Duration,
}

impl Default for Streams {
    fn default() -> Self {
        Self {
            storage: Storage::File,
            replicas: 1,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Driver settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Engine {
    /// A directory of extra saga definitions (`*.toml`); order-creation is built in.
    pub definitions: Option<PathBuf>,
    /// Inputs (replies, starts, timers) in flight at once per consumer.
    pub max_in_flight: usize,
    /// How long JetStream waits for an ack before redelivering an input.
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    /// Deliveries of one input before JetStream gives up (and it is dead-lettered).
    pub max_deliver: i64,
    /// How long shutdown waits for in-flight work.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// A name for this instance in logs and the NATS connection.
    pub instance: String,
}

impl Default for Engine {
    fn default() -> Self {
        Self {
            definitions: None,
            max_in_flight: 4096,
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            shutdown_grace: Duration::from_secs(10),
            instance: "jetsaga".to_owned(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` if given, then `JETSAGA_*` variables from `vars`.
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| Error::Parse(format!("{}: {}", path.display(), e.message())))?
            }
            None => toml::Table::new(),
        };
        overlay_env(&mut table, vars)?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| Error::Parse(format!("{}: {}", e.path(), e.inner().message())))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and combinations serde cannot.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |field, problem: &str| {
            Err(Error::Invalid {
                field,
                problem: problem.to_owned(),
            })
        };
        if self.nats.url.split(',').any(|u| u.trim().is_empty()) {
            return invalid("nats.url", "empty server URL");
        }
        for url in self.nats.url.split(',') {
            if url.trim().parse::<async_nats::ServerAddr>().is_err() {
                return Err(Error::Invalid {
                    field: "nats.url",
                    problem: format!("\"{url}\" is not a NATS server URL"),
                });
            }
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return invalid("nats.user", "user and password go together");
        }
        if self.nats.tls_cert_file.is_some() != self.nats.tls_key_file.is_some() {
            return invalid(
                "nats.tls-cert-file",
                "tls-cert-file and tls-key-file go together",
            );
        }
        if self.nats.connect_timeout.is_zero() {
            return invalid("nats.connect-timeout", "must be greater than zero");
        }
        if !(1..=5).contains(&self.streams.replicas) {
            return invalid("streams.replicas", "must be between 1 and 5");
        }
        if self.streams.retention < Duration::from_secs(60) {
            return invalid("streams.retention", "must be at least 1m");
        }
        if self.engine.max_in_flight == 0 || self.engine.max_in_flight > 100_000 {
            return invalid("engine.max-in-flight", "must be between 1 and 100000");
        }
        if self.engine.ack_wait < Duration::from_secs(1) {
            return invalid("engine.ack-wait", "must be at least 1s");
        }
        if self.engine.max_deliver < 2 {
            return invalid("engine.max-deliver", "must be at least 2");
        }
        if !jetsaga_sagas::definition::is_subject_token(&self.engine.instance) {
            return invalid(
                "engine.instance",
                "must be a single word (no dots or spaces)",
            );
        }
        Ok(())
    }
}

/// Applies `JETSAGA_<SECTION>__<KEY>=value` over the table. `KEY` is upper snake
/// case of the kebab-case field (`JETSAGA_ENGINE__MAX_IN_FLIGHT`). Values are read
/// as TOML (numbers, booleans) and fall back to plain strings.
pub fn overlay_env(
    table: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), Error> {
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("JETSAGA_") else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let section = section.to_lowercase().replace('_', "-");
        let key = key.to_lowercase().replace('_', "-");
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(inner) = entry else {
            return Err(Error::Parse(format!(
                "{name}: [{section}] is not a section"
            )));
        };
        inner.insert(key, parsed);
    }
    Ok(())
}

/// `Duration` as a human string (`"250ms"`, `"10s"`, `"7d"` is not accepted: use `"168h"`).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises as e.g. `"10s"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&jetsaga_sagas::definition::format_duration(*d))
    }

    /// Reads e.g. `"10s"`, `"1m30s"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        jetsaga_sagas::definition::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_file_env_and_errors() {
        let config = Config::load(None, vars(&[])).unwrap();
        assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jetsaga.toml");
        std::fs::write(
            &file,
            "[engine]\nmax-in-flight = 10\n[streams]\nretention = \"1h\"\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&file),
            vars(&[
                ("JETSAGA_ENGINE__MAX_IN_FLIGHT", "20"),
                ("JETSAGA_NATS__URL", "nats://10.0.0.1:4333"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.engine.max_in_flight, 20);
        assert_eq!(config.streams.retention, Duration::from_secs(3600));
        assert_eq!(config.nats.url, "nats://10.0.0.1:4333");

        let err = Config::load(None, vars(&[("JETSAGA_STREAMS__REPLICAS", "9")])).unwrap_err();
        assert!(err.to_string().contains("streams.replicas"), "{err}");
        let err =
            Config::load(None, vars(&[("JETSAGA_ENGINE__MAX_IN_FLIGHT", "lots")])).unwrap_err();
        assert!(err.to_string().contains("max-in-flight"), "{err}");
        let err = Config::load(None, vars(&[("JETSAGA_ENGINE__COLOUR", "red")])).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::load(None, vars(&[("JETSAGA_ENGINE__ACK_WAIT", "soon")])).unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err = Config::load(None, vars(&[("JETSAGA_NATS__USER", "ana")])).unwrap_err();
        assert!(err.to_string().contains("nats.user"), "{err}");
        let err = Config::load(Some(Path::new("/nonexistent/x.toml")), vars(&[])).unwrap_err();
        assert!(err.to_string().contains("cannot read config file"), "{err}");
    }
}
