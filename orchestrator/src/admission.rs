//! Admission of new sagas under overload.
//!
//! Past saturation, every start taken adds work the participants cannot do in time: their
//! backlog grows until commands wait longer than a step timeout, and sagas that would have
//! completed are compensated instead. So new starts are taken only while the sagas under way
//! (running or compensating, from the saga listing, which follows the whole journal and so
//! counts every instance's sagas) are fewer than the system finishes in
//! `engine.admission-window`, or than `engine.admission-floor`:
//!
//! ```text
//! open  ⇔  active < max(floor, finished per second over the last 10 s × window)
//! ```
//!
//! The gate also closes while a stream that running sagas write to (journal, commands,
//! replies, timers) holds 90 % of its byte bound (`streams.max-bytes`): at the bound
//! JetStream refuses new messages, and the room left is for the sagas already under way.
//!
//! A closed gate holds starts in `JETSAGA_STARTS` (nothing is lost; the start subject's
//! publishers are acknowledged as before) and refuses `POST /v1/sagas` with 503
//! `overloaded`, which a client retries. Before the listing has caught up with the journal
//! the count of sagas under way does not close it: it cannot count yet.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::index::Index;
use crate::metrics::Metrics;

/// How far back the finishing rate is measured.
const RATE_SPAN: Duration = Duration::from_secs(10);
/// How often the gate is decided again.
const INTERVAL: Duration = Duration::from_millis(250);
/// How often the streams' sizes are read.
const STORAGE_INTERVAL: Duration = Duration::from_secs(5);
/// The share of a stream's byte bound from which new starts wait.
const STORAGE_HIGH: f64 = 0.9;
/// The streams running sagas write to.
const WRITTEN: [&str; 4] = [
    jetsaga_sagas::streams::JOURNAL.name,
    jetsaga_sagas::streams::COMMANDS.name,
    jetsaga_sagas::streams::REPLIES.name,
    jetsaga_sagas::streams::TIMERS.name,
];

/// The rule, without clocks or I/O: fed the listing's counts, it says how many sagas may be
/// under way.
#[derive(Debug)]
pub struct Gate {
    window: Duration,
    floor: u64,
    /// (when, sagas that had left running/compensating by then), oldest first.
    samples: VecDeque<(Instant, u64)>,
}

impl Gate {
    /// A gate for `window` (zero: always open) and `floor`.
    pub fn new(window: Duration, floor: u64) -> Self {
        Self {
            window,
            floor,
            samples: VecDeque::new(),
        }
    }

    /// How many sagas may be under way at `now`, given how many have finished (or parked
    /// failed) so far; `None` when there is no bound.
    pub fn limit(&mut self, now: Instant, finished: u64) -> Option<u64> {
        if self.window.is_zero() {
            return None;
        }
        self.samples.push_back((now, finished));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_SPAN)
        {
            self.samples.pop_front();
        }
        let rate = match (self.samples.front(), self.samples.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                n1.saturating_sub(*n0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        };
        // Rounded down; a rate this low is bounded by the floor anyway.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let by_rate = (rate * self.window.as_secs_f64()) as u64;
        Some(self.floor.max(by_rate))
    }
}

/// Why new starts wait, if they do: `None` while the gate is open.
type Verdict = Option<Arc<str>>;

/// Whether new starts are taken now; cheap to clone.
#[derive(Debug, Clone)]
pub struct Admission {
    verdict: watch::Receiver<Verdict>,
}

impl Admission {
    /// A gate that is always open (no bound configured).
    pub fn open() -> Self {
        let (_, verdict) = watch::channel(None);
        Self { verdict }
    }

    /// `Ok` if a start may be taken now, else why not.
    ///
    /// # Errors
    ///
    /// Why new starts wait.
    pub fn admits(&self) -> Result<(), Arc<str>> {
        match &*self.verdict.borrow() {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// Waits until a start may be taken (at once if the gate is open, or when it is gone).
    pub async fn wait(&mut self) {
        let _ = self.verdict.wait_for(Option::is_none).await;
    }
}

/// What the gate reads: the listing, and the streams' sizes against their bound.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The saga listing.
    pub index: Index,
    /// For the streams' sizes.
    pub js: jetstream::Context,
    /// `streams.max-bytes`.
    pub max_bytes: u64,
}

/// Decides the gate every [`INTERVAL`] until cancelled; the returned [`Admission`]
/// follows it.
pub fn spawn(
    gate: Gate,
    sources: Sources,
    metrics: Metrics,
    tracker: &tokio_util::task::TaskTracker,
    token: CancellationToken,
) -> Admission {
    let (tx, verdict) = watch::channel(None);
    tracker.spawn(run(gate, sources, metrics, tx, token));
    Admission { verdict }
}

async fn run(
    mut gate: Gate,
    sources: Sources,
    metrics: Metrics,
    tx: watch::Sender<Verdict>,
    token: CancellationToken,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    let mut full: Verdict = None;
    let mut storage_read: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = token.cancelled() => return,
        }
        if storage_read.is_none_or(|at| at.elapsed() >= STORAGE_INTERVAL) {
            storage_read = Some(Instant::now());
            full = storage_full(&sources.js, sources.max_bytes).await;
        }
        let (active, finished) = sources.index.activity();
        let limit = gate.limit(Instant::now(), finished);
        metrics
            .admission_limit
            .set(limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX)));
        // Before the replay is done the listing undercounts: do not hold starts on it.
        let busy = sources.index.caught_up() && limit.is_some_and(|limit| active >= limit);
        let verdict = full.clone().or_else(|| {
            busy.then(|| {
                let limit = limit.unwrap_or_default();
                Arc::from(format!(
                    "{active} sagas under way, {limit} allowed (what finishes in \
                     engine.admission-window, at least engine.admission-floor); retry later"
                ))
            })
        });
        metrics.admission_open.set(i64::from(verdict.is_none()));
        let was_open = tx.borrow().is_none();
        if was_open != verdict.is_none() {
            match &verdict {
                None => tracing::info!(active, ?limit, "admission: taking new starts again"),
                Some(why) => tracing::warn!(reason = %why, "admission: new starts wait"),
            }
        }
        tx.send_replace(verdict);
    }
}

/// Why new starts must wait for room, if a written stream is near its byte bound. A stream
/// that cannot be read does not close the gate (its writes fail on their own, and are
/// retried).
async fn storage_full(js: &jetstream::Context, max_bytes: u64) -> Verdict {
    for name in WRITTEN {
        // The look-up returns the stream's info: one request per stream.
        let Ok(stream) = js.get_stream(name).await else {
            continue;
        };
        let info = stream.cached_info();
        let bound = u64::try_from(info.config.max_bytes).unwrap_or(max_bytes);
        let bound = if bound == 0 { max_bytes } else { bound };
        #[allow(clippy::cast_precision_loss)]
        let share = info.state.bytes as f64 / bound as f64;
        if share >= STORAGE_HIGH {
            return Some(Arc::from(format!(
                "stream {name} holds {:.0} % of its byte bound ({bound} bytes, \
                 streams.max-bytes): the room left is for the sagas under way",
                share * 100.0,
            )));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_limit_is_the_finishing_rate_times_the_window_and_never_below_the_floor() {
        let t0 = Instant::now();
        let mut gate = Gate::new(Duration::from_secs(5), 100);
        // No rate yet: the floor.
        assert_eq!(gate.limit(t0, 0), Some(100));
        // 200 finished per second for 5 s: 1,000 may be under way.
        assert_eq!(
            gate.limit(t0 + Duration::from_secs(5), 1_000),
            Some(5_000 / 5)
        );
        // The rate is measured over the last 10 s only: an old burst ages out.
        let later = t0 + Duration::from_secs(30);
        assert_eq!(gate.limit(later, 1_000), Some(100));
        assert_eq!(gate.limit(later + Duration::from_secs(2), 1_040), Some(100));
        assert_eq!(
            gate.limit(later + Duration::from_secs(4), 1_800),
            Some((800 / 4) * 5)
        );
    }

    #[test]
    fn a_zero_window_never_holds_starts() {
        let mut gate = Gate::new(Duration::ZERO, 100);
        assert_eq!(gate.limit(Instant::now(), 0), None);
    }
}
