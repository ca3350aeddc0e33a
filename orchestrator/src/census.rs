//! The census: true counts of the sagas in the journal, by state.
//!
//! The driver only holds sagas in memory between inputs, so counting what it holds
//! undercounts (idle and finished sagas leave memory) and counting started minus
//! finished is wrong across restarts and instances. The census reads the truth
//! instead, from the saga listing's [`Index`] (a projection of every journal
//! record's headers): every [`INTERVAL`] it counts the live sagas by type and
//! phase, with no request to NATS — its cost is the number of live sagas, not
//! of stored ones. Every instance has the same index and reports the same
//! numbers: aggregate across instances with `max`, not `sum`.
//!
//! It sets [`SAGAS_IN_FLIGHT`](crate::metrics::SAGAS_IN_FLIGHT) (running,
//! compensating, failed), [`SAGAS_FAILED_WAITING`](crate::metrics::SAGAS_FAILED_WAITING)
//! and [`SAGAS_STUCK`](crate::metrics::SAGAS_STUCK): a running or compensating saga
//! unchanged for twice its step's timeout (the listing's `stuck`, less the parked).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use jetsaga_sagas::Phase;
use tokio_util::sync::CancellationToken;

use crate::definitions::Registry;
use crate::index::Index;
use crate::metrics::Metrics;

/// How often the census runs.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// What one census found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sagas by (type, phase), unfinished and failed only.
    pub by_state: HashMap<(String, Phase), i64>,
    /// Stuck sagas by type (running or compensating only).
    pub stuck: HashMap<String, i64>,
}

/// Runs the census every [`INTERVAL`] until cancelled.
pub(crate) async fn run(
    index: Index,
    registry: Arc<Registry>,
    metrics: Metrics,
    token: CancellationToken,
) {
    let mut types: HashSet<String> = registry.all().map(|d| d.name.clone()).collect();
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = token.cancelled() => return,
        }
        // Before the replay is done the index undercounts: keep the last figures.
        if index.caught_up() {
            publish(&metrics, &mut types, &index.counts(Utc::now()));
        }
        metrics
            .listing_sagas
            .set(i64::try_from(index.len()).unwrap_or(i64::MAX));
        let unlisted = index.unlisted();
        metrics
            .listing_unlisted
            .inc_by(unlisted.saturating_sub(metrics.listing_unlisted.get()));
    }
}

/// Sets the gauges, zeroing types seen before that have no sagas left.
fn publish(metrics: &Metrics, types: &mut HashSet<String>, counts: &Counts) {
    types.extend(counts.by_state.keys().map(|(t, _)| t.clone()));
    for saga_type in types.iter() {
        for phase in [Phase::Running, Phase::Compensating, Phase::Failed] {
            let n = counts
                .by_state
                .get(&(saga_type.clone(), phase))
                .copied()
                .unwrap_or(0);
            metrics
                .in_flight
                .with_label_values(&[saga_type, phase.as_str()])
                .set(n);
            if phase == Phase::Failed {
                metrics
                    .failed_waiting
                    .with_label_values(&[saga_type])
                    .set(n);
            }
        }
        let stuck = counts.stuck.get(saga_type).copied().unwrap_or(0);
        metrics.stuck.with_label_values(&[saga_type]).set(stuck);
    }
    metrics.census_timestamp.set(Utc::now().timestamp());
}
