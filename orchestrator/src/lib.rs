//! The jetsaga orchestrator: runs sagas as persisted state machines on NATS
//! JetStream.
//!
//! - [`config`]: the typed configuration (file + environment).
//! - [`definitions`]: the saga definitions it knows, by name and version.
//! - [`provision`]: creates and checks streams and consumers.
//! - [`store`]: the journal stream: saga state and history, with optimistic concurrency.
//! - [`driver`]: applies inputs to sagas: a pure scheduler core and the executor
//!   that carries out its I/O.
//! - [`http`]: the operator API, probes, metrics, OpenAPI and the web page.
//! - [`index`]: the saga listing, an in-memory projection of the journal.
//! - [`dead`]: dead letters: writing them, listing, redriving, deleting.
//! - [`metrics`]: Prometheus metrics.
//! - [`census`]: true counts of the journal's sagas by state, for the metrics.
//! - `trace`: one OpenTelemetry trace per saga (root, step attempts, compensations,
//!   replies), derived from the persisted saga, when an OTLP endpoint is configured.
//!
//! [`Service::start`] connects, provisions, and starts the driver; the returned
//! [`Running`] gives a [`Handle`] for starting, retrying and aborting sagas.
//!
//! ```no_run
//! # async fn demo() -> Result<(), jetsaga_orchestrator::Error> {
//! use jetsaga_orchestrator::{Service, config::Config};
//!
//! let running = Service::start(Config::default()).await?;
//! let input = serde_json::json!({"customer_id": "c-42", "email": "ana@example.com",
//!     "items": [{"sku": "sku-1", "quantity": 2}], "amount_cents": 4999,
//!     "currency": "EUR", "card_token": "tok_ok"});
//! let started = running.handle().start("order-creation", "order-1", input).await?;
//! println!("{started:?}");
//! running.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod admission;
pub mod census;
pub mod config;
pub mod dead;
pub mod definitions;
pub mod driver;
pub mod http;
pub mod index;
pub mod metrics;
pub mod provision;
mod record;
pub mod store;
mod trace;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::jetstream;
use jetsaga_sagas::{Entry, Input, Phase, Saga};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use driver::{ApiError, Started};

use crate::config::Config;
use crate::definitions::Registry;
use crate::driver::Source;
use crate::driver::core::{Origin, Work};
use crate::driver::executor::{Driver, Request};
use crate::metrics::Metrics;
use crate::store::Store;

/// How many starts one pull asks for: pulled starts wait unacknowledged while admission
/// control holds them.
const STARTS_BATCH: usize = 64;

/// Why the orchestrator could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// A definition file is invalid.
    #[error("invalid saga definitions:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Definitions(Vec<jetsaga_sagas::definition::Error>),
    /// NATS could not be reached.
    #[error(transparent)]
    Connect(#[from] jetsaga_runtime::nats::Error),
    /// Streams or consumers could not be set up.
    #[error(transparent)]
    Provision(#[from] provision::Error),
    /// The journal could not be opened.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The replies stream could not be bound.
    #[error("cannot open the replies stream")]
    Replies(#[source] async_nats::jetstream::context::GetStreamError),
    /// The HTTP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A start, retry or abort was refused.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// Connects to NATS with the configured credentials.
pub async fn connect(nats: &config::Nats, name: &str) -> Result<async_nats::Client, Error> {
    Ok(jetsaga_runtime::nats::connect(nats, name).await?.client)
}

/// The orchestrator service; see [`Service::start`].
#[derive(Debug)]
pub struct Service;

/// A cheap-to-clone handle to a running orchestrator.
#[derive(Debug, Clone)]
pub struct Handle {
    requests: mpsc::Sender<Request>,
    store: Store,
    registry: Arc<Registry>,
    metrics: Metrics,
    client: async_nats::Client,
    js: jetstream::Context,
    index: index::Index,
    ready: Arc<AtomicBool>,
    admission: admission::Admission,
}

/// A running orchestrator.
#[derive(Debug)]
pub struct Running {
    handle: Handle,
    http_addr: SocketAddr,
    token: CancellationToken,
    tracker: TaskTracker,
    client: async_nats::Client,
    grace: std::time::Duration,
    driver_done: oneshot::Receiver<()>,
}

impl Service {
    /// Connects, provisions streams and consumers, binds HTTP and starts the driver.
    pub async fn start(config: Config) -> Result<Running, Error> {
        config.validate()?;
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: config.http.listen,
                source,
            })?;
        Self::start_with_listener(config, listener).await
    }

    /// As [`Service::start`], on an already bound listener (tests use port 0).
    pub async fn start_with_listener(
        config: Config,
        listener: tokio::net::TcpListener,
    ) -> Result<Running, Error> {
        config.validate()?;
        let http_settings = http::Settings::from_config(&config.http)?;
        if !http_settings.auth.enabled() {
            tracing::warn!(
                listen = %config.http.listen,
                "NO API TOKENS CONFIGURED: anyone who can reach the HTTP listener can start, \
                 retry and abort sagas and redrive dead letters; set [http] tokens"
            );
        }
        let registry = match &config.engine.definitions {
            Some(dir) => Registry::with_dir(dir).map_err(Error::Definitions)?,
            None => Registry::builtin(),
        };
        registry
            .check_storage(&config.streams)
            .map_err(Error::Definitions)?;
        let registry = Arc::new(registry);
        let metrics = Metrics::new()?;
        metrics.register_types(registry.all().map(|d| d.name.as_str()));
        let client = connect(&config.nats, &config.engine.instance).await?;
        let js = jetstream::ContextBuilder::new()
            .max_ack_inflight(config.engine.max_in_flight.max(1024) * 4)
            .build(client.clone());
        provision::streams(&js, &config.streams).await?;
        let settings = provision::ConsumerSettings {
            ack_wait: config.engine.ack_wait,
            max_deliver: config.engine.max_deliver,
            max_ack_pending: config.engine.max_in_flight as i64,
        };
        let consumers = [
            (
                Source::Replies,
                provision::consumer(
                    &js,
                    jetsaga_sagas::streams::REPLIES.name,
                    provision::REPLIES_CONSUMER,
                    jetsaga_sagas::protocol::subject::REPLIES,
                    settings,
                )
                .await?,
            ),
            (
                Source::Starts,
                provision::consumer(
                    &js,
                    jetsaga_sagas::streams::STARTS.name,
                    provision::STARTS_CONSUMER,
                    jetsaga_sagas::protocol::subject::STARTS,
                    settings,
                )
                .await?,
            ),
            (
                Source::Timers,
                provision::consumer(
                    &js,
                    jetsaga_sagas::streams::TIMERS.name,
                    provision::TIMERS_CONSUMER,
                    provision::TIMER_FIRED,
                    settings,
                )
                .await?,
            ),
        ];
        let advisories = provision::consumer(
            &js,
            jetsaga_sagas::streams::ADVISORIES.name,
            provision::ADVISORIES_CONSUMER,
            jetsaga_sagas::protocol::subject::MAX_DELIVERIES_ADVISORIES,
            provision::ConsumerSettings {
                max_deliver: -1,
                max_ack_pending: 1024,
                ..settings
            },
        )
        .await?;
        let store = Store::new(js.clone()).await?;
        let ready = Arc::new(AtomicBool::new(true));
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();

        let index = index::Index::bounded(registry.clone(), config.engine.listing_max_finished);
        tracker.spawn(index::run(js.clone(), index.clone(), token.clone()));
        let admission = admission::spawn(
            admission::Gate::new(
                config.engine.admission_window,
                config.engine.admission_floor,
            ),
            admission::Sources {
                index: index.clone(),
                js: js.clone(),
                max_bytes: config.streams.max_bytes.as_u64(),
            },
            metrics.clone(),
            &tracker,
            token.clone(),
        );

        // One channel per consumer, so the driver can take replies before timer
        // fires and both before new starts (see `driver::executor::Intake`).
        let batch = config.engine.max_in_flight.clamp(1, 1000);
        let mut intake = driver::executor::Intake::default();
        for (source, consumer) in consumers {
            let (tx, rx) = mpsc::channel(config.engine.max_in_flight);
            intake.set(source, rx);
            // Starts pass the admission gate and are pulled in small batches: those pulled
            // while it is closed wait unacknowledged.
            let (gate, batch) = match source {
                Source::Starts => (admission.clone(), batch.min(STARTS_BATCH)),
                Source::Replies | Source::Timers => (admission::Admission::open(), batch),
            };
            tracker.spawn(pump(consumer, tx, gate, token.clone(), batch));
        }
        tracker.spawn(dead::watch_max_deliveries(
            advisories,
            js.clone(),
            metrics.clone(),
            token.clone(),
        ));
        tracker.spawn(watch_connection(
            client.clone(),
            metrics.clone(),
            ready.clone(),
            token.clone(),
        ));

        tracker.spawn(census::run(
            index.clone(),
            registry.clone(),
            metrics.clone(),
            token.clone(),
        ));

        let (request_tx, request_rx) = mpsc::channel(1024);
        // Saga spans only when traces are exported: otherwise none is built.
        let trace = (!config.telemetry.otlp_endpoint.is_empty())
            .then(|| trace::Tracer::global(config.telemetry.sampling_ratio));
        let replies = js
            .get_stream(jetsaga_sagas::streams::REPLIES.name)
            .await
            .map_err(Error::Replies)?;
        let driver = Driver::new(
            driver::executor::Jetstream {
                js: js.clone(),
                store: store.clone(),
                replies,
            },
            metrics.clone(),
            registry.clone(),
            trace,
            index.clone(),
            driver::executor::Settings {
                finished_retention: config.streams.finished_retention,
                timer_sweep: config.engine.timer_sweep,
                ack_wait: config.engine.ack_wait,
                clock_offset: config.engine.clock_offset,
                command_ttl: config.streams.command_ttl,
            },
        )
        .with_admission(admission.clone());
        let (driver_done_tx, driver_done) = oneshot::channel();
        let driver_token = token.clone();
        tracker.spawn(async move {
            driver.run(intake, request_rx, driver_token).await;
            let _ = driver_done_tx.send(());
        });

        let handle = Handle {
            requests: request_tx,
            store,
            registry,
            metrics,
            client: client.clone(),
            js: js.clone(),
            index,
            ready,
            admission,
        };
        let http_addr = listener.local_addr().map_err(|source| Error::Listen {
            addr: config.http.listen,
            source,
        })?;
        let router = http::router(handle.clone(), http_settings);
        let http_token = token.clone();
        tracker.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { http_token.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        tracker.close();
        tracing::info!(%http_addr, instance = config.engine.instance, "orchestrator started");
        Ok(Running {
            handle,
            http_addr,
            token,
            tracker,
            client,
            grace: config.engine.shutdown_grace,
            driver_done,
        })
    }
}

impl Running {
    /// A handle for starting and steering sagas.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Where the HTTP API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Stops pulling, finishes in-flight work (within the grace period), drains
    /// the NATS connection and stops the HTTP server.
    pub async fn shutdown(self) {
        self.handle.ready.store(false, Ordering::SeqCst);
        self.token.cancel();
        let graceful = async {
            let _ = self.driver_done.await;
            if let Err(e) = self.client.drain().await {
                tracing::warn!(error = %e, "draining the NATS connection failed");
            }
            self.tracker.wait().await;
        };
        if tokio::time::timeout(self.grace, graceful).await.is_err() {
            tracing::warn!(grace = ?self.grace, "shutdown grace period over; stopping with work in flight");
        }
        tracing::info!("orchestrator stopped");
    }
}

/// Runs the orchestrator until `shutdown` resolves: what `jetsaga serve` does.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let running = Service::start(config).await?;
    shutdown.await;
    running.shutdown().await;
    Ok(())
}

impl Handle {
    async fn request<T>(
        &self,
        work_of: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Request,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(work_of(tx))
            .await
            .map_err(|_| ApiError::ShuttingDown)?;
        rx.await.map_err(|_| ApiError::ShuttingDown)?
    }

    /// Starts a saga of the newest version of `saga_type`. The same key always
    /// yields the same saga: repeating the call returns it with `created: false`.
    pub async fn start(
        &self,
        saga_type: &str,
        key: &str,
        input: serde_json::Value,
    ) -> Result<Started, ApiError> {
        self.start_traced(saga_type, key, input, None).await
    }

    /// As [`Handle::start`], joining the caller's trace.
    pub async fn start_traced(
        &self,
        saga_type: &str,
        key: &str,
        input: serde_json::Value,
        traceparent: Option<String>,
    ) -> Result<Started, ApiError> {
        self.start_requested(saga_type, key, input, traceparent, None)
            .await
    }

    /// As [`Handle::start_traced`], for a request the client made at
    /// `requested_at`: if its key has no saga and the request is older than
    /// the key horizon (`streams.finished-retention`) it is refused with
    /// [`ApiError::KeyHorizon`], since a saga it started may have expired.
    pub async fn start_requested(
        &self,
        saga_type: &str,
        key: &str,
        input: serde_json::Value,
        traceparent: Option<String>,
        requested_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Started, ApiError> {
        let def = self
            .registry
            .latest(saga_type)
            .ok_or_else(|| ApiError::UnknownType(saga_type.to_owned()))?
            .clone();
        if key.is_empty() {
            return Err(ApiError::InvalidInput("the start key is empty".to_owned()));
        }
        def.check_input(&input)
            .map_err(|invalid| ApiError::InvalidInput(invalid.to_string()))?;
        self.admission.admits().map_err(ApiError::Overloaded)?;
        let saga_id = driver::saga_id(&def.name, key);
        let key = key.to_owned();
        self.request(|reply| Work::Start {
            saga_id,
            def,
            key,
            input,
            traceparent,
            requested_at,
            origin: Origin::Api(reply),
        })
        .await
    }

    /// Resumes a failed saga's compensation (an action of `operator`, journaled).
    pub async fn retry(&self, saga_id: &str, operator: &str) -> Result<Phase, ApiError> {
        let input = Input::Retry {
            operator: operator.to_owned(),
        };
        self.operator(saga_id, input).await
    }

    /// Aborts a running saga before its pivot, which compensates it (an action of
    /// `operator`, journaled).
    pub async fn abort(
        &self,
        saga_id: &str,
        reason: &str,
        operator: &str,
    ) -> Result<Phase, ApiError> {
        let input = Input::Abort {
            reason: reason.to_owned(),
            operator: operator.to_owned(),
        };
        self.operator(saga_id, input).await
    }

    async fn operator(&self, saga_id: &str, input: Input) -> Result<Phase, ApiError> {
        self.request(|reply| Work::Input {
            saga_id: saga_id.to_owned(),
            input,
            origin: Origin::Api(reply),
        })
        .await
    }

    /// The saga's current state, read from the journal.
    pub async fn saga(&self, saga_id: &str) -> Result<Option<Saga>, ApiError> {
        let stored = self
            .store
            .load(saga_id, false)
            .await
            .map_err(|e| ApiError::from(driver::Error::from(e)))?;
        Ok(stored.map(|s| s.record.saga))
    }

    /// The saga's journal, oldest first.
    pub async fn journal(&self, saga_id: &str) -> Result<Vec<Entry>, ApiError> {
        self.store
            .history(saga_id)
            .await
            .map_err(|e| ApiError::from(driver::Error::from(e)))
    }

    /// The definitions this instance knows.
    pub fn definitions(&self) -> Vec<Arc<jetsaga_sagas::Definition>> {
        self.registry.all().cloned().collect()
    }

    /// The saga listing of this instance.
    pub fn index(&self) -> &index::Index {
        &self.index
    }

    /// Up to `limit` dead letters with an id of at least `from`, oldest first,
    /// from `source` or from all.
    pub async fn dead_letters(
        &self,
        source: Option<&str>,
        from: u64,
        limit: usize,
    ) -> Result<Vec<dead::Letter>, dead::Error> {
        dead::list(&self.js, source, from, limit).await
    }

    /// Publishes dead letter `id` again to its original subject; returns it.
    pub async fn redrive(&self, id: u64) -> Result<String, dead::Error> {
        dead::redrive(&self.js, id).await
    }

    /// Deletes dead letter `id`.
    pub async fn delete_dead_letter(&self, id: u64) -> Result<(), dead::Error> {
        dead::delete(&self.js, id).await
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether NATS is connected and the streams are in place.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err(NotReady::Stopping);
        }
        match self.client.connection_state() {
            async_nats::connection::State::Connected => {}
            other => return Err(NotReady::Disconnected(other)),
        }
        if !self.index.caught_up() {
            return Err(NotReady::CatchingUp);
        }
        Ok(())
    }
}

/// Why the orchestrator is not ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// It is shutting down, or not provisioned yet.
    #[error("shutting down or not provisioned")]
    Stopping,
    /// The NATS connection is not up.
    #[error("NATS connection is {0:?}")]
    Disconnected(async_nats::connection::State),
    /// The saga listing is still replaying the journal.
    #[error("the saga listing is catching up with the journal")]
    CatchingUp,
}

/// Pulls one consumer's messages into the driver's channel until cancelled; a free slot in
/// the channel is the permit, so the driver's queue bounds what is in flight.
async fn pump(
    consumer: jetstream::consumer::PullConsumer,
    tx: mpsc::Sender<jetstream::Message>,
    admission: admission::Admission,
    token: CancellationToken,
    batch: usize,
) {
    let settings = jetsaga_runtime::consume::Pull {
        batch,
        ..Default::default()
    };
    jetsaga_runtime::consume::pull(
        &consumer,
        settings,
        &token,
        // Closed when the driver stopped: the loop ends without taking another message.
        || {
            let mut admission = admission.clone();
            let tx = tx.clone();
            async move {
                admission.wait().await;
                tx.reserve_owned().await.ok()
            }
        },
        |message, permit| {
            permit.send(message);
        },
    )
    .await;
}

/// Keeps the connection gauge and readiness current.
async fn watch_connection(
    client: async_nats::Client,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    token: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                metrics.observe_connection(&client);
            }
            () = token.cancelled() => {
                ready.store(false, Ordering::SeqCst);
                return;
            }
        }
    }
}
