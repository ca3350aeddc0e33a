//! The census: true counts of the sagas in the journal, by state.
//!
//! The driver only holds sagas in memory between inputs, so counting what it holds
//! undercounts (idle and finished sagas leave memory) and counting started minus
//! finished is wrong across restarts and instances. The census reads the truth
//! instead: every [`INTERVAL`] it lists the journal's saga subjects (one request
//! per page of subjects) and reads the last record of each (one direct get per
//! saga, [`CONCURRENCY`] at a time). Its cost grows with the sagas the journal
//! retains, which the journal's retention bounds. Every instance runs it and
//! reports the same numbers: aggregate across instances with `max`, not `sum`.
//!
//! It sets [`SAGAS_IN_FLIGHT`](crate::metrics::SAGAS_IN_FLIGHT) (running,
//! compensating, failed), [`SAGAS_FAILED_WAITING`](crate::metrics::SAGAS_FAILED_WAITING)
//! and [`SAGAS_STUCK`](crate::metrics::SAGAS_STUCK): a running or compensating
//! saga with no transition for [`STUCK_FACTOR`] × its definition's longest step
//! timeout. Timeouts and retries are transitions, so a healthy saga never goes
//! that long without one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use jetsaga_sagas::Phase;
use tokio_util::sync::CancellationToken;

use crate::definitions::Registry;
use crate::metrics::Metrics;
use crate::store::Store;

/// How often the census runs.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Direct gets in flight at once.
pub const CONCURRENCY: usize = 32;
/// A saga is stuck after this many times its longest step timeout without a transition.
pub const STUCK_FACTOR: u32 = 3;

/// What one census found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sagas by (type, phase), unfinished and failed only.
    pub by_state: HashMap<(String, Phase), i64>,
    /// Stuck sagas by type.
    pub stuck: HashMap<String, i64>,
}

/// Counts the journal's sagas once.
pub async fn count(store: &Store, registry: &Registry) -> Result<Counts, crate::store::Error> {
    let ids = store.saga_ids().await?;
    let now = Utc::now();
    let mut loads = futures::stream::iter(ids)
        .map(|id| async move { store.load(&id, false).await })
        .buffer_unordered(CONCURRENCY);
    let mut counts = Counts::default();
    while let Some(loaded) = loads.next().await {
        let Some(stored) = loaded? else {
            continue;
        };
        let saga = &stored.record.saga;
        let phase = saga.phase();
        if !matches!(phase, Phase::Running | Phase::Compensating | Phase::Failed) {
            continue;
        }
        *counts
            .by_state
            .entry((saga.saga_type.clone(), phase))
            .or_default() += 1;
        if phase == Phase::Failed {
            continue;
        }
        let longest = registry
            .get(&saga.saga_type, saga.version)
            .and_then(|def| def.steps.iter().map(|s| s.timeout).max());
        if let Some(longest) = longest
            && let Ok(limit) = chrono::Duration::from_std(longest * STUCK_FACTOR)
            && now - saga.updated_at > limit
        {
            *counts.stuck.entry(saga.saga_type.clone()).or_default() += 1;
        }
    }
    Ok(counts)
}

/// Runs the census every [`INTERVAL`] until cancelled.
pub(crate) async fn run(
    store: Store,
    registry: Arc<Registry>,
    metrics: Metrics,
    token: CancellationToken,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut types: HashSet<String> = registry.all().map(|d| d.name.clone()).collect();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = token.cancelled() => return,
        }
        let counts = tokio::select! {
            counts = count(&store, &registry) => counts,
            () = token.cancelled() => return,
        };
        match counts {
            Ok(counts) => publish(&metrics, &mut types, &counts),
            Err(e) => tracing::warn!(error = %e, "saga census failed; keeping the last counts"),
        }
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
