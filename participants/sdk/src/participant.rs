//! The participant: a builder, the consumer loop and the per-command pipeline.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, Message, consumer};
use async_nats::{HeaderMap, jetstream::stream::DirectGetErrorKind};
use futures::FutureExt;
use jetsaga_runtime::consume::{self, Pull};
use jetsaga_runtime::streams::Streams;
use jetsaga_sagas::definition::is_subject_token;
use jetsaga_sagas::protocol::{
    self, Body, Command, DecodeError, DecodeErrorKind, Failure, Outcome, Reply, header, subject,
};
use jetsaga_sagas::streams::REPLIES;
use tracing::{Instrument, debug, error, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::handler::{BoxHandler, Context, Handled, boxed, code};
use crate::metrics::{self, Metrics};
use crate::{Error, streams, trace};
/// Redelivery delay when the idempotency record or the reply could not be reached.
const INFRA_RETRY_DELAY: Duration = Duration::from_millis(250);

/// Settings of a [`Participant`]; see the [`Builder`] methods for their meaning and defaults.
#[derive(Debug, Clone)]
struct Settings {
    concurrency: usize,
    max_ack_pending: i64,
    ack_wait: Duration,
    max_deliver: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    streams: Streams,
    shutdown_grace: Duration,
    drain: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_ack_pending: 1024,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            streams: Streams::default(),
            shutdown_grace: Duration::from_secs(30),
            drain: true,
        }
    }
}

/// Builds a [`Participant`]: its name, one handler per action, and the consumer settings.
pub struct Builder {
    name: String,
    handlers: HashMap<String, BoxHandler>,
    settings: Settings,
    registry: Option<prometheus::Registry>,
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
    /// (default 30 s; keep it above the handlers' worst latency).
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

/// A participant: consumes its commands, runs the handlers, records and publishes replies.
pub struct Participant {
    name: Arc<str>,
    handlers: HashMap<String, BoxHandler>,
    settings: Settings,
    registry: prometheus::Registry,
    metrics: Metrics,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.name)
            .field("actions", &self.handlers.keys().collect::<Vec<_>>())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Participant {
    /// Starts building the participant called `name` (one subject token, e.g. `inventory`).
    pub fn builder(name: impl Into<String>) -> Builder {
        Builder {
            name: name.into(),
            handlers: HashMap::new(),
            settings: Settings::default(),
            registry: None,
        }
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The durable consumer's name: `participant-<name>`.
    pub fn consumer_name(&self) -> String {
        format!("participant-{}", self.name)
    }

    /// The registry holding the SDK's metrics (to serve `/metrics`).
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// The JetStream context the participant uses: `client` with a publish-ack window sized
    /// for its concurrency. Handlers get the same through [`Context::jetstream`].
    pub fn jetstream(&self, client: async_nats::Client) -> jetstream::Context {
        jetstream::ContextBuilder::new()
            .max_ack_inflight(self.settings.concurrency * 2 + 64)
            .backpressure_on_inflight(true)
            .build(client)
    }

    /// Creates the missing streams and the durable consumer, then handles commands until
    /// `shutdown` resolves; then stops pulling, waits (up to the shutdown grace) for the
    /// commands in flight and drains `client` (unless turned off).
    ///
    /// # Errors
    ///
    /// [`Error::Stream`] or [`Error::Consumer`] if the streams or the consumer cannot be set
    /// up. Errors while running are handled (redelivery, dead letters) and logged.
    pub async fn run(
        self,
        client: async_nats::Client,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let js = self.jetstream(client.clone());
        streams::ensure(&js, &streams::NEEDED, &self.settings.streams).await?;
        let consumer = self.consumer(&js).await?;
        let replies = js
            .get_stream(REPLIES.name)
            .await
            .map_err(|e| Error::Consumer {
                consumer: self.consumer_name(),
                reason: format!("look up stream {}: {e}", REPLIES.name),
            })?;
        let settings = self.settings.clone();
        info!(participant = %self.name, consumer = %self.consumer_name(), "participant started");
        let name = self.name.clone();
        let watch_token = tokio_util::sync::CancellationToken::new();
        let watcher = tokio_util::task::TaskTracker::new();
        watcher.spawn(self.metrics.clone().watch_connection(
            name.to_string(),
            client.clone(),
            watch_token.clone(),
        ));
        watcher.close();
        let worker = Arc::new(Worker {
            name: self.name,
            handlers: self.handlers,
            settings: self.settings,
            metrics: self.metrics,
            js,
            replies,
            in_flight: KeyedLock::default(),
        });
        let consume = consume::Settings {
            concurrency: settings.concurrency,
            pull: Pull {
                batch: settings.concurrency.min(256),
                heartbeat: Some(Duration::from_secs(5)),
                expires: Some(Duration::from_secs(30)),
            },
            ack_wait: settings.ack_wait,
            grace: settings.shutdown_grace,
        };
        let drained = consume::Consumer::new(consumer, client.clone(), consume)
            .run(worker, shutdown)
            .await;
        if drained.left > 0 {
            warn!(participant = %name, left = drained.left, "commands left in flight will be redelivered");
        }
        watch_token.cancel();
        watcher.wait().await;
        if settings.drain {
            if let Err(e) = client.drain().await {
                warn!(error = %e, "draining the nats connection failed");
            }
        } else if let Err(e) = client.flush().await {
            warn!(error = %e, "flushing the nats connection failed");
        }
        info!(participant = %name, "participant stopped");
        Ok(())
    }

    async fn consumer(&self, js: &jetstream::Context) -> Result<consumer::PullConsumer, Error> {
        let name = self.consumer_name();
        let failed = |e: &dyn std::fmt::Display| Error::Consumer {
            consumer: name.clone(),
            reason: e.to_string(),
        };
        let stream = js
            .get_stream(jetsaga_sagas::streams::COMMANDS.name)
            .await
            .map_err(|e| failed(&e))?;
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("jetsaga participant {}", self.name)),
            filter_subject: subject::commands_of(&self.name),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            ack_wait: self.settings.ack_wait,
            // One delivery beyond the handler's budget: if the last attempt never answers
            // (crash, hang), that delivery records `retries_exhausted` instead of going silent.
            max_deliver: i64::from(self.settings.max_deliver) + 1,
            max_ack_pending: self.settings.max_ack_pending,
            ..Default::default()
        };
        stream.create_consumer(config).await.map_err(|e| failed(&e))
    }
}

/// Serialises work on the same key inside one process (two deliveries of one command id).
#[derive(Debug, Default)]
struct KeyedLock {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct KeyedGuard<'a> {
    owner: &'a KeyedLock,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLock {
    async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.entry(key.to_owned()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        KeyedGuard {
            owner: self,
            key: key.to_owned(),
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self
            .owner
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Only the map holds it: nobody waits, so the entry can go.
        if locks
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

/// Everything a command's task needs, shared by all tasks.
struct Worker {
    name: Arc<str>,
    handlers: HashMap<String, BoxHandler>,
    settings: Settings,
    metrics: Metrics,
    js: jetstream::Context,
    replies: jetstream::stream::Stream,
    in_flight: KeyedLock,
}

/// What the pipeline does with a command once the handler (or the SDK) has decided.
enum Decision {
    Reply(Outcome),
    Nak(Duration),
}

impl consume::Handler for Worker {
    async fn handle(&self, msg: &Message) -> AckKind {
        let _in_flight = self.metrics.in_flight(&self.name);
        self.handle_command(msg).await
    }
}

impl Worker {
    async fn handle_command(&self, msg: &Message) -> AckKind {
        let delivered = msg
            .info()
            .map(|i| u32::try_from(i.delivered).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let command = match self.decode(msg) {
            Ok(command) => command,
            Err(e) => return self.dead_letter(msg, &e).await,
        };
        let _serialised = self.in_flight.lock(&command.command_id).await;
        let action_label = if self.handlers.contains_key(&command.action) {
            command.action.as_str()
        } else {
            metrics::UNKNOWN_ACTION
        };

        // A first delivery of a command that was not re-sent cannot have a recorded
        // reply (JetStream drops re-publishes within the dedup window, and the
        // orchestrator marks later ones), so only redeliveries and re-sends pay the lookup.
        let resent = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(header::RESENT))
            .is_some();
        let lookup = if delivered > 1 || resent {
            self.recorded(&command).await
        } else {
            Ok(None)
        };
        match lookup {
            Ok(Some(recorded)) => {
                debug!(command_id = %command.command_id, "answering a duplicate from the recorded reply");
                self.metrics
                    .duplicates
                    .with_label_values(&[&*self.name, action_label])
                    .inc();
                let reply_to = command.reply_to.clone();
                return match self
                    .publish(reply_to, recorded.headers, recorded.payload)
                    .await
                {
                    Ok(()) => AckKind::Ack,
                    Err(e) => {
                        warn!(error = %e, command_id = %command.command_id, "cannot re-publish the recorded reply");
                        AckKind::Nak(Some(INFRA_RETRY_DELAY))
                    }
                };
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, command_id = %command.command_id, "cannot read the idempotency record; will retry");
                return AckKind::Nak(Some(INFRA_RETRY_DELAY));
            }
        }

        let parent = trace::extract(msg.headers.as_ref());
        let span = tracing::info_span!(
            "participant.handle",
            otel.name = %format!("{} {}", self.name, command.action),
            participant = %self.name,
            action = %command.action,
            saga_id = %command.saga_id,
            command_id = %command.command_id,
            step = %command.step,
            attempt = command.attempt,
            delivered,
        );
        if let Err(e) = span.set_parent(parent) {
            debug!(error = ?e, "cannot set the parent span");
        }
        // While the handler runs, the consumer's progress sweeper tells JetStream it is in
        // progress, so the command is not redelivered and run twice at the same time.
        let (decision, result) = self
            .decide(&command, delivered)
            .instrument(span.clone())
            .await;
        self.metrics
            .commands
            .with_label_values(&[&*self.name, action_label, result])
            .inc();

        match decision {
            Decision::Nak(delay) => AckKind::Nak(Some(delay)),
            Decision::Reply(outcome) => {
                let traceparent = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(header::TRACEPARENT))
                    .map(|v| v.as_str().to_owned());
                let (headers, payload) = reply_message(&command, outcome, traceparent);
                match self
                    .publish(command.reply_to.clone(), headers, payload)
                    .await
                {
                    Ok(()) => AckKind::Ack,
                    Err(e) => {
                        // Not recorded: the redelivery runs the handler again, which must
                        // find and finish its earlier effect (handlers are idempotent).
                        span.in_scope(|| warn!(error = %e, "cannot publish the reply; will retry"));
                        AckKind::Nak(Some(INFRA_RETRY_DELAY))
                    }
                }
            }
        }
    }

    /// Runs the handler (or not) and says what to do with the command.
    async fn decide(&self, command: &Command, delivered: u32) -> (Decision, &'static str) {
        let max = self.settings.max_deliver;
        if delivered > max {
            warn!("no answer after {max} deliveries; recording a retryable failure");
            let failure = Failure::new(
                code::RETRIES_EXHAUSTED,
                format!("no answer after {max} deliveries"),
                true,
            );
            return (
                Decision::Reply(Outcome::Failed { error: failure }),
                metrics::result::EXHAUSTED,
            );
        }
        let Some(handler) = self.handlers.get(&command.action) else {
            warn!("no handler for this action");
            let failure = Failure::new(
                code::UNKNOWN_ACTION,
                format!(
                    "participant {} has no action \"{}\"",
                    self.name, command.action
                ),
                false,
            );
            return (
                Decision::Reply(Outcome::Failed { error: failure }),
                metrics::result::FAILED,
            );
        };
        let ctx = Context {
            command: command.clone(),
            delivered,
            participant: self.name.clone(),
            jetstream: self.js.clone(),
        };
        let started = Instant::now();
        let handled = AssertUnwindSafe(handler(ctx)).catch_unwind().await;
        self.metrics
            .duration
            .with_label_values(&[&*self.name, &command.action])
            .observe(started.elapsed().as_secs_f64());
        let (reason, delay, result) = match handled {
            Ok(Handled::Ok(result)) => {
                debug!("handled: ok");
                return (Decision::Reply(Outcome::Ok { result }), metrics::result::OK);
            }
            Ok(Handled::Failed { code, message }) => {
                info!(%code, %message, "handled: business failure");
                let error = Failure::new(code, message, false);
                return (
                    Decision::Reply(Outcome::Failed { error }),
                    metrics::result::FAILED,
                );
            }
            Ok(Handled::Retry { reason, delay }) => (reason, delay, metrics::result::RETRY),
            Err(panic) => {
                let what = panic_message(panic.as_ref());
                error!(panic = %what, "handler panicked; treating it as transient");
                (
                    format!("handler panicked: {what}"),
                    None,
                    metrics::result::PANICKED,
                )
            }
        };
        if delivered >= max {
            warn!(%reason, "transient failure on the last delivery; recording a retryable failure");
            let failure = Failure::new(code::RETRIES_EXHAUSTED, reason, true);
            return (
                Decision::Reply(Outcome::Failed { error: failure }),
                metrics::result::EXHAUSTED,
            );
        }
        let delay = delay.unwrap_or_else(|| self.backoff(delivered));
        info!(%reason, ?delay, "transient failure; will be redelivered");
        (Decision::Nak(delay), result)
    }

    fn backoff(&self, delivered: u32) -> Duration {
        let factor = 2u32.saturating_pow(delivered.saturating_sub(1).min(20));
        self.settings
            .initial_backoff
            .saturating_mul(factor)
            .min(self.settings.max_backoff)
    }

    fn decode(&self, msg: &Message) -> Result<Command, DecodeError> {
        let command = Command::decode(&msg.payload)?;
        let invalid = |m: String| DecodeError::new(DecodeErrorKind::InvalidField, m);
        if !is_subject_token(&command.command_id) {
            return Err(invalid(format!(
                "command_id \"{}\" must be one subject token",
                command.command_id
            )));
        }
        let expected_subject = subject::command(&self.name, &command.action);
        if msg.subject.as_str() != expected_subject {
            return Err(invalid(format!(
                "action \"{}\" does not match the subject {}",
                command.action, msg.subject
            )));
        }
        let expected_reply = subject::reply(&self.name, &command.command_id);
        if command.reply_to != expected_reply {
            return Err(invalid(format!(
                "reply_to \"{}\" is not {expected_reply}",
                command.reply_to
            )));
        }
        Ok(command)
    }

    async fn dead_letter(&self, msg: &Message, error: &DecodeError) -> AckKind {
        let kind = match error.kind() {
            DecodeErrorKind::Json => "json",
            DecodeErrorKind::UnsupportedVersion => "unsupported_version",
            DecodeErrorKind::MissingHeader => "missing_header",
            DecodeErrorKind::InvalidField => "invalid_field",
        };
        error!(participant = %self.name, subject = %msg.subject, reason = %error, "undecodable command: dead-lettering it");
        let source = format!("participant.{}", self.name);
        let settled =
            jetsaga_runtime::dead_letter::settle(&self.js, &source, msg, &error.to_string()).await;
        if matches!(settled, AckKind::Term) {
            self.metrics.dead_letter(&self.name, kind);
        }
        settled
    }

    /// The recorded reply to `command`, if there is one.
    async fn recorded(
        &self,
        command: &Command,
    ) -> Result<Option<jetstream::message::StreamMessage>, String> {
        match self
            .replies
            .direct_get_last_for_subject(command.reply_to.clone())
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), String> {
        self.js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// The reply to `command` as headers and body.
fn reply_message(
    command: &Command,
    outcome: Outcome,
    traceparent: Option<String>,
) -> (HeaderMap, bytes::Bytes) {
    let reply = Reply {
        protocol: protocol::VERSION,
        command_id: command.command_id.clone(),
        saga_id: command.saga_id.clone(),
        outcome,
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, reply_msg_id(&command.command_id));
    headers.insert(header::SAGA_ID, command.saga_id.as_str());
    headers.insert(header::COMMAND_ID, command.command_id.as_str());
    if let Some(traceparent) = traceparent {
        headers.insert(header::TRACEPARENT, traceparent);
    }
    (headers, reply.encode().into())
}

/// The `Nats-Msg-Id` of the reply to `command_id`.
pub fn reply_msg_id(command_id: &str) -> String {
    format!("reply:{command_id}")
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
