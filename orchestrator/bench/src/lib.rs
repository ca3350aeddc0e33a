//! `jetsaga bench`: the load generator, a library of its own so that the orchestrator's
//! production crate does not pull in an HTTP client.
//!
//! Starts order sagas against a running system, through the start subject (the
//! default) or the HTTP API, closed loop (`--sagas N --concurrency C`) or open
//! loop (`--rate R --duration D`, schedule-based: a slow system shows up as
//! latency, not as a lower offered rate). Latency is start to terminal state,
//! observed through the domain events; at the end sagas without an event are
//! looked up in the journal to tell failed from unfinished.
//!
//! A start whose publish (or HTTP request) times out or fails is retried with the same key
//! and message id until `--timeout` has passed: starts are idempotent, so a nats-server
//! restart or an orchestrator outage is something a run drives through; the retries are
//! counted in the report (`start_retries`). While waiting for the last sagas, those whose
//! event was missed (the event listener was disconnected) are looked up in the journal.
//!
//! [`Args`] is the command line (parsed by the `jetsaga` binary), [`Args::options`] checks it
//! into [`Options`], and [`run`] carries out the load and returns a [`Report`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use futures::StreamExt;
use jetsaga_sagas::Phase;
use jetsaga_sagas::protocol::{self, Body, header, saga_id};
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};

use jetsaga_orchestrator::store::Store;

pub mod builtin;

/// How sagas are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// Publish to `saga.start.<type>` (JetStream).
    Subject,
    /// `POST /v1/sagas/<type>` on the orchestrator.
    Http,
}

/// Who answers the saga's commands during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Participants {
    /// The system's own participants (the reference ones, started separately).
    Reference,
    /// Trivial inventory and payment participants inside the load generator (see
    /// [`builtin`]): the engine's cost without the reference participants' storage.
    Builtin,
}

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// `sagas` in all, at most `concurrency` unfinished at once.
    Closed {
        /// Sagas in all.
        sagas: u64,
        /// Unfinished at once.
        concurrency: u64,
    },
    /// `rate` per second for `duration`, on a fixed schedule.
    Open {
        /// Starts per second.
        rate: f64,
        /// How long.
        duration: Duration,
    },
}

/// Everything `jetsaga bench` takes.
#[derive(Debug, Clone)]
pub struct Options {
    /// NATS URL, or several comma-separated (a cluster's nodes).
    pub nats_url: String,
    /// The orchestrator's HTTP address, for `--via http` (and nothing else).
    pub http: String,
    /// Start path.
    pub via: Via,
    /// Load shape.
    pub load: Load,
    /// Share of orders the payment service declines.
    pub decline_share: f64,
    /// Items per order.
    pub items: u32,
    /// How long to wait for the last saga after the last start.
    pub timeout: Duration,
    /// Print one JSON object on the last line.
    pub json: bool,
    /// The saga type (an order-shaped input).
    pub saga_type: String,
    /// Who answers the commands.
    pub participants: Participants,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            http: "127.0.0.1:8080".to_owned(),
            via: Via::Subject,
            load: Load::Closed {
                sagas: 10_000,
                concurrency: 256,
            },
            decline_share: 0.1,
            items: 1,
            timeout: Duration::from_secs(60),
            json: false,
            saga_type: "order-creation".to_owned(),
            participants: Participants::Reference,
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

/// The result of a run, as printed with `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Sagas started.
    pub sagas: u64,
    /// Reached completed.
    pub completed: u64,
    /// Reached compensated.
    pub compensated: u64,
    /// Parked as failed.
    pub failed: u64,
    /// Neither, within the timeout.
    pub unfinished: u64,
    /// Sagas the decline rule chose (compensated must equal this).
    pub declined: u64,
    /// First start to last terminal state.
    pub elapsed_s: f64,
    /// Terminal sagas per second over `elapsed_s`.
    pub throughput_per_s: f64,
    /// Start (scheduled start, in open loop) to terminal state.
    pub latency_ms: Latency,
    /// Sagas whose end was observed through their domain event (the latency samples).
    pub observed: u64,
    /// Starts per second actually offered.
    pub offered_per_s: f64,
    /// Start publishes (or HTTP requests) that timed out or failed and were sent again.
    pub start_retries: u64,
    /// The keys of this run's sagas are `<key_prefix><i>` for `i` in `0..sagas`.
    pub key_prefix: String,
    /// The id of the saga with the longest latency (the `max`), to look up its journal.
    pub slowest_saga: Option<String>,
}

impl Report {
    /// Problems that make the run a failure: unfinished or failed sagas, or
    /// outcomes that do not match the decline rule.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.unfinished > 0 {
            problems.push(format!("{} sagas did not finish", self.unfinished));
        }
        if self.failed > 0 {
            problems.push(format!("{} sagas failed", self.failed));
        }
        if self.unfinished == 0 && self.failed == 0 {
            if self.compensated != self.declined {
                problems.push(format!(
                    "{} sagas compensated but {} were declined",
                    self.compensated, self.declined
                ));
            }
            if self.completed != self.sagas - self.declined {
                problems.push(format!(
                    "{} sagas completed but {} should have",
                    self.completed,
                    self.sagas - self.declined
                ));
            }
        }
        problems
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let l = &self.latency_ms;
        format!(
            "sagas        {}\ncompleted    {}\ncompensated  {} (declined {})\nfailed       {}\nunfinished   {}\n\
             elapsed      {:.2} s\noffered      {:.1} /s\nthroughput   {:.1} sagas/s\n\
             latency ms   p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1} (saga {})\nstart retries {}",
            self.sagas,
            self.completed,
            self.compensated,
            self.declined,
            self.failed,
            self.unfinished,
            self.elapsed_s,
            self.offered_per_s,
            self.throughput_per_s,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            self.slowest_saga.as_deref().unwrap_or("-"),
            self.start_retries
        )
    }
}

/// Nearest-rank percentiles of `samples` (milliseconds); all zero when empty.
pub fn percentiles(samples: &mut [f64]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let index = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        samples[index.clamp(1, samples.len()) - 1]
    };
    Latency {
        p50: rank(50.0),
        p90: rank(90.0),
        p99: rank(99.0),
        max: samples[samples.len() - 1],
    }
}

/// Whether saga number `i` is one the decline rule picks: exactly
/// `round(n × share)` of the first `n`, spread evenly.
pub fn declined(i: u64, share: f64) -> bool {
    let share = share.clamp(0.0, 1.0);
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

/// When saga number `i` is due in an open-loop run at `rate` per second.
pub fn scheduled(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// The order input for saga `i`.
pub fn order(i: u64, items: u32, decline: bool) -> serde_json::Value {
    let items: Vec<_> = (0..items.max(1))
        .map(|k| serde_json::json!({"sku": format!("sku-{}", (i + u64::from(k)) % 5 + 1), "quantity": 1}))
        .collect();
    serde_json::json!({
        "customer_id": format!("c-{}", i % 1000),
        "email": format!("customer{}@example.com", i % 1000),
        "items": items,
        "amount_cents": 1000 + (i % 5000),
        "currency": "EUR",
        "card_token": if decline { "tok_decline" } else { "tok_ok" },
    })
}

/// Whether `event` ends a saga of `saga_type` completed (`true`) or compensated (`false`);
/// `None` for any other event, e.g. the inventory's stock events, which name the saga whose
/// reservation crossed a threshold but belong to no saga type.
pub fn outcome(event: &protocol::Event, saga_type: &str) -> Option<bool> {
    if event.saga_type != saga_type {
        return None;
    }
    if event.event.ends_with("confirmed") {
        Some(true)
    } else if event.event.ends_with("cancelled") {
        Some(false)
    } else {
        None
    }
}

/// Why a run could not be carried out at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS or HTTP failed.
    #[error("{0}")]
    Io(String),
}

#[derive(Debug)]
struct Tracker {
    /// saga id -> (index, start instant)
    pending: HashMap<String, (u64, Instant)>,
    latencies: Vec<f64>,
    completed: u64,
    compensated: u64,
    last_end: Option<Instant>,
    /// The saga that took longest: latency in ms, id.
    slowest: Option<(f64, String)>,
}

/// Runs the load and reports.
pub async fn run(options: Options) -> Result<Report, Error> {
    // A cluster's URLs come comma-separated (as in the services' `nats.url`); async-nats
    // does not split a string itself.
    let urls: Vec<&str> = options.nats_url.split(',').map(str::trim).collect();
    let client = async_nats::connect(urls).await.map_err(|e| {
        Error::Io(format!(
            "cannot connect to NATS at {}: {e}",
            options.nats_url
        ))
    })?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .max_ack_inflight(20_000)
        .build(client.clone());
    let builtin = match options.participants {
        Participants::Builtin => Some(builtin::Builtin::start(&client)?),
        Participants::Reference => None,
    };
    let report = load(options, client, js).await;
    if let Some(builtin) = builtin {
        builtin.stop().await;
    }
    report
}

async fn load(
    options: Options,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
) -> Result<Report, Error> {
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let key_prefix = format!("bench-{}-", &run_id[..12]);
    let key = |i: u64| format!("{key_prefix}{i}");
    let retries = Arc::new(AtomicU64::new(0));

    let tracker = Arc::new(Mutex::new(Tracker {
        pending: HashMap::new(),
        latencies: Vec::new(),
        completed: 0,
        compensated: 0,
        last_end: None,
        slowest: None,
    }));
    let (concurrency, total) = match options.load {
        Load::Closed { sagas, concurrency } => (concurrency.max(1) as usize, sagas),
        Load::Open { rate, duration } => (
            Semaphore::MAX_PERMITS,
            (rate * duration.as_secs_f64()).round() as u64,
        ),
    };
    let permits = Arc::new(Semaphore::new(concurrency));
    let closed = matches!(options.load, Load::Closed { .. });

    let mut events = client
        .subscribe(jetsaga_sagas::protocol::subject::EVENTS)
        .await
        .map_err(|e| Error::Io(format!("subscribe to events: {e}")))?;
    client.flush().await.map_err(|e| Error::Io(e.to_string()))?;
    let finished = Arc::new(AtomicU64::new(0));
    let listener = {
        let tracker = tracker.clone();
        let permits = permits.clone();
        let finished = finished.clone();
        let saga_type = options.saga_type.clone();
        tokio::spawn(async move {
            while let Some(message) = events.next().await {
                let Ok(event) = protocol::Event::decode(&message.payload) else {
                    continue;
                };
                let Some(completed) = outcome(&event, &saga_type) else {
                    continue;
                };
                let mut t = tracker.lock().await;
                let Some((_, started)) = t.pending.remove(&event.saga_id) else {
                    continue;
                };
                let now = Instant::now();
                let took = now.duration_since(started).as_secs_f64() * 1000.0;
                t.latencies.push(took);
                if t.slowest.as_ref().is_none_or(|(most, _)| took > *most) {
                    t.slowest = Some((took, event.saga_id.clone()));
                }
                t.last_end = Some(now);
                if completed {
                    t.completed += 1;
                } else {
                    t.compensated += 1;
                }
                drop(t);
                finished.fetch_add(1, Ordering::Relaxed);
                if closed {
                    permits.add_permits(1);
                }
            }
        })
    };

    let http = match options.via {
        Via::Http => Some(HttpStarter::new(&options.http)?),
        Via::Subject => None,
    };
    let progress = {
        let finished = finished.clone();
        tokio::spawn(async move {
            let begin = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let done = finished.load(Ordering::Relaxed);
                eprintln!(
                    "bench: {:>5.1} s  {done}/{total} finished  {:.0} sagas/s",
                    begin.elapsed().as_secs_f64(),
                    done as f64 / begin.elapsed().as_secs_f64()
                );
            }
        })
    };

    let begin = Instant::now();
    let mut declined_count = 0;
    // Each start runs as its own task so it progresses while this loop waits for
    // its schedule or for a permit.
    let mut in_flight_starts = tokio::task::JoinSet::new();
    let mut start_error = None;
    let mut started = 0;
    for i in 0..total {
        let decline = declined(i, options.decline_share);
        let started_at = match options.load {
            Load::Open { rate, .. } => {
                let due = begin + scheduled(i, rate);
                tokio::time::sleep_until(due.into()).await;
                due
            }
            Load::Closed { .. } => {
                // Each finished saga returns its permit (in the event listener); if
                // none comes back within the timeout the system is stuck: stop starting.
                match tokio::time::timeout(options.timeout, permits.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    Ok(Err(e)) => return Err(Error::Io(e.to_string())),
                    Err(_) => break,
                }
                Instant::now()
            }
        };
        started += 1;
        declined_count += u64::from(decline);
        let key = key(i);
        let id = saga_id(&options.saga_type, &key);
        tracker.lock().await.pending.insert(id, (i, started_at));
        let input = order(i, options.items, decline);
        let start = {
            let (js, http, saga_type) = (js.clone(), http.clone(), options.saga_type.clone());
            let (retries, give_up_after) = (retries.clone(), options.timeout);
            async move {
                retried(give_up_after, &retries, || async {
                    match &http {
                        Some(http) => http.start(&saga_type, &key, input.clone()).await,
                        None => publish_start(&js, &saga_type, key.clone(), input.clone()).await,
                    }
                })
                .await
            }
        };
        in_flight_starts.spawn(start);
        while in_flight_starts.len() > 4096 {
            if let Some(result) = in_flight_starts.join_next().await {
                keep_first_error(&mut start_error, result);
            }
        }
        while let Some(result) = in_flight_starts.try_join_next() {
            keep_first_error(&mut start_error, result);
        }
        if let Some(e) = start_error.take() {
            progress.abort();
            listener.abort();
            return Err(Error::Io(format!("starting saga {i}: {e}")));
        }
    }
    let starts_took = begin.elapsed();
    while let Some(result) = in_flight_starts.join_next().await {
        keep_first_error(&mut start_error, result);
    }
    if let Some(e) = start_error {
        progress.abort();
        listener.abort();
        return Err(Error::Io(format!("starting a saga: {e}")));
    }

    // Wait for the rest, bounded by --timeout from the last start. Events published while
    // the listener was disconnected are never seen: look such sagas up in the journal.
    let store = Store::new(js.clone())
        .await
        .map_err(|e| Error::Io(e.to_string()))?;
    let deadline = Instant::now() + options.timeout;
    let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
    while finished.load(Ordering::Relaxed) < started && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if Instant::now() >= next_sweep {
            let swept = sweep(&store, &tracker).await;
            finished.fetch_add(swept, Ordering::Relaxed);
            next_sweep = Instant::now() + SWEEP_INTERVAL;
        }
    }
    progress.abort();
    listener.abort();

    let mut t = tracker.lock().await;
    let end = t.last_end.unwrap_or_else(Instant::now);
    let elapsed = end.duration_since(begin).as_secs_f64().max(1e-9);
    // Sagas without an event: failed (parked) or still unfinished.
    let mut failed = 0;
    let mut unfinished = 0;
    let leftover: Vec<String> = t.pending.keys().cloned().collect();
    for id in leftover {
        match store.load(&id, false).await {
            Ok(Some(stored)) => match stored.record.saga.phase() {
                Phase::Failed => failed += 1,
                Phase::Completed => t.completed += 1,
                Phase::Compensated => t.compensated += 1,
                Phase::Running | Phase::Compensating => unfinished += 1,
            },
            Ok(None) | Err(_) => unfinished += 1,
        }
    }
    let terminal = t.completed + t.compensated;
    let observed = t.latencies.len() as u64;
    let latency = percentiles(&mut t.latencies);
    Ok(Report {
        sagas: started,
        completed: t.completed,
        compensated: t.compensated,
        failed,
        unfinished,
        declined: declined_count,
        elapsed_s: elapsed,
        throughput_per_s: terminal as f64 / elapsed,
        latency_ms: latency,
        observed,
        offered_per_s: started as f64 / starts_took.as_secs_f64().max(1e-9),
        start_retries: retries.load(Ordering::Relaxed),
        key_prefix,
        slowest_saga: t.slowest.take().map(|(_, id)| id),
    })
}

/// How often the wait for the last sagas looks up the ones without an event.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// At most this many pending sagas are looked up per sweep.
const SWEEP_BATCH: usize = 2000;
/// First pause before a failed start is sent again; it doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between two tries of one start.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Counts, as finished, the pending sagas the journal already has as completed or
/// compensated (their event was missed); returns how many it found.
async fn sweep(store: &Store, tracker: &Mutex<Tracker>) -> u64 {
    let ids: Vec<String> = {
        let t = tracker.lock().await;
        t.pending.keys().take(SWEEP_BATCH).cloned().collect()
    };
    let mut found = 0;
    for id in ids {
        let Ok(Some(stored)) = store.load(&id, false).await else {
            continue;
        };
        let phase = stored.record.saga.phase();
        if !matches!(phase, Phase::Completed | Phase::Compensated) {
            continue;
        }
        let mut t = tracker.lock().await;
        // The listener may have seen its event in the meantime.
        if t.pending.remove(&id).is_none() {
            continue;
        }
        if phase == Phase::Completed {
            t.completed += 1;
        } else {
            t.compensated += 1;
        }
        found += 1;
    }
    found
}

/// Runs `start` until it succeeds, pausing between tries (doubling from
/// [`FIRST_RETRY_PAUSE`] to [`MAX_RETRY_PAUSE`]) and counting each retry in `retries`;
/// gives up with the last error once `give_up_after` has passed since the first try.
/// Sending a start again is safe: it carries the same key and message id.
async fn retried<F, Fut>(
    give_up_after: Duration,
    retries: &AtomicU64,
    start: F,
) -> Result<(), String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), StartError>>,
{
    let first = Instant::now();
    let mut pause = FIRST_RETRY_PAUSE;
    loop {
        match start().await {
            Ok(()) => return Ok(()),
            Err(StartError::Refused(e)) => return Err(e),
            Err(StartError::Transient(e)) if first.elapsed() >= give_up_after => {
                return Err(format!(
                    "{e} (still failing after {:.0?} of retries)",
                    first.elapsed()
                ));
            }
            Err(StartError::Transient(_)) => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
        }
    }
}

/// Why one try of a start did not succeed.
#[derive(Debug)]
enum StartError {
    /// Timed out, disconnected, or the server is unavailable: worth sending again.
    Transient(String),
    /// The orchestrator refused the start (4xx): sending it again changes nothing.
    Refused(String),
}

fn keep_first_error(
    first: &mut Option<String>,
    result: Result<Result<(), String>, tokio::task::JoinError>,
) {
    let error = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
    };
    first.get_or_insert(error);
}

async fn publish_start(
    js: &async_nats::jetstream::Context,
    saga_type: &str,
    key: String,
    input: serde_json::Value,
) -> Result<(), StartError> {
    let mut headers = HeaderMap::new();
    let msg_id = protocol::start_msg_id(saga_type, &key, &input);
    headers.insert(header::MSG_ID, msg_id.as_str());
    let body = protocol::Start {
        protocol: protocol::VERSION,
        key,
        input,
        requested_at: None,
    };
    // Any failure here is the connection or the server (a timeout, a restart, a full
    // stream): the orchestrator validates starts later, so a retry is always worth it.
    js.publish_with_headers(
        protocol::subject::start(saga_type),
        headers,
        body.encode().into(),
    )
    .await
    .map_err(|e| StartError::Transient(e.to_string()))?
    .await
    .map_err(|e| StartError::Transient(e.to_string()))?;
    Ok(())
}

/// Starts sagas through the HTTP API.
#[derive(Debug, Clone)]
struct HttpStarter {
    base: String,
    client: reqwest::Client,
}

impl HttpStarter {
    fn new(addr: &str) -> Result<Self, Error> {
        let base = if addr.starts_with("http://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{addr}")
        };
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()
            .map_err(|e| Error::Io(format!("HTTP client: {e}")))?;
        Ok(Self { base, client })
    }

    async fn start(
        &self,
        saga_type: &str,
        key: &str,
        input: serde_json::Value,
    ) -> Result<(), StartError> {
        let response = self
            .client
            .post(format!("{}/v1/sagas/{saga_type}", self.base))
            .json(&serde_json::json!({"key": key, "input": input}))
            .send()
            .await
            .map_err(|e| StartError::Transient(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response
            .text()
            .await
            .unwrap_or_else(|e| format!("(body unreadable: {e})"));
        let message = format!("HTTP {status}: {body}");
        // 5xx: the orchestrator is unavailable (e.g. NATS is down) or failing; 4xx: refused.
        Err(if status.is_server_error() {
            StartError::Transient(message)
        } else {
            StartError::Refused(message)
        })
    }
}

/// The command line of `jetsaga bench`. Closed loop (`--sagas`, `--concurrency`) is the
/// default; `--rate` with `--duration` asks for open loop instead.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// NATS server URL, or several comma-separated (the nodes of a cluster).
    #[arg(
        long = "nats",
        value_name = "URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Start sagas through the start subject (JetStream) or the orchestrator's HTTP API.
    #[arg(long, value_enum, default_value = "subject")]
    pub via: Via,
    /// The orchestrator's HTTP address, for `--via http`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub http: String,
    /// Closed loop: sagas in all [default: 10000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..),
          conflicts_with_all = ["rate", "duration"])]
    pub sagas: Option<u64>,
    /// Closed loop: sagas unfinished at once [default: 256].
    #[arg(long, value_name = "C", value_parser = clap::value_parser!(u64).range(1..),
          conflicts_with_all = ["rate", "duration"])]
    pub concurrency: Option<u64>,
    /// Open loop: starts per second on a fixed schedule (needs --duration).
    #[arg(long, value_name = "R", requires = "duration", value_parser = positive_number)]
    pub rate: Option<f64>,
    /// Open loop: how long to offer load (needs --rate), e.g. `30s`, `2m` or `90` (seconds).
    #[arg(long, value_name = "D", requires = "rate", value_parser = positive_duration)]
    pub duration: Option<Duration>,
    /// Share of orders the payment declines, between 0 and 1.
    #[arg(long, value_name = "F", default_value_t = 0.1, value_parser = share)]
    pub decline_share: f64,
    /// Items per order, between 1 and 100.
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub items: u32,
    /// How long to wait for unfinished sagas after the last start (in closed loop also for a
    /// free slot), e.g. `60s`, `2m` or `180` (seconds).
    #[arg(long, value_name = "D", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The saga type to start; its input must be order-shaped.
    #[arg(long, value_name = "TYPE", default_value = "order-creation")]
    pub saga_type: String,
    /// Who answers the commands: the running system's participants, or trivial built-in
    /// inventory and payment participants in this process (start the system without its
    /// participants), to measure the engine without the reference participants' storage.
    #[arg(long, value_enum, default_value = "reference")]
    pub participants: Participants,
    /// Also print the report as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// The run these arguments describe (clap has already checked them).
    pub fn options(self) -> Options {
        let load = match (self.rate, self.duration) {
            (Some(rate), Some(duration)) => Load::Open { rate, duration },
            _ => Load::Closed {
                sagas: self.sagas.unwrap_or(10_000),
                concurrency: self.concurrency.unwrap_or(256),
            },
        };
        Options {
            nats_url: self.nats_url,
            http: self.http,
            via: self.via,
            load,
            decline_share: self.decline_share,
            items: self.items,
            timeout: self.timeout,
            json: self.json,
            saga_type: self.saga_type,
            participants: self.participants,
        }
    }
}

/// A command-line value the load generator cannot use; clap prints it after the flag's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArgError {
    /// A negative or overflowing number of seconds.
    #[error("\"{0}\" is not a non-negative number of seconds")]
    Seconds(String),
    /// Neither a number of seconds nor a duration.
    #[error("\"{text}\" is not a duration like 30s, 2m or 180 ({source})")]
    Duration {
        /// The text given.
        text: String,
        /// Why it does not parse.
        #[source]
        source: humantime::DurationError,
    },
    /// Zero where only a positive value makes sense.
    #[error("must be greater than zero")]
    Zero,
    /// Not a finite number above zero.
    #[error("\"{0}\" is not a number greater than zero")]
    NotPositive(String),
    /// Not a number from 0 to 1.
    #[error("\"{0}\" is not a number between 0 and 1")]
    NotShare(String),
}

/// A duration on the command line: `250ms`, `30s`, `2m`, `1m30s`, or a bare number of seconds
/// (`180`, `0.5`).
///
/// # Errors
///
/// [`ArgError::Seconds`] or [`ArgError::Duration`], naming the text.
pub fn parse_duration(text: &str) -> Result<Duration, ArgError> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| ArgError::Seconds(text.to_owned()));
    }
    humantime::parse_duration(text).map_err(|source| ArgError::Duration {
        text: text.to_owned(),
        source,
    })
}

fn positive_duration(text: &str) -> Result<Duration, ArgError> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(ArgError::Zero);
    }
    Ok(duration)
}

fn positive_number(text: &str) -> Result<f64, ArgError> {
    text.parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n > 0.0)
        .ok_or_else(|| ArgError::NotPositive(text.to_owned()))
}

/// A share between 0 and 1, as a command-line value.
///
/// # Errors
///
/// Not a number between 0 and 1.
pub fn share(text: &str) -> Result<f64, ArgError> {
    text.parse::<f64>()
        .ok()
        .filter(|n| (0.0..=1.0).contains(n))
        .ok_or_else(|| ArgError::NotShare(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<f64> = (1..=100).map(f64::from).collect();
        samples.reverse();
        let l = percentiles(&mut samples);
        assert_eq!((l.p50, l.p90, l.p99, l.max), (50.0, 90.0, 99.0, 100.0));
        let mut one = vec![7.0];
        assert_eq!(percentiles(&mut one).p99, 7.0);
        assert_eq!(percentiles(&mut []), Latency::default());
        let mut ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let l = percentiles(&mut ten);
        assert_eq!((l.p50, l.p90, l.p99), (5.0, 9.0, 10.0));
    }

    #[test]
    fn decline_rule_picks_the_exact_share_evenly() {
        let count = |n: u64, share: f64| (0..n).filter(|&i| declined(i, share)).count();
        assert_eq!(count(1000, 0.1), 100);
        assert_eq!(count(20_000, 0.1), 2000);
        assert_eq!(count(7, 0.0), 0);
        assert_eq!(count(7, 1.0), 7);
        assert_eq!(count(3, 0.5), 1);
        // Evenly: never two declines in a row at 10 %.
        assert!((0..1000).all(|i| !(declined(i, 0.1) && declined(i + 1, 0.1))));
        assert_eq!(scheduled(500, 500.0), Duration::from_secs(1));
        assert_eq!(scheduled(0, 500.0), Duration::ZERO);
        let o = order(3, 2, true);
        assert_eq!(o["card_token"], "tok_decline");
        assert_eq!(o["items"].as_array().unwrap().len(), 2);
        assert!(
            jetsaga_orchestrator::definitions::order_creation()
                .unwrap()
                .check_input(&o)
                .is_ok()
        );
    }

    #[test]
    fn a_report_names_what_went_wrong() {
        let good = Report {
            sagas: 100,
            completed: 90,
            compensated: 10,
            failed: 0,
            unfinished: 0,
            declined: 10,
            elapsed_s: 1.0,
            throughput_per_s: 100.0,
            latency_ms: Latency::default(),
            observed: 100,
            offered_per_s: 100.0,
            start_retries: 0,
            key_prefix: "bench-x-".to_owned(),
            slowest_saga: Some("s-1".to_owned()),
        };
        assert!(good.problems().is_empty());
        assert!(good.table().contains("(saga s-1)"), "{}", good.table());
        let wrong_mix = Report {
            completed: 91,
            compensated: 9,
            ..good.clone()
        };
        assert_eq!(wrong_mix.problems().len(), 2, "{:?}", wrong_mix.problems());
        let unfinished = Report {
            completed: 85,
            unfinished: 4,
            failed: 1,
            ..good.clone()
        };
        let problems = unfinished.problems();
        assert_eq!(problems, vec!["4 sagas did not finish", "1 sagas failed"]);
        let json = serde_json::to_value(&good).unwrap();
        for field in [
            "sagas",
            "completed",
            "compensated",
            "failed",
            "unfinished",
            "elapsed_s",
            "throughput_per_s",
            "offered_per_s",
            "start_retries",
            "key_prefix",
            "slowest_saga",
        ] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert!(json["latency_ms"].get("p99").is_some());
        assert!(good.table().contains("throughput"));
    }

    #[test]
    fn only_the_sagas_own_events_end_it() {
        let event = |name: &str, saga_type: &str| protocol::Event {
            protocol: protocol::VERSION,
            event: name.to_owned(),
            saga_id: "s".to_owned(),
            saga_type: saga_type.to_owned(),
            key: "k".to_owned(),
            input: serde_json::Value::Null,
            occurred_at: chrono::Utc::now(),
        };
        let t = "order-creation";
        assert_eq!(outcome(&event("order.confirmed", t), t), Some(true));
        assert_eq!(outcome(&event("order.cancelled", t), t), Some(false));
        // A stock event names the saga that crossed the line, with no saga type.
        assert_eq!(outcome(&event("inventory.stock.low", ""), t), None);
        assert_eq!(outcome(&event("inventory.stock.depleted", ""), t), None);
        assert_eq!(outcome(&event("order.confirmed", "other"), t), None);
    }

    #[tokio::test]
    async fn a_failing_start_is_retried_until_it_succeeds_or_the_time_is_up() {
        let tries = AtomicU64::new(0);
        let retries = AtomicU64::new(0);
        let flaky = || async {
            if tries.fetch_add(1, Ordering::Relaxed) < 3 {
                Err(StartError::Transient("timed out".to_owned()))
            } else {
                Ok(())
            }
        };
        assert_eq!(
            retried(Duration::from_secs(60), &retries, flaky).await,
            Ok(())
        );
        assert_eq!(
            (
                tries.load(Ordering::Relaxed),
                retries.load(Ordering::Relaxed)
            ),
            (4, 3)
        );

        let retries = AtomicU64::new(0);
        let down = || async { Err(StartError::Transient("no responders".to_owned())) };
        let error = retried(Duration::from_millis(250), &retries, down)
            .await
            .unwrap_err();
        assert!(
            error.contains("no responders") && error.contains("still failing"),
            "{error}"
        );
        assert!(retries.load(Ordering::Relaxed) >= 1);

        let retries = AtomicU64::new(0);
        let refused = || async { Err(StartError::Refused("HTTP 422".to_owned())) };
        assert_eq!(
            retried(Duration::from_secs(10), &retries, refused).await,
            Err("HTTP 422".to_owned())
        );
        assert_eq!(retries.load(Ordering::Relaxed), 0);
    }

    /// `jetsaga bench` as the binary mounts it.
    #[derive(Debug, clap::Parser)]
    struct Bench {
        #[command(flatten)]
        args: Args,
    }

    fn parse(list: &[&str]) -> Result<Options, clap::Error> {
        use clap::Parser;
        Bench::try_parse_from(std::iter::once("bench").chain(list.iter().copied()))
            .map(|b| b.args.options())
    }

    #[test]
    fn arguments() {
        use clap::CommandFactory;
        Bench::command().debug_assert();

        let o = parse(&[]).unwrap();
        assert_eq!(
            o.load,
            Load::Closed {
                sagas: 10_000,
                concurrency: 256
            }
        );
        assert_eq!(
            (o.via, o.timeout, o.items, o.decline_share),
            (Via::Subject, Duration::from_secs(60), 1, 0.1)
        );
        assert_eq!(o.nats_url, "nats://127.0.0.1:4222");
        let o = parse(&["--sagas", "500", "--concurrency", "64", "--json"]).unwrap();
        assert_eq!(
            o.load,
            Load::Closed {
                sagas: 500,
                concurrency: 64
            }
        );
        assert!(o.json);
        let o = parse(&["--rate", "500", "--duration", "30s", "--via", "http"]).unwrap();
        assert_eq!(
            o.load,
            Load::Open {
                rate: 500.0,
                duration: Duration::from_secs(30)
            }
        );
        assert_eq!(o.via, Via::Http);
        for (text, seconds) in [
            ("180", 180.0),
            ("2m", 120.0),
            ("30s", 30.0),
            ("1m30s", 90.0),
        ] {
            let o = parse(&["--timeout", text]).unwrap();
            assert_eq!(o.timeout, Duration::from_secs_f64(seconds), "{text}");
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(
            parse_duration("-1"),
            Err(ArgError::Seconds("-1".to_owned()))
        );
        assert!(
            matches!(parse_duration("soon"), Err(ArgError::Duration { text, .. }) if text == "soon")
        );
        assert_eq!(positive_duration("0s"), Err(ArgError::Zero));
        assert_eq!(
            positive_number("0"),
            Err(ArgError::NotPositive("0".to_owned()))
        );
        assert_eq!(share("1.5"), Err(ArgError::NotShare("1.5".to_owned())));

        for (bad, expected) in [
            (vec!["--rate", "5"], "--duration"),
            (vec!["--duration", "5s"], "--rate"),
            (
                vec!["--sagas", "5", "--rate", "5", "--duration", "1s"],
                "cannot be used with",
            ),
            (vec!["--sagas", "x"], "--sagas"),
            (vec!["--sagas", "0"], "--sagas"),
            (vec!["--decline-share", "2"], "between 0 and 1"),
            (vec!["--items", "101"], "--items"),
            (vec!["--via", "pigeon"], "pigeon"),
            (vec!["--frobnicate"], "--frobnicate"),
            (vec!["--timeout", "soon"], "--timeout"),
            (vec!["--timeout=-1"], "non-negative"),
            (vec!["--rate", "5", "--duration", "0s"], "greater than zero"),
            (vec!["--sagas"], "--sagas"),
        ] {
            let err = parse(&bad).unwrap_err();
            assert_ne!(err.kind(), clap::error::ErrorKind::DisplayHelp);
            let text = err.to_string();
            assert!(text.contains(expected), "{bad:?}: {text}");
        }
    }
}
