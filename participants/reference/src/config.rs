//! Configuration shared by the reference participants.
//!
//! Each binary has one typed `Config` (in its module), loaded by
//! [`jetsaga_runtime::config::load`]: the defaults, an optional TOML file (`--config FILE` or
//! `JETSAGA_CONFIG`), then environment variables `JETSAGA_<SECTION>__<KEY>` (e.g.
//! `JETSAGA_NATS__URL`, `JETSAGA_FAULTS__FAIL_RATE=0.1`; the key's `_` stand for the file's
//! `-`; values are TOML values or plain strings), and finally `validate()`. Any error names the
//! field and where its value came from; an unknown section or key is an error; the binaries
//! exit with status 64 on it. The `[nats]`, `[streams]` and `[telemetry]` sections are the
//! runtime's, the same in every jetsaga binary.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use jetsaga_runtime::config::{CONFIG_ENV, ENV_PREFIX, Error, Validate, duration};
pub use jetsaga_runtime::nats::Nats;
pub use jetsaga_runtime::streams::{Storage, Streams};
pub use jetsaga_runtime::telemetry::Telemetry;

/// A binary's configuration.
pub trait Load: Validate + Serialize + DeserializeOwned + Default {
    /// Its logging and tracing settings.
    fn telemetry(&self) -> &Telemetry;
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
    jetsaga_runtime::config::load(file, env)
}

/// The durable consumer and its handlers' pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Consumer {
    /// Commands handled at the same time.
    pub concurrency: usize,
    /// Delivered but unacknowledged commands, across instances.
    pub max_ack_pending: i64,
    /// Redelivery after this long without an ack: how soon a crashed instance's commands come
    /// back. Handlers running longer are marked in progress every third of it.
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    /// Deliveries per command before a retryable failure is recorded.
    pub max_deliver: u32,
    /// How long a reply stays recorded (its `Nats-TTL`): a repeated command id is answered
    /// from it for that long; afterwards the participant's own records answer.
    #[serde(with = "duration")]
    pub reply_ttl: Duration,
    /// How long shutdown waits for commands in flight.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
}

impl Default for Consumer {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_ack_pending: 1024,
            ack_wait: jetsaga_participant::DEFAULT_ACK_WAIT,
            max_deliver: 5,
            reply_ttl: jetsaga_participant::DEFAULT_REPLY_TTL,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Consumer {
    /// Checks the section; `streams` bounds the reply TTL.
    ///
    /// # Errors
    ///
    /// Naming the invalid field.
    pub fn validate(&self, streams: &Streams) -> Result<(), Error> {
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
        if self.reply_ttl < Duration::from_secs(1) {
            return Err(Error::field("consumer.reply-ttl", "must be at least 1s"));
        }
        if self.reply_ttl > streams.retention {
            return Err(Error::field(
                "consumer.reply-ttl",
                "must not exceed streams.retention",
            ));
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
            err.field_name()
                .map(str::to_owned)
                .unwrap_or_else(|| panic!("{err}"))
        };
        assert_eq!(bad("JETSAGA_FAULTS__FAIL_RATE", "2"), "faults.fail-rate");
        assert_eq!(bad("JETSAGA_FAULTS__LATENCY", "soon"), "faults.latency");
        assert_eq!(
            bad("JETSAGA_CONSUMER__CONCURRENCY", "0"),
            "consumer.concurrency"
        );
        assert_eq!(bad("JETSAGA_NATS__TYPO", "1"), "nats.typo");
        assert_eq!(
            bad("JETSAGA_CONSUMER__REPLY_TTL", "0s"),
            "consumer.reply-ttl"
        );
        assert_eq!(
            bad("JETSAGA_CONSUMER__REPLY_TTL", "30d"),
            "consumer.reply-ttl"
        );
        // One rule in every binary: a section it does not have is refused by name.
        assert_eq!(bad("JETSAGA_HTTP__LISTEN", "127.0.0.1:1"), "http");
    }
}
