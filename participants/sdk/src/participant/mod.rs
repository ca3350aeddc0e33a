//! The participant: the builder (`builder`), the consumer loop (here), per-key serialisation
//! (`keyed`) and the per-command pipeline (`worker`).

mod builder;
mod keyed;
mod worker;

use builder::Settings;
pub use builder::{Builder, DEFAULT_ACK_WAIT, DEFAULT_REPLY_TTL};
use keyed::KeyedLock;
use worker::Worker;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use async_nats::jetstream::{self, consumer};
use jetsaga_runtime::consume::{self, Pull};
use jetsaga_sagas::protocol::subject;
use jetsaga_sagas::streams::REPLIES;
use tracing::{info, warn};

use crate::handler::BoxHandler;
use crate::metrics::Metrics;
use crate::{Error, streams};

/// A participant: consumes its commands, runs the handlers, records and publishes replies.
pub struct Participant {
    pub(super) name: Arc<str>,
    pub(super) handlers: HashMap<String, BoxHandler>,
    pub(super) settings: Settings,
    pub(super) registry: prometheus::Registry,
    pub(super) metrics: Metrics,
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
        // The replies stream is looked up before the consumer exists, so a running consumer
        // always has its replies stream (and a caller waiting for the consumer knows both).
        let replies = js
            .get_stream(REPLIES.name)
            .await
            .map_err(|e| Error::Consumer {
                consumer: self.consumer_name(),
                reason: format!("look up stream {}: {e}", REPLIES.name),
            })?;
        let consumer = self.consumer(&js).await?;
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
                ..Pull::default()
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
