//! The census: true counts of the sagas in the journal, by state.
//!
//! The driver only holds sagas in memory between inputs, so counting what it holds
//! undercounts (idle and finished sagas leave memory) and counting started minus
//! finished is wrong across restarts and instances. The census reads the truth
//! instead: every [`INTERVAL`] it lists the journal's saga subjects (one request
//! per page of subjects) and reads the last record of each (one direct get per
//! saga, [`CONCURRENCY`] at a time). Its cost grows with the sagas the journal
//! retains, which the journal's retention bounds; a slow census runs less often
//! (it sleeps nine times its own duration). Every instance runs it and
//! reports the same numbers: aggregate across instances with `max`, not `sum`.
//!
//! It sets [`SAGAS_IN_FLIGHT`](crate::metrics::SAGAS_IN_FLIGHT) (running,
//! compensating, failed), [`SAGAS_FAILED_WAITING`](crate::metrics::SAGAS_FAILED_WAITING)
//! and [`SAGAS_STUCK`](crate::metrics::SAGAS_STUCK): a saga in the same step (forward
//! or compensating) for [`STUCK_FACTOR`] × that step's timeout (see [`is_stuck`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use jetsaga_sagas::{Definition, Phase, Saga, State};
use tokio_util::sync::CancellationToken;

use crate::definitions::Registry;
use crate::metrics::Metrics;
use crate::store::Store;

/// How often the census runs (less often when one census takes longer than a
/// ninth of this: see [`run`]).
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Direct gets in flight at once.
pub const CONCURRENCY: usize = 32;
/// A saga is stuck once it has been in one step for this many times the step's timeout
/// (5: a step's default three attempts, with backoff, stay below it).
pub const STUCK_FACTOR: u32 = 5;

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
        if let Some(def) = registry.get(&saga.saga_type, saga.version)
            && is_stuck(def, saga, now)
        {
            *counts.stuck.entry(saga.saga_type.clone()).or_default() += 1;
        }
    }
    Ok(counts)
}

/// Whether `saga` has been in its current step for [`STUCK_FACTOR`] × the step's timeout.
///
/// A forward step counts from its first command; a compensation from the last time any
/// step finished (what started this compensation: a later step failing, or the next
/// step's compensation completing), as the compensation's own start is not recorded.
pub fn is_stuck(def: &Definition, saga: &Saga, now: DateTime<Utc>) -> bool {
    let (step, since) = match &saga.state {
        State::Running { step, .. } => (*step, saga.steps.get(*step).and_then(|s| s.started_at)),
        State::Compensating { step, .. } => {
            (*step, saga.steps.iter().filter_map(|s| s.finished_at).max())
        }
        State::Completed | State::Compensated { .. } | State::Failed { .. } => {
            return false;
        }
    };
    let Some(timeout) = def.steps.get(step).map(|s| s.timeout) else {
        return false;
    };
    let (Some(since), Ok(limit)) = (since, chrono::Duration::from_std(timeout * STUCK_FACTOR))
    else {
        return false;
    };
    now - since > limit
}

/// Runs the census every [`INTERVAL`] until cancelled.
pub(crate) async fn run(
    store: Store,
    registry: Arc<Registry>,
    metrics: Metrics,
    token: CancellationToken,
) {
    let mut types: HashSet<String> = registry.all().map(|d| d.name.clone()).collect();
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = token.cancelled() => return,
        }
        let began = std::time::Instant::now();
        let counts = tokio::select! {
            counts = count(&store, &registry) => counts,
            () = token.cancelled() => return,
        };
        match counts {
            Ok(counts) => publish(&metrics, &mut types, &counts),
            Err(e) => tracing::warn!(error = %e, "saga census failed; keeping the last counts"),
        }
        // A large journal makes a census slow: keep its share of the time (and of
        // NATS) to about a tenth.
        pause = INTERVAL.max(began.elapsed() * 9);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_saga_is_stuck_after_the_factor_times_its_step_timeout() {
        let registry = Registry::builtin();
        let def = registry.latest("order-creation").unwrap();
        let input = serde_json::json!({"customer_id": "c-1", "email": "ana@example.com",
            "items": [{"sku": "sku-1", "quantity": 1}], "amount_cents": 100,
            "currency": "EUR", "card_token": "tok_ok"});
        let t0 = Utc::now();
        let (saga, _) = Saga::start(def, "s-1".into(), "k".into(), input, None, t0).unwrap();
        let timeout = chrono::Duration::from_std(def.steps[0].timeout).unwrap();
        let limit = timeout * i32::try_from(STUCK_FACTOR).unwrap();
        assert!(!is_stuck(def, &saga, t0));
        assert!(!is_stuck(def, &saga, t0 + timeout * 2));
        assert!(!is_stuck(def, &saga, t0 + limit));
        assert!(is_stuck(
            def,
            &saga,
            t0 + limit + chrono::Duration::seconds(1)
        ));
    }
}
