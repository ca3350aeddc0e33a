//! The per-command pipeline: recorded reply, handler, reply, settle.

use super::{KeyedLock, Settings};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, AckKind, Message};
use async_nats::{HeaderMap, jetstream::stream::DirectGetErrorKind};
use futures::FutureExt;
use jetsaga_runtime::consume::{self};
use jetsaga_runtime::nats::put_header;
use jetsaga_sagas::definition::is_subject_token;
use jetsaga_sagas::protocol::{
    self, Body, Command, DecodeError, DecodeErrorKind, Failure, Outcome, Reply, header, subject,
};
use tracing::{Instrument, debug, error, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::handler::{BoxHandler, Context, Handled, code};
use crate::metrics::{self, Metrics};
use crate::trace;

/// Redelivery delay when the idempotency record or the reply could not be reached.
const INFRA_RETRY_DELAY: Duration = Duration::from_millis(250);

/// Everything a command's task needs, shared by all tasks.
pub(super) struct Worker {
    pub(super) name: Arc<str>,
    pub(super) handlers: HashMap<String, BoxHandler>,
    pub(super) settings: Settings,
    pub(super) metrics: Metrics,
    pub(super) js: jetstream::Context,
    pub(super) replies: jetstream::stream::Stream,
    pub(super) in_flight: KeyedLock,
}

/// What the pipeline does with a command once the handler (or the SDK) has decided.
pub(super) enum Decision {
    Reply(Outcome),
    Nak(Duration),
}

impl consume::Handler for Worker {
    async fn handle(&self, msg: &Message) -> AckKind {
        let _in_flight = self.metrics.in_flight(&self.name);
        match self.handle_command(msg).await {
            AckKind::Nak(_) if self.is_last_delivery(msg) => self.unanswered(msg).await,
            kind => kind,
        }
    }
}

impl Worker {
    async fn handle_command(&self, msg: &Message) -> AckKind {
        let info = msg.info().ok();
        let delivered = info
            .as_ref()
            .map_or(1, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX));
        let stored_at = info.map(|i| std::time::SystemTime::from(i.published));
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
            .decide(&command, delivered, stored_at)
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
                let (headers, payload) =
                    reply_message(&command, outcome, traceparent, self.settings.reply_ttl);
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
    async fn decide(
        &self,
        command: &Command,
        delivered: u32,
        stored_at: Option<std::time::SystemTime>,
    ) -> (Decision, &'static str) {
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
            stored_at,
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

    /// Whether JetStream delivers `msg` no more (the consumer's `max_deliver` is the retry
    /// budget plus one).
    fn is_last_delivery(&self, msg: &Message) -> bool {
        msg.info()
            .is_ok_and(|i| i.delivered > i64::from(self.settings.max_deliver))
    }

    /// A nak on the last delivery would drop the command with only an advisory: keep a dead
    /// letter instead, so an operator sees it (and the orchestrator's step timeout decides).
    async fn unanswered(&self, msg: &Message) -> AckKind {
        let reason = format!(
            "no reply could be recorded after {} deliveries",
            self.settings.max_deliver + 1
        );
        error!(participant = %self.name, subject = %msg.subject, %reason, "dead-lettering the command");
        let source = format!("participant.{}", self.name);
        let settled = jetsaga_runtime::dead_letter::settle(&self.js, &source, msg, &reason).await;
        if matches!(settled, AckKind::Term) {
            self.metrics.dead_letter(&self.name, "unanswered");
        }
        settled
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
    ) -> Result<
        Option<jetstream::message::StreamMessage>,
        async_nats::jetstream::stream::DirectGetError,
    > {
        match self
            .replies
            .direct_get_last_for_subject(command.reply_to.clone())
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Publishes a reply; a reply already recorded for the command counts as published.
    async fn publish(
        &self,
        subject: String,
        mut headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), async_nats::jetstream::context::PublishError> {
        only_if_unrecorded(&mut headers);
        let stored = async {
            self.js
                .publish_with_headers(subject, headers, payload)
                .await?
                .await
        };
        match stored.await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The reply to `command` as headers and body.
fn reply_message(
    command: &Command,
    outcome: Outcome,
    traceparent: Option<String>,
    ttl: Duration,
) -> (HeaderMap, bytes::Bytes) {
    let reply = Reply {
        protocol: protocol::VERSION,
        command_id: command.command_id.clone(),
        saga_id: command.saga_id.clone(),
        outcome,
    };
    let mut headers = HeaderMap::new();
    put_header(&mut headers, header::SAGA_ID, command.saga_id.as_str());
    put_header(
        &mut headers,
        header::COMMAND_ID,
        command.command_id.as_str(),
    );
    // The recorded reply goes after `ttl`, and its subject with it (see `Builder::reply_ttl`).
    put_header(
        &mut headers,
        header::TTL,
        jetsaga_runtime::kv::ttl_header(ttl),
    );
    if let Some(traceparent) = traceparent {
        put_header(&mut headers, header::TRACEPARENT, traceparent);
    }
    (headers, reply.encode().into())
}

/// Makes a reply publish conditional on its subject (the command's own) holding no reply:
/// JetStream stores the first reply to a command and answers every later one "wrong last
/// sequence" for as long as the recorded reply lives, with no duplicate-window entry to keep.
fn only_if_unrecorded(headers: &mut HeaderMap) {
    put_header(headers, header::EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
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
