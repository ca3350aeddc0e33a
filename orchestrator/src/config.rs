//! The orchestrator's configuration: defaults, then an optional TOML file, then
//! `JETSAGA_<SECTION>__<KEY>` environment variables, then [`Config::validate`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use jetsaga_runtime::config::{Error, duration};
pub use jetsaga_runtime::nats::Nats;
pub use jetsaga_runtime::streams::{Storage, Streams};
pub use jetsaga_runtime::telemetry::Telemetry;

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
    /// Logs and traces.
    pub telemetry: Telemetry,
}

/// HTTP settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Http {
    /// Listen address of the API, web page and `/metrics`. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// API tokens. With any configured, every `/v1` route needs one (`read` for
    /// reads, `operate` for everything); with none the API is open, the server warns
    /// at startup, and only a loopback `listen` is accepted unless
    /// `allow-unauthenticated` is set.
    pub tokens: Vec<Token>,
    /// Serve `/healthz`, `/readyz` and `/metrics` without a token. Default true.
    pub open_probes: bool,
    /// Accept a non-loopback `listen` with no tokens configured. Default false.
    pub allow_unauthenticated: bool,
    /// A Jaeger UI base URL (`http://localhost:16686`): the web page links trace ids there.
    pub jaeger_url: Option<String>,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tokens: Vec::new(),
            open_probes: true,
            allow_unauthenticated: false,
            jaeger_url: None,
        }
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read sagas, journals, dead letters and definitions.
    Read,
    /// Everything: also start, retry, abort, redrive and delete.
    Operate,
}

/// One API token: `{ name = "ana", role = "operate", token-file = "ana.token" }`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Token {
    /// Who holds it; journaled as the actor of their retries and aborts.
    pub name: String,
    /// What it may do. Default `operate`.
    #[serde(default = "operate")]
    pub role: Role,
    /// The token itself (at least 16 characters); prefer `token-file`.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace ignored), read at startup.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

fn operate() -> Role {
    Role::Operate
}

impl std::fmt::Debug for Token {
    // Tokens never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// Tokens shorter than this are refused: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

impl Token {
    /// The secret: inline or read from `token-file`.
    ///
    /// # Errors
    ///
    /// [`Error::Field`] naming `http.tokens[index]` when the file cannot be read or
    /// the token is too short.
    pub fn secret(&self, index: usize) -> Result<String, Error> {
        let field = |key: &str| format!("http.tokens[{index}].{key}");
        let secret = match (&self.token, &self.token_file) {
            (Some(token), None) => token.trim().to_owned(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| {
                    Error::field(
                        &field("token-file"),
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?
                .trim()
                .to_owned(),
            _ => {
                return Err(Error::field(
                    &field("token"),
                    "give exactly one of token and token-file",
                ));
            }
        };
        if secret.len() < MIN_TOKEN_LEN {
            return Err(Error::field(
                &field("token"),
                format!("must be at least {MIN_TOKEN_LEN} characters"),
            ));
        }
        Ok(secret)
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
    /// Deliveries of one input before JetStream gives up (and it is
    /// dead-lettered); -1, the default, never gives up: an input that fails
    /// because the infrastructure is down (a journal election, a full disk, a
    /// restarting server) is retried with capped backoff until it applies, and
    /// poison is dead-lettered by the driver itself, on its first delivery.
    pub max_deliver: i64,
    /// How long shutdown waits for in-flight work.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// How often live sagas whose timer is overdue by more than this are woken
    /// (their timer fire was lost, e.g. during an outage): read from the listing
    /// index, no NATS reads.
    #[serde(with = "duration")]
    pub timer_sweep: Duration,
    /// Admission control: new starts wait (`POST /v1/sagas` answers 503 `overloaded`)
    /// while more sagas are under way than the system finishes in this long; `0s` turns it
    /// off. A fraction of the shortest step timeout keeps commands from waiting past it.
    #[serde(with = "duration")]
    pub admission_window: Duration,
    /// Sagas that may be under way whatever the finishing rate (so an idle system starts).
    pub admission_floor: u64,
    /// The most finished (completed or compensated) sagas the saga listing holds,
    /// the newest; older ones stay in the journal for `streams.finished-retention`
    /// and `GET /v1/sagas/{id}` still reads them, but they are not listed. Bounds the
    /// listing's memory (~400 bytes a saga) whatever the retention.
    pub listing_max_finished: usize,
    /// A name for this instance in logs and the NATS connection.
    pub instance: String,
    /// Added to this instance's clock wherever the driver reads it, to test
    /// clock skew between the orchestrator and nats-server (issue 10 hole 11).
    /// Only library callers (tests) set it: it is never read from a file or
    /// the environment, and is zero otherwise.
    #[serde(skip)]
    pub clock_offset: chrono::TimeDelta,
}

impl Default for Engine {
    fn default() -> Self {
        Self {
            definitions: None,
            max_in_flight: 4096,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            shutdown_grace: Duration::from_secs(10),
            timer_sweep: Duration::from_secs(10),
            admission_window: Duration::from_secs(5),
            admission_floor: 1000,
            listing_max_finished: crate::index::MAX_FINISHED,
            instance: "jetsaga".to_owned(),
            clock_offset: chrono::TimeDelta::zero(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` if given, then `JETSAGA_*` variables from `vars`, then
    /// [`Config::validate`].
    ///
    /// # Errors
    ///
    /// [`Error`] naming the field and where its value came from.
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        jetsaga_runtime::config::load(file, vars)
    }

    /// Checks ranges and combinations serde cannot.
    ///
    /// # Errors
    ///
    /// [`Error::Field`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), Error> {
        jetsaga_runtime::config::Validate::validate(self)
    }
}

impl jetsaga_runtime::config::Validate for Config {
    fn validate(&self) -> Result<(), Error> {
        let invalid = |field: &str, problem: &str| Err(Error::field(field, problem));
        self.nats.validate()?;
        self.streams.validate()?;
        self.telemetry.validate()?;
        if self.engine.max_in_flight == 0 || self.engine.max_in_flight > 100_000 {
            return invalid("engine.max-in-flight", "must be between 1 and 100000");
        }
        if self.engine.ack_wait < Duration::from_secs(1) {
            return invalid("engine.ack-wait", "must be at least 1s");
        }
        if self.engine.admission_floor == 0 {
            return invalid(
                "engine.admission-floor",
                "must be at least 1 (engine.admission-window = \"0s\" turns admission control off)",
            );
        }
        if self.engine.listing_max_finished == 0 || self.engine.listing_max_finished > 100_000_000 {
            return invalid(
                "engine.listing-max-finished",
                "must be between 1 and 100000000",
            );
        }
        if self.engine.timer_sweep < Duration::from_secs(1) {
            return invalid("engine.timer-sweep", "must be at least 1s");
        }
        if self.engine.max_deliver != -1 && self.engine.max_deliver < 2 {
            return invalid("engine.max-deliver", "must be -1 (unlimited) or at least 2");
        }
        let mut names = std::collections::HashSet::new();
        for (index, token) in self.http.tokens.iter().enumerate() {
            if token.name.trim().is_empty() || token.name.len() > 64 {
                return invalid(
                    &format!("http.tokens[{index}].name"),
                    "must be 1 to 64 characters",
                );
            }
            if !names.insert(token.name.as_str()) {
                return invalid(
                    &format!("http.tokens[{index}].name"),
                    "is used by another token",
                );
            }
            if token.token.is_some() == token.token_file.is_some() {
                return invalid(
                    &format!("http.tokens[{index}].token"),
                    "give exactly one of token and token-file",
                );
            }
        }
        if self.http.tokens.is_empty()
            && !self.http.listen.ip().is_loopback()
            && !self.http.allow_unauthenticated
        {
            return invalid(
                "http.listen",
                "a non-loopback address needs http.tokens (or http.allow-unauthenticated = true)",
            );
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
        // Inputs are never dropped for failing transiently (issue 10 hole 4).
        assert_eq!(config.engine.max_deliver, -1);
        let mut bounded = config.clone();
        bounded.engine.max_deliver = 1;
        assert!(bounded.validate().is_err());
        bounded.engine.max_deliver = 2;
        assert!(bounded.validate().is_ok());
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
        let err =
            Config::load(None, vars(&[("JETSAGA_ENGINE__LISTING_MAX_FINISHED", "0")])).unwrap_err();
        assert!(
            err.to_string().contains("engine.listing-max-finished"),
            "{err}"
        );
        let bounded = Config::load(
            None,
            vars(&[("JETSAGA_ENGINE__LISTING_MAX_FINISHED", "5000")]),
        )
        .unwrap();
        assert_eq!(bounded.engine.listing_max_finished, 5000);
        let err = Config::load(None, vars(&[("JETSAGA_ENGINE__COLOUR", "red")])).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::load(None, vars(&[("JETSAGA_ENGINE__ACK_WAIT", "soon")])).unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err = Config::load(None, vars(&[("JETSAGA_NATS__USER", "ana")])).unwrap_err();
        assert!(err.to_string().contains("nats.user"), "{err}");
        let err = Config::load(Some(Path::new("/nonexistent/x.toml")), vars(&[])).unwrap_err();
        assert!(err.to_string().contains("cannot read config file"), "{err}");
    }

    #[test]
    fn tokens_from_file_and_env_are_checked_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("ana.token");
        std::fs::write(&secret, "  s3cret-s3cret-s3cret\n").unwrap();
        let file = dir.path().join("jetsaga.toml");
        std::fs::write(
            &file,
            format!(
                "[http]\nlisten = \"0.0.0.0:8080\"\ntokens = [{{ name = \"ana\", token-file = {:?} }}, {{ name = \"ci\", role = \"read\", token = \"read-only-token-123\" }}]\n",
                secret.display().to_string()
            ),
        )
        .unwrap();
        let config = Config::load(Some(&file), vars(&[])).unwrap();
        assert_eq!(config.http.tokens[0].role, Role::Operate);
        assert_eq!(config.http.tokens[1].role, Role::Read);
        assert_eq!(
            config.http.tokens[0].secret(0).unwrap(),
            "s3cret-s3cret-s3cret"
        );
        let printed = format!("{config:?}");
        assert!(!printed.contains("read-only-token-123"), "{printed}");

        // From the environment.
        let config = Config::load(
            None,
            vars(&[(
                "JETSAGA_HTTP__TOKENS",
                "[{name=\"env\",token=\"from-the-environment\"}]",
            )]),
        )
        .unwrap();
        assert_eq!(config.http.tokens[0].name, "env");

        // Open to the network without tokens: refused unless asked for.
        let err =
            Config::load(None, vars(&[("JETSAGA_HTTP__LISTEN", "0.0.0.0:8080")])).unwrap_err();
        assert!(err.to_string().contains("http.listen"), "{err}");
        Config::load(
            None,
            vars(&[
                ("JETSAGA_HTTP__LISTEN", "0.0.0.0:8080"),
                ("JETSAGA_HTTP__ALLOW_UNAUTHENTICATED", "true"),
            ]),
        )
        .unwrap();

        let mut bad = Config::default();
        bad.http.tokens = vec![Token {
            name: "x".into(),
            role: Role::Read,
            token: Some("short".into()),
            token_file: Some(secret),
        }];
        let err = bad.validate().unwrap_err();
        assert!(err.to_string().contains("http.tokens[0].token"), "{err}");
        bad.http.tokens[0].token_file = None;
        let err = bad.http.tokens[0].secret(0).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
        bad.http.tokens[0].token = None;
        bad.http.tokens[0].token_file = Some(dir.path().join("missing"));
        let err = bad.http.tokens[0].secret(0).unwrap_err();
        assert!(
            err.to_string().contains("http.tokens[0].token-file"),
            "{err}"
        );
        let twice = Token {
            name: "x".into(),
            role: Role::Read,
            token: Some("long-enough-token-1".into()),
            token_file: None,
        };
        bad.http.tokens = vec![twice.clone(), twice];
        let err = bad.validate().unwrap_err();
        assert!(err.to_string().contains("http.tokens[1].name"), "{err}");
    }
}
