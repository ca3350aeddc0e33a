//! [`Builder`]: the participant's name, handlers and consumer settings.

use super::Participant;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use jetsaga_runtime::streams::Streams;
use jetsaga_sagas::definition::is_subject_token;

use crate::Error;
use crate::handler::{BoxHandler, Context, Handled, boxed};
use crate::metrics::Metrics;

/// Settings of a [`Participant`]; see the [`Builder`] methods for their meaning and defaults.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(super) concurrency: usize,
    pub(super) max_ack_pending: i64,
    pub(super) ack_wait: Duration,
    pub(super) max_deliver: u32,
    pub(super) initial_backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) streams: Streams,
    pub(super) shutdown_grace: Duration,
    pub(super) drain: bool,
    pub(super) reply_ttl: Duration,
}

/// The default `ack_wait`: short, so a crashed participant's commands come back quickly;
/// handlers running longer are kept alive by in-progress acks.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(2);

/// How long a recorded reply answers a repeated command id by default.
pub const DEFAULT_REPLY_TTL: Duration = Duration::from_secs(3600);

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_ack_pending: 1024,
            ack_wait: DEFAULT_ACK_WAIT,
            max_deliver: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            streams: Streams::default(),
            shutdown_grace: Duration::from_secs(30),
            drain: true,
            reply_ttl: DEFAULT_REPLY_TTL,
        }
    }
}

/// Builds a [`Participant`]: its name, one handler per action, and the consumer settings.
pub struct Builder {
    pub(super) name: String,
    pub(super) handlers: HashMap<String, BoxHandler>,
    pub(super) settings: Settings,
    pub(super) registry: Option<prometheus::Registry>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("name", &self.name)
            .field("actions", &self.handlers.keys().collect::<Vec<_>>())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Registers `handler` for commands on `saga.cmd.<name>.<action>`; a later registration of
    /// the same action replaces the earlier one.
    pub fn handler<F, Fut>(mut self, action: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Handled> + Send + 'static,
    {
        self.handlers.insert(action.into(), boxed(handler));
        self
    }

    /// How many commands are handled at the same time (default 64).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.settings.concurrency = n;
        self
    }

    /// The consumer's `max_ack_pending`: delivered but unacknowledged commands across all
    /// instances (default 1024; at least `concurrency`).
    pub fn max_ack_pending(mut self, n: i64) -> Self {
        self.settings.max_ack_pending = n;
        self
    }

    /// The consumer's `ack_wait`: a command not acknowledged in this time is redelivered
    /// (default 3 s). It bounds how long a crashed participant's commands wait before another
    /// instance (or the restarted one) gets them; a handler running longer than a third of it
    /// is marked in progress (`+WPI`), so slow handlers are neither redelivered nor run twice.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.settings.ack_wait = wait;
        self
    }

    /// How many deliveries a command gets (default 5). A transient failure on the last one
    /// is recorded as a retryable `retries_exhausted` failure, so the orchestrator decides.
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.settings.max_deliver = n;
        self
    }

    /// The redelivery backoff of [`Handled::Retry`] without a delay: `initial` doubled per
    /// delivery up to `max` (default 100 ms to 5 s).
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.settings.initial_backoff = initial;
        self.settings.max_backoff = max;
        self
    }

    /// Replicas of the streams the participant creates when they are missing (default 1).
    pub fn stream_replicas(mut self, n: usize) -> Self {
        self.settings.streams.replicas = n;
        self
    }

    /// The storage, replicas and retention the streams must have (the `[streams]` section
    /// the orchestrator has too): missing streams are created so, existing ones are checked.
    pub fn streams(mut self, streams: Streams) -> Self {
        self.settings.streams = streams;
        self
    }

    /// How long a reply stays recorded in the reply stream (default 1 h): the reply is published
    /// with this `Nats-TTL`, and for that long a repeated command id is answered from it without
    /// running the handler. After it, a repeated command runs the handler again, which must find
    /// its earlier effect (effects are idempotent per saga). At least 1 s and at most the
    /// streams' retention.
    pub fn reply_ttl(mut self, ttl: Duration) -> Self {
        self.settings.reply_ttl = ttl;
        self
    }

    /// How long shutdown waits for in-flight handlers (default 30 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.settings.shutdown_grace = grace;
        self
    }

    /// Whether [`Participant::run`] drains the NATS client when it stops (default true).
    /// Turn it off when the client is shared with work that outlives the participant.
    pub fn drain_on_shutdown(mut self, drain: bool) -> Self {
        self.settings.drain = drain;
        self
    }

    /// The registry the SDK's metrics go to (default: a fresh one, see [`Participant::registry`]).
    pub fn registry(mut self, registry: prometheus::Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Checks the settings and registers the metrics.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the setting that is out of range (or a name that is not one
    /// subject token); [`Error::Metrics`] if the registry already holds the SDK's metrics.
    pub fn build(self) -> Result<Participant, Error> {
        let s = &self.settings;
        if !is_subject_token(&self.name) {
            return Err(Error::Config(format!(
                "name \"{}\" must be one subject token (no dots, spaces or wildcards)",
                self.name
            )));
        }
        if let Some(bad) = self.handlers.keys().find(|a| !is_subject_token(a)) {
            return Err(Error::Config(format!(
                "action \"{bad}\" must be one subject token"
            )));
        }
        if s.concurrency == 0 {
            return Err(Error::Config("concurrency must be at least 1".to_owned()));
        }
        if s.max_ack_pending < s.concurrency as i64 {
            return Err(Error::Config(
                "max_ack_pending must be at least concurrency".to_owned(),
            ));
        }
        if s.max_deliver == 0 {
            return Err(Error::Config("max_deliver must be at least 1".to_owned()));
        }
        if s.ack_wait < Duration::from_secs(1) {
            return Err(Error::Config("ack_wait must be at least 1s".to_owned()));
        }
        if s.reply_ttl < Duration::from_secs(1) {
            return Err(Error::Config("reply_ttl must be at least 1s".to_owned()));
        }
        if s.reply_ttl > s.streams.retention {
            return Err(Error::Config(
                "reply_ttl must not exceed the streams' retention".to_owned(),
            ));
        }
        if s.initial_backoff > s.max_backoff {
            return Err(Error::Config(
                "retry backoff: initial must not exceed max".to_owned(),
            ));
        }
        let registry = self.registry.unwrap_or_default();
        let metrics = Metrics::register(&registry)?;
        metrics.register_actions(&self.name, self.handlers.keys().map(String::as_str));
        Ok(Participant {
            name: self.name.into(),
            handlers: self.handlers,
            settings: self.settings,
            registry,
            metrics,
        })
    }
}
