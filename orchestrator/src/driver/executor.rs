//! The thin executor: one task that owns the [`Core`], feeds it messages,
//! requests and I/O outcomes, and carries out its I/O requests with async-nats.
//!
//! Every request that touches the network becomes a future in one
//! `FuturesUnordered`, so thousands are in flight while the task itself never
//! waits on the network; the core's state is owned by this task alone, no locks.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use jetsaga_sagas::Phase;
use jetsaga_sagas::protocol::{header, subject};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::core::{Answer, Core, Done, Handles, Incoming, Io, Settle, Write};
use super::{ApiError, Error, Source, Started};
use crate::dead;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::record::Outbound;
use crate::store::Store;
use jetsaga_runtime::nats::put_header;

/// The most overdue sagas one sweep wakes; the next sweep takes the rest.
const SWEEP_LIMIT: usize = 1000;

/// The executor's side of what the core settles and answers.
#[derive(Debug)]
pub(crate) struct Nats;

impl Handles for Nats {
    type Message = Box<jetstream::Message>;
    type StartReply = oneshot::Sender<Result<Started, ApiError>>;
    type PhaseReply = oneshot::Sender<Result<Phase, ApiError>>;
}

/// A request from a [`crate::Handle`].
pub(crate) type Request = super::core::Work<Nats>;

/// What the consumers deliver, one channel each, taken in this order of
/// priority: replies first (they finish work already under way, and one left
/// waiting turns into a timeout), then timer fires, then operator requests, then
/// new starts, which wait in their stream while the rest keeps the instance busy.
#[derive(Debug, Default)]
pub(crate) struct Intake {
    replies: Option<mpsc::Receiver<jetstream::Message>>,
    timers: Option<mpsc::Receiver<jetstream::Message>>,
    starts: Option<mpsc::Receiver<jetstream::Message>>,
}

impl Intake {
    /// Where `source`'s messages arrive.
    pub(crate) fn set(&mut self, source: Source, rx: mpsc::Receiver<jetstream::Message>) {
        let slot = match source {
            Source::Replies => &mut self.replies,
            Source::Timers => &mut self.timers,
            Source::Starts => &mut self.starts,
        };
        *slot = Some(rx);
    }

    fn close(&mut self) {
        for rx in [&mut self.replies, &mut self.timers, &mut self.starts]
            .into_iter()
            .flatten()
        {
            rx.close();
        }
    }
}

/// The next message of a channel; never, for a channel that is not there.
async fn recv(rx: &mut Option<mpsc::Receiver<jetstream::Message>>) -> Option<jetstream::Message> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The driver task's state.
pub(crate) struct Driver {
    core: Core<Nats>,
    js: jetstream::Context,
    store: Store,
    /// Where participants' replies are stored (one subject per command).
    replies: jetstream::stream::Stream,
    inflight: FuturesUnordered<BoxFuture<'static, Option<Done>>>,
    /// Where the timer sweep finds overdue sagas.
    index: Index,
    /// How often it runs, and how overdue a timer must be.
    timer_sweep: Duration,
    /// The consumers' ack wait.
    ack_wait: Duration,
    /// Added to the system clock in every decision (see [`Settings`]).
    clock_offset: chrono::TimeDelta,
    /// The `Nats-TTL` of every command.
    command_ttl: String,
    /// Whether new starts are taken (a start pulled just before the gate closed waits in
    /// its channel).
    admission: crate::admission::Admission,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("core", &self.core)
            .field("inflight", &self.inflight.len())
            .finish()
    }
}

/// What the driver reads and writes.
#[derive(Debug)]
pub(crate) struct Jetstream {
    /// For commands, events and timers.
    pub(crate) js: jetstream::Context,
    /// The journal.
    pub(crate) store: Store,
    /// The replies stream, where a timeout looks for a reply already stored.
    pub(crate) replies: jetstream::stream::Stream,
}

/// The driver's timing settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// The TTL of a finished saga's record.
    pub(crate) finished_retention: Duration,
    /// How often the timer sweep runs, and how overdue a timer must be.
    pub(crate) timer_sweep: Duration,
    /// The consumers' ack wait.
    pub(crate) ack_wait: Duration,
    /// Added to the clock (`engine.clock-offset`, for skew tests).
    pub(crate) clock_offset: chrono::TimeDelta,
    /// How long a command is kept (`streams.command-ttl`).
    pub(crate) command_ttl: Duration,
}

impl Driver {
    pub(crate) fn new(
        jetstream: Jetstream,
        metrics: Metrics,
        registry: std::sync::Arc<crate::definitions::Registry>,
        trace: Option<crate::trace::Tracer>,
        index: Index,
        settings: Settings,
    ) -> Self {
        Self {
            core: Core::new(registry, metrics, settings.finished_retention)
                .with_tracer(trace)
                .with_ack_wait(settings.ack_wait),
            js: jetstream.js,
            store: jetstream.store,
            replies: jetstream.replies,
            inflight: FuturesUnordered::new(),
            index,
            timer_sweep: settings.timer_sweep,
            ack_wait: settings.ack_wait,
            clock_offset: settings.clock_offset,
            command_ttl: format!("{}s", settings.command_ttl.as_secs().max(1)),
            admission: crate::admission::Admission::open(),
        }
    }

    /// Takes new starts only while `admission` lets them in.
    pub(crate) fn with_admission(mut self, admission: crate::admission::Admission) -> Self {
        self.admission = admission;
        self
    }

    /// This instance's clock: the only one the core sees.
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }

    /// Runs until `token` is cancelled, then finishes the work in flight.
    pub(crate) async fn run(
        mut self,
        mut intake: Intake,
        mut requests: mpsc::Receiver<Request>,
        token: CancellationToken,
    ) {
        // Also marks held messages in progress: at least thrice per ack wait.
        let mut gauges = tokio::time::interval(Duration::from_secs(1).min(self.ack_wait / 3));
        let mut sweep = tokio::time::interval(self.timer_sweep);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A start taken from its channel, applied once the admission gate lets it in.
        let mut held: Option<jetstream::Message> = None;
        loop {
            if held.is_some()
                && self.admission.admits().is_ok()
                && let Some(message) = held.take()
            {
                self.handle_message(Source::Starts, message);
                self.perform();
            }
            tokio::select! {
                biased;
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if let Some(done) = done {
                        self.core.handle_io_done(self.now(), done);
                    }
                }
                _ = gauges.tick() => self.core.handle_tick(self.now()),
                _ = sweep.tick() => self.sweep_timers(),
                Some(message) = recv(&mut intake.replies) => self.handle_message(Source::Replies, message),
                Some(message) = recv(&mut intake.timers) => self.handle_message(Source::Timers, message),
                Some(request) = requests.recv() => self.core.handle_input(self.now(), request),
                Some(message) = recv(&mut intake.starts), if held.is_none() && self.admission.admits().is_ok() => {
                    // The gate may have closed while this select waited.
                    held = Some(message);
                }
                () = token.cancelled() => break,
            }
            self.perform();
        }
        // Stop taking new work; what is queued behind busy sagas is left unacked and
        // JetStream redelivers it (to this or another instance).
        requests.close();
        intake.close();
        self.core.handle_shutdown();
        self.perform();
        while let Some(done) = self.inflight.next().await {
            if let Some(done) = done {
                self.core.handle_io_done(self.now(), done);
            }
            self.perform();
        }
        while let Ok(request) = requests.try_recv() {
            self.core.handle_input(self.now(), request);
        }
        self.perform();
    }

    /// Wakes live sagas whose recorded timer is overdue by more than a sweep
    /// interval, once the listing has caught up with the journal.
    fn sweep_timers(&mut self) {
        if !self.index.caught_up() {
            return;
        }
        let now = self.now();
        let margin = chrono::Duration::from_std(self.timer_sweep).unwrap_or_default();
        let overdue = self.index.overdue(now - margin, SWEEP_LIMIT);
        if !overdue.is_empty() {
            self.core.handle_overdue(now, overdue);
        }
    }

    fn handle_message(&mut self, source: Source, message: jetstream::Message) {
        let message = Box::new(message);
        let info = message.info().ok();
        let delivered = info
            .as_ref()
            .and_then(|info| u64::try_from(info.delivered).ok());
        let stored_at = info.and_then(|info| {
            let nanos = i64::try_from(info.published.unix_timestamp_nanos()).ok()?;
            Some(DateTime::from_timestamp_nanos(nanos))
        });
        let traceparent = message
            .headers
            .as_ref()
            .and_then(|h| h.get(header::TRACEPARENT))
            .map(|v| v.as_str().to_owned());
        let subject = message.subject.clone();
        let payload = message.payload.clone();
        let now = self.now();
        self.core.handle_message(
            now,
            Incoming {
                source,
                subject: &subject,
                payload: &payload,
                traceparent,
                delivered,
                stored_at,
                message,
            },
        );
    }

    /// Carries out every request the core has.
    fn perform(&mut self) {
        while let Some(io) = self.core.poll_io() {
            match io {
                Io::Load { saga_id, leader } => {
                    let store = self.store.clone();
                    self.spawn(async move {
                        let result = store.load(&saga_id, leader).await;
                        let result = result.map(|found| found.map(Box::new)).map_err(Error::from);
                        Done::Loaded { saga_id, result }
                    });
                }
                Io::Publish { saga_id, messages } => {
                    let (js, ttl) = (self.js.clone(), self.command_ttl.clone());
                    self.spawn(async move {
                        let result = publish_effects(&js, &messages, true, &ttl).await;
                        Done::Published { saga_id, result }
                    });
                }
                Io::Write { saga_id, write } => {
                    let (js, store) = (self.js.clone(), self.store.clone());
                    let ttl = self.command_ttl.clone();
                    self.spawn(async move {
                        let result = perform_write(&js, &store, &saga_id, write, &ttl).await;
                        Done::Written { saga_id, result }
                    });
                }
                Io::FindReply { saga_id, subject } => {
                    let replies = self.replies.clone();
                    self.spawn(async move {
                        let result = find_reply(&replies, subject).await;
                        Done::ReplyFound { saga_id, result }
                    });
                }
                Io::SetTimer { saga_id, at } => {
                    let js = self.js.clone();
                    self.spawn(async move {
                        let result = set_timer(&js, &saga_id, at).await;
                        Done::TimerSet { saga_id, result }
                    });
                }
                Io::Settle { message, settle } => {
                    let kind = match settle {
                        Settle::Ack => AckKind::Ack,
                        Settle::Nak(delay) => AckKind::Nak(Some(delay)),
                        Settle::Term => AckKind::Term,
                    };
                    self.inflight.push(
                        async move {
                            if let Err(e) = message.ack_with(kind).await {
                                tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                            }
                            None
                        }
                        .boxed(),
                    );
                }
                Io::Progress { message } => {
                    self.inflight.push(
                        async move {
                            if let Err(e) = message.ack_with(AckKind::Progress).await {
                                tracing::debug!(error = %e, "cannot mark a message in progress");
                            }
                            None
                        }
                        .boxed(),
                    );
                }
                Io::DeadLetter {
                    message,
                    source,
                    reason,
                } => {
                    let js = self.js.clone();
                    self.inflight.push(
                        async move {
                            dead::publish_and_term(
                                &js,
                                source.dead_letter_source(),
                                *message,
                                &reason,
                            )
                            .await;
                            None
                        }
                        .boxed(),
                    );
                }
                Io::Answer(Answer::Started(reply, result)) => {
                    let _ = reply.send(result);
                }
                Io::Answer(Answer::Phase(reply, result)) => {
                    let _ = reply.send(result);
                }
            }
        }
    }
}

impl Driver {
    /// Runs I/O whose outcome the core waits for.
    fn spawn(&mut self, io: impl Future<Output = Done> + Send + 'static) {
        self.inflight.push(io.map(Some).boxed());
    }
}

/// The writes of one transition, in the order that keeps it crash-safe.
async fn perform_write(
    js: &jetstream::Context,
    store: &Store,
    saga_id: &str,
    write: Write,
    command_ttl: &str,
) -> Result<u64, Error> {
    if let Some(at) = write.set_timer {
        set_timer(js, saga_id, at).await?;
    }
    let seq = store
        .append_encoded(
            saga_id,
            &write.append.headers,
            write.append.body,
            write.append.expected,
        )
        .await?;
    // The record is stored: if what follows fails, the effects are published
    // again when the saga is next loaded (the input is redelivered or its timer fires).
    publish_effects(js, &write.publish, false, command_ttl).await?;
    if write.clear_timer {
        clear_timer(js, saga_id).await?;
    }
    Ok(seq)
}

/// Publishes commands and events and waits for JetStream to store them all;
/// returns the message ids it had already (de-duplicated). `resent` marks a
/// recovery re-publish, so participants check their records.
async fn publish_effects(
    js: &jetstream::Context,
    effects: &[Outbound],
    resent: bool,
    command_ttl: &str,
) -> Result<Vec<String>, Error> {
    let mut acks = Vec::with_capacity(effects.len());
    for effect in effects {
        let mut headers = HeaderMap::new();
        put_header(&mut headers, header::MSG_ID, effect.msg_id.as_str());
        for (name, value) in &effect.headers {
            put_header(&mut headers, name, value.as_str());
        }
        if resent {
            put_header(&mut headers, header::RESENT, "true");
        }
        if effect.expires {
            put_header(&mut headers, header::TTL, command_ttl);
        }
        let failed = |source| Error::Publish {
            subject: effect.subject.clone(),
            source,
        };
        let ack = js
            .publish_with_headers(effect.subject.clone(), headers, effect.body.clone())
            .await
            .map_err(failed)?;
        acks.push((ack, failed, effect));
    }
    let mut duplicates = Vec::new();
    for (ack, failed, effect) in acks {
        if ack.await.map_err(failed)?.duplicate {
            duplicates.push(effect.msg_id.clone());
        }
    }
    Ok(duplicates)
}

/// The payload of the last message on `subject` of the replies stream, if any.
async fn find_reply(
    replies: &jetstream::stream::Stream,
    subject: String,
) -> Result<Option<Bytes>, Error> {
    match replies.direct_get_last_for_subject(&subject).await {
        Ok(message) => Ok(Some(message.payload)),
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::FindReply { subject, source }),
    }
}

/// Schedules the saga's single timer at `at`, replacing any armed one.
async fn set_timer(js: &jetstream::Context, saga_id: &str, at: DateTime<Utc>) -> Result<(), Error> {
    let mut headers = HeaderMap::new();
    put_header(
        &mut headers,
        header::SCHEDULE,
        format!("@at {}", at.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
    );
    put_header(
        &mut headers,
        header::SCHEDULE_TARGET,
        subject::timer_fire(saga_id),
    );
    put_header(&mut headers, header::SAGA_ID, saga_id);
    publish_timer(js, saga_id, headers).await
}

/// Cancels the saga's timer: a plain message replaces the schedule (one message
/// per subject) and expires by itself.
async fn clear_timer(js: &jetstream::Context, saga_id: &str) -> Result<(), Error> {
    let mut headers = HeaderMap::new();
    put_header(&mut headers, header::TTL, "1s");
    publish_timer(js, saga_id, headers).await
}

async fn publish_timer(
    js: &jetstream::Context,
    saga_id: &str,
    headers: HeaderMap,
) -> Result<(), Error> {
    let failed = |source| Error::Timer {
        saga_id: saga_id.to_owned(),
        source,
    };
    js.publish_with_headers(subject::timer_set(saga_id), headers, Bytes::new())
        .await
        .map_err(failed)?
        .await
        .map_err(failed)?;
    Ok(())
}
