//! The pull-consume loop: bounded in-flight work, progress marking, graceful drain.
//!
//! [`pull`] is the one loop over a durable pull consumer: it takes a permit (whatever bounds
//! the work: a semaphore, a channel slot), then the next message, and hands both to a
//! synchronous `deliver`, so the hot path has no await beyond the permit and the message.
//! It re-subscribes when the pull stream fails or ends and stops when the token is cancelled.
//!
//! [`Consumer`] runs a [`Handler`] per message on top of it: at most `concurrency` at once,
//! each settled with the [`AckKind`] the handler returns; handlers running longer than a third
//! of `ack_wait` are marked in progress (`+WPI`) by one sweeper; on shutdown it stops pulling
//! and waits for the handlers in flight up to one grace period.
//!
//! ```no_run
//! use async_nats::jetstream::{AckKind, Message};
//! use jetsaga_runtime::consume::{Consumer, Handler, Settings};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     async fn handle(&self, message: &Message) -> AckKind {
//!         println!("{}", message.subject);
//!         AckKind::Ack
//!     }
//! }
//!
//! # async fn demo(consumer: async_nats::jetstream::consumer::PullConsumer, client: async_nats::Client) {
//! let drained = Consumer::new(consumer, client, Settings::default())
//!     .run(std::sync::Arc::new(Echo), async { let _ = tokio::signal::ctrl_c().await; })
//!     .await;
//! println!("{} left in flight", drained.left);
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause before pulling again after the consumer's message stream failed.
pub const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// How long one pull request lives. async-nats's pull stream can count messages as asked for
/// that the server holds no request for, and then sends a new request only 5 s after the
/// last one's expiry: with the client's default 30 s, the start intake stood still ~35 s in 4
/// of 16 runs of 60,000 sagas, with 5 s it stood still 10.3 s once (README, Performance). So a
/// stall lasts at most this + 5 s.
///
/// Pulling anew with a fresh stream when two heartbeats go missing cut that stall to 4.2 s,
/// but in a cluster heartbeats also stop during a consumer leader's election while the
/// request lives on (the new leader answers it), and whatever is delivered to a dropped
/// stream's inbox waits for `ack_wait`: so missed heartbeats are only logged.
pub const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// The idle heartbeat of a pull request (at most half its expiry, as the server requires).
pub const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// How messages are pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pull {
    /// Messages asked for per pull request.
    pub batch: usize,
    /// Idle heartbeat of a pull request.
    pub heartbeat: Duration,
    /// How long a pull request lives.
    pub expires: Duration,
}

impl Default for Pull {
    fn default() -> Self {
        Self {
            batch: 256,
            heartbeat: PULL_HEARTBEAT,
            expires: PULL_EXPIRES,
        }
    }
}

/// Pulls from `consumer` until `token` is cancelled or `acquire` yields `None`: for each
/// message, first a permit from `acquire`, then the message, then `deliver(message, permit)`.
pub async fn pull<P, A, AF, D>(
    consumer: &PullConsumer,
    settings: Pull,
    token: &CancellationToken,
    mut acquire: A,
    mut deliver: D,
) where
    A: FnMut() -> AF,
    AF: Future<Output = Option<P>>,
    D: FnMut(Message, P),
{
    while !token.is_cancelled() {
        let stream = consumer
            .stream()
            .max_messages_per_batch(settings.batch)
            .heartbeat(settings.heartbeat)
            .expires(settings.expires);
        let mut messages = match stream.messages().await {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull; trying again");
                tokio::select! {
                    () = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue,
                    () = token.cancelled() => return,
                }
            }
        };
        loop {
            let permit = tokio::select! {
                biased;
                () = token.cancelled() => return,
                permit = acquire() => match permit {
                    Some(permit) => permit,
                    None => return,
                },
            };
            let next = tokio::select! {
                biased;
                () = token.cancelled() => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => deliver(message, permit),
                Some(Err(e)) => tracing::debug!(error = %e, "pull stream hiccup"),
                None => {
                    tracing::debug!("pull stream ended; pulling again");
                    break;
                }
            }
        }
    }
}

/// Decides how one message is settled.
pub trait Handler: Send + Sync + 'static {
    /// Handles `message`; the consumer then acknowledges it with the returned kind.
    fn handle(&self, message: &Message) -> impl Future<Output = AckKind> + Send;
}

/// The settings of a [`Consumer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Handlers running at once.
    pub concurrency: usize,
    /// How messages are pulled.
    pub pull: Pull,
    /// The consumer's `ack_wait`: handlers running longer than a third of it are marked in
    /// progress.
    pub ack_wait: Duration,
    /// How long shutdown waits for handlers in flight.
    pub grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 64,
            pull: Pull::default(),
            ack_wait: Duration::from_secs(30),
            grace: Duration::from_secs(30),
        }
    }
}

/// How a [`Consumer`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Handlers still running when the grace period ended (their messages will be
    /// redelivered).
    pub left: usize,
}

/// Runs a [`Handler`] over a pull consumer; see the [module docs](self).
#[derive(Debug)]
pub struct Consumer {
    consumer: PullConsumer,
    client: async_nats::Client,
    settings: Settings,
}

impl Consumer {
    /// A consumer over `consumer`; `client` marks long handlers in progress.
    pub fn new(consumer: PullConsumer, client: async_nats::Client, settings: Settings) -> Self {
        Self {
            consumer,
            client,
            settings,
        }
    }

    /// Handles messages until `shutdown` resolves, then stops pulling and waits (up to the
    /// grace period) for the handlers in flight.
    pub async fn run<H: Handler>(
        self,
        handler: Arc<H>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Drained {
        let settings = self.settings;
        let progress = Arc::new(Progress::default());
        let sweeper_token = CancellationToken::new();
        let sweeper = TaskTracker::new();
        sweeper.spawn(progress.clone().sweep(
            self.client.clone(),
            settings.ack_wait / 3,
            sweeper_token.clone(),
        ));
        sweeper.close();

        let semaphore = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let pulling = pull(
            &self.consumer,
            settings.pull,
            &token,
            || semaphore.clone().acquire_owned().map(Result::ok),
            |message, permit| {
                let handler = handler.clone();
                let progress = progress.clone();
                tracker.spawn(async move {
                    let running = progress.track(&message);
                    let kind = handler.handle(&message).await;
                    drop(running);
                    settle(&message, kind).await;
                    drop(permit);
                });
            },
        );
        // Shutdown is looked at first on every wake: once it is signalled, no further message
        // is handed out, even one already buffered when a slot frees in the same wake.
        tokio::select! {
            biased;
            () = shutdown => token.cancel(),
            () = pulling => {}
        }
        tracing::info!(
            in_flight = tracker.len(),
            "stopping: finishing messages in flight"
        );
        tracker.close();
        let left = match tokio::time::timeout(settings.grace, tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                let left = tracker.len();
                tracing::warn!(
                    left,
                    "shutdown grace elapsed; messages left will be redelivered"
                );
                left
            }
        };
        sweeper_token.cancel();
        sweeper.wait().await;
        Drained { left }
    }
}

use futures::FutureExt as _;

/// Acknowledges `message` with `kind`, logging a failure (JetStream redelivers it then).
pub async fn settle(message: &Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(error = %e, subject = %message.subject, "cannot acknowledge");
    }
}

type Running = HashMap<u64, (Instant, async_nats::Subject)>;

/// The handlers running now, for the progress sweeper.
#[derive(Debug, Default)]
struct Progress {
    running: Mutex<Running>,
    next: AtomicU64,
}

/// Removes a handler from the sweeper's view when dropped.
struct Tracked<'a> {
    progress: &'a Progress,
    id: Option<u64>,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.progress.lock().remove(&id);
        }
    }
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn track(&self, message: &Message) -> Tracked<'_> {
        let id = message.reply.clone().map(|subject| {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            self.lock().insert(id, (Instant::now(), subject));
            id
        });
        Tracked { progress: self, id }
    }

    /// Every `period`, marks the handlers running longer than that as in progress: one timer
    /// for the whole consumer, none per message.
    async fn sweep(
        self: Arc<Self>,
        client: async_nats::Client,
        period: Duration,
        token: CancellationToken,
    ) {
        let period = period.max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = token.cancelled() => return,
            }
            let due: Vec<async_nats::Subject> = self
                .lock()
                .values()
                .filter(|(started, _)| started.elapsed() >= period)
                .map(|(_, subject)| subject.clone())
                .collect();
            for subject in due {
                if let Err(e) = client
                    .publish(subject, bytes::Bytes::from_static(b"+WPI"))
                    .await
                {
                    tracing::debug!(error = %e, "cannot mark a message in progress");
                }
            }
        }
    }
}
