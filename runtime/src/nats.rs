//! The `[nats]` section every binary shares, and [`connect`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};
use serde::{Deserialize, Serialize};

use crate::config;

/// How to reach NATS: the same keys in every binary's `[nats]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Nats {
    /// Server URL(s), comma-separated (or a TOML list). Default `nats://127.0.0.1:4222`.
    #[serde(deserialize_with = "urls")]
    pub url: String,
    /// A `.creds` file (JWT + nkey seed).
    pub credentials_file: Option<PathBuf>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password, with `user`.
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// An nkey seed (`SU…`) to authenticate with.
    pub nkey: Option<String>,
    /// Require TLS (implied by `tls-ca-file` and a client certificate).
    pub tls: bool,
    /// A CA certificate (PEM) to trust; enables TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `tls-key-file`.
    pub tls_cert_file: Option<PathBuf>,
    /// Client key (PEM), with `tls-cert-file`.
    pub tls_key_file: Option<PathBuf>,
    /// How long to wait for a connection attempt.
    #[serde(with = "config::duration")]
    pub connect_timeout: Duration,
    /// Reconnect attempts before giving up; 0: never give up.
    pub max_reconnects: usize,
    /// The longest pause between reconnect attempts.
    #[serde(with = "config::duration")]
    pub reconnect_delay_max: Duration,
    /// How long to keep trying the first connection when no server answers
    /// (a service started before its server, or during a server restart);
    /// 0: fail at the first refusal.
    #[serde(with = "config::duration")]
    pub startup_wait: Duration,
}

impl Default for Nats {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            credentials_file: None,
            user: None,
            password: None,
            token: None,
            nkey: None,
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout: Duration::from_secs(5),
            max_reconnects: 0,
            reconnect_delay_max: Duration::from_secs(4),
            startup_wait: Duration::from_secs(60),
        }
    }
}

/// `url` as a string with commas or a list of strings.
fn urls<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Urls::deserialize(d)? {
        Urls::One(url) => url,
        Urls::Many(urls) => urls.join(","),
    })
}

/// What kind of connection failure this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The settings are unusable (a URL, a credentials file).
    Settings,
    /// The server could not be reached or refused us.
    Connect,
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A server URL does not parse.
    #[error("nats.url: \"{url}\" is not a NATS server URL")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The credentials file cannot be used.
    #[error("nats.credentials-file {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The URL(s) tried.
        url: String,
        /// Why.
        #[source]
        source: async_nats::ConnectError,
    },
}

impl Error {
    /// Whether no server answered (refused, timed out, not resolvable): worth
    /// waiting for; a refused login or a TLS failure is not.
    fn no_server_yet(&self) -> bool {
        use async_nats::ConnectErrorKind as Kind;
        matches!(self, Self::Connect { source, .. }
            if matches!(source.kind(), Kind::Io | Kind::TimedOut | Kind::Dns))
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Url { .. } | Self::Credentials { .. } => ErrorKind::Settings,
            Self::Connect { .. } => ErrorKind::Connect,
        }
    }
}

impl Nats {
    /// The server addresses.
    ///
    /// # Errors
    ///
    /// [`Error::Url`] naming the URL that does not parse.
    pub fn addresses(&self) -> Result<Vec<ServerAddr>, Error> {
        self.url
            .split(',')
            .map(|url| {
                url.trim()
                    .parse::<ServerAddr>()
                    .map_err(|source| Error::Url {
                        url: url.to_owned(),
                        source,
                    })
            })
            .collect()
    }

    /// Checks the section.
    ///
    /// # Errors
    ///
    /// Naming the invalid field.
    pub fn validate(&self) -> Result<(), config::Error> {
        if self.url.split(',').any(|u| u.trim().is_empty()) {
            return Err(config::Error::field("nats.url", "empty server URL"));
        }
        if let Err(e) = self.addresses() {
            return Err(config::Error::field("nats.url", e.to_string()));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(config::Error::field(
                "nats.user",
                "user and password go together",
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(config::Error::field(
                "nats.tls-cert-file",
                "tls-cert-file and tls-key-file go together",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(config::Error::field(
                "nats.connect-timeout",
                "must be greater than zero",
            ));
        }
        if self.reconnect_delay_max.is_zero() {
            return Err(config::Error::field(
                "nats.reconnect-delay-max",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Counts of connection events since [`connect`], for metrics and readiness.
#[derive(Debug, Default)]
pub struct Events {
    disconnects: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
}

impl Events {
    /// Times the connection was lost.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }

    /// Times it was re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Server and client errors reported on the connection.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn record(&self, event: &Event) {
        let counter = match event {
            Event::Disconnected => &self.disconnects,
            Event::Connected => &self.reconnects,
            _ => &self.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A connection and its event counts.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The client.
    pub client: async_nats::Client,
    /// What happened to it.
    pub events: Arc<Events>,
}

/// Connects as `name` with these settings; while no server answers, retries the first
/// connection for up to `startup-wait` (each attempt within `connect-timeout`), then
/// reconnects per the policy, and logs and counts every connection event.
///
/// # Errors
///
/// [`Error`]: unusable settings, or no server reachable.
pub async fn connect(settings: &Nats, name: &str) -> Result<Connection, Error> {
    let started = std::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        match connect_once(settings, name).await {
            Err(e) if e.no_server_yet() && started.elapsed() < settings.startup_wait => {
                attempt = attempt.saturating_add(1);
                let pause = Duration::from_millis(100)
                    .saturating_mul(2u32.saturating_pow(attempt.min(8)))
                    .min(settings.reconnect_delay_max);
                tracing::warn!(error = %e, retry_in = ?pause, "no NATS server yet; retrying");
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

async fn connect_once(settings: &Nats, name: &str) -> Result<Connection, Error> {
    let events = Arc::new(Events::default());
    let counted = events.clone();
    let delay_max = settings.reconnect_delay_max;
    let mut options = ConnectOptions::new()
        .name(name)
        .connection_timeout(settings.connect_timeout)
        .max_reconnects(match settings.max_reconnects {
            0 => None,
            n => Some(n),
        })
        .reconnect_delay_callback(move |attempts| {
            let exp = 2u32.saturating_pow(u32::try_from(attempts.min(16)).unwrap_or(16));
            Duration::from_millis(10).saturating_mul(exp).min(delay_max)
        })
        .event_callback(move |event| {
            let events = counted.clone();
            async move {
                match &event {
                    Event::Connected => tracing::info!("nats connection re-established"),
                    Event::Disconnected => tracing::warn!("nats connection lost; reconnecting"),
                    other => tracing::warn!(event = %other, "nats connection event"),
                }
                events.record(&event);
            }
        });
    if let Some(path) = &settings.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| Error::Credentials {
                path: path.clone(),
                source,
            })?;
    }
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &settings.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &settings.nkey {
        options = options.nkey(seed.clone());
    }
    if settings.tls {
        options = options.require_tls(true);
    }
    if let Some(ca) = &settings.tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let client = options
        .connect(settings.addresses()?)
        .await
        .map_err(|source| Error::Connect {
            url: settings.url.clone(),
            source,
        })?;
    Ok(Connection { client, events })
}

/// Sets header `name` (one of `jetsaga_sagas::protocol::header`'s names) to `value`. The
/// name is taken as a static string: on the hot path this skips the parsing, validation and
/// allocation that inserting a `&str` name costs in async-nats (a few per cent of the
/// orchestrator's CPU).
pub fn put_header(
    headers: &mut async_nats::HeaderMap,
    name: &'static str,
    value: impl async_nats::header::IntoHeaderValue,
) {
    headers.insert(async_nats::HeaderName::from_static(name), value);
}
