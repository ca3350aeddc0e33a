#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use jetsaga_sagas::Phase;

use super::{Filter, Index, STALL_AFTER, Update, header, stalled};
use crate::definitions::Registry;

fn t(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
}

fn id(n: u32) -> String {
    uuid::Uuid::from_u128(u128::from(n)).to_string()
}

fn update(
    seq: u64,
    saga: u32,
    saga_type: &str,
    phase: Phase,
    step: Option<&str>,
    at: i64,
) -> Update {
    Update {
        seq,
        saga_id: id(saga),
        saga_type: saga_type.to_owned(),
        phase,
        step: step.map(ToOwned::to_owned),
        key: Some(format!("key-{saga}")),
        timer_at: None,
        created: t(0),
        updated: t(at),
        expires: None,
    }
}

fn ids(index: &Index, filter: &Filter, now: i64) -> Vec<String> {
    index
        .page(filter, None, 500, t(now))
        .items
        .into_iter()
        .map(|s| s.saga_id)
        .collect()
}

#[test]
fn the_last_record_wins_and_pages_are_newest_first() {
    let index = Index::new(Arc::new(Registry::builtin()));
    index.apply(&update(
        1,
        1,
        "order-creation",
        Phase::Running,
        Some("reserve-stock"),
        1,
    ));
    index.apply(&update(
        2,
        2,
        "order-creation",
        Phase::Running,
        Some("reserve-stock"),
        2,
    ));
    index.apply(&update(3, 1, "order-creation", Phase::Completed, None, 3));
    index.apply(&update(4, 3, "other", Phase::Failed, Some("x"), 4));
    // An older record arriving late changes nothing.
    index.apply(&update(
        2,
        1,
        "order-creation",
        Phase::Running,
        Some("reserve-stock"),
        2,
    ));
    assert_eq!(index.len(), 3);

    let all = index.page(&Filter::default(), None, 50, t(5));
    let order: Vec<_> = all.items.iter().map(|s| s.saga_id.clone()).collect();
    assert_eq!(order, [id(3), id(1), id(2)]);
    assert_eq!(all.next, None);
    let first = &all.items[1];
    assert_eq!(first.phase, Phase::Completed);
    assert_eq!(first.step, None);
    assert_eq!(first.key.as_deref(), Some("key-1"));
    assert_eq!(first.updated, t(3));
    assert_eq!(first.created, t(0));

    let by_type = Filter {
        saga_type: Some("order-creation".into()),
        ..Filter::default()
    };
    assert_eq!(ids(&index, &by_type, 5), [id(1), id(2)]);
    let unknown = Filter {
        saga_type: Some("nope".into()),
        ..Filter::default()
    };
    assert!(ids(&index, &unknown, 5).is_empty());
    let running = Filter {
        phase: Some(Phase::Running),
        ..Filter::default()
    };
    assert_eq!(ids(&index, &running, 5), [id(2)]);
    let window = Filter {
        updated_after: Some(t(1)),
        updated_before: Some(t(4)),
        ..Filter::default()
    };
    assert_eq!(ids(&index, &window, 5), [id(1), id(2)]);
}

#[test]
fn cursors_walk_every_saga_once() {
    let index = Index::new(Arc::new(Registry::builtin()));
    let kinds = ["a", "b", "c"];
    for n in 0..1000u32 {
        let phase = Phase::ALL[(n % 5) as usize];
        index.apply(&update(
            u64::from(n) + 1,
            n,
            kinds[(n % 3) as usize],
            phase,
            None,
            i64::from(n),
        ));
    }
    for filter in [
        Filter::default(),
        Filter {
            saga_type: Some("b".into()),
            ..Filter::default()
        },
        Filter {
            phase: Some(Phase::Failed),
            ..Filter::default()
        },
    ] {
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = index.page(&filter, cursor, 7, t(2000));
            assert!(page.items.len() <= 7);
            seen.extend(page.items.iter().map(|s| s.updated));
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let expected = index.page(&filter, None, 1000, t(2000)).items.len();
        assert_eq!(seen.len(), expected, "{filter:?}");
        assert!(
            seen.windows(2).all(|w| w[0] > w[1]),
            "newest first, no repeats"
        );
    }
}

#[test]
fn stuck_means_failed_or_waiting_twice_the_step_timeout() {
    let registry = Registry::builtin();
    let def = registry.latest("order-creation").unwrap().clone();
    let timeout = i64::try_from(def.steps[0].timeout.as_secs()).unwrap();
    let index = Index::new(Arc::new(registry));
    index.apply(&update(
        1,
        1,
        "order-creation",
        Phase::Running,
        Some(&def.steps[0].name),
        0,
    ));
    index.apply(&update(
        2,
        2,
        "order-creation",
        Phase::Failed,
        Some(&def.steps[0].name),
        0,
    ));
    index.apply(&update(3, 3, "order-creation", Phase::Completed, None, 0));
    let stuck = Filter {
        stuck: Some(true),
        ..Filter::default()
    };
    let not_stuck = Filter {
        stuck: Some(false),
        ..Filter::default()
    };
    assert_eq!(ids(&index, &stuck, 2 * timeout - 1), [id(2)]);
    assert_eq!(ids(&index, &not_stuck, 2 * timeout - 1), [id(3), id(1)]);
    assert_eq!(ids(&index, &stuck, 2 * timeout + 1), [id(2), id(1)]);
    let page = index.page(&Filter::default(), None, 10, t(2 * timeout + 1));
    assert!(
        page.items
            .iter()
            .find(|s| s.saga_id == id(1))
            .unwrap()
            .stuck
    );
}

#[test]
fn finished_sagas_leave_when_their_record_expires() {
    let index = Index::new(Arc::new(Registry::builtin()));
    let mut done = update(1, 1, "order-creation", Phase::Completed, None, 0);
    done.expires = Some(t(60));
    index.apply(&done);
    index.apply(&update(
        2,
        2,
        "order-creation",
        Phase::Running,
        Some("reserve-stock"),
        0,
    ));
    assert_eq!(ids(&index, &Filter::default(), 59).len(), 2);
    // Past its expiry it is not listed even before the sweep drops it.
    assert_eq!(ids(&index, &Filter::default(), 61), [id(2)]);
    assert_eq!(index.sweep(t(59)), 0);
    assert_eq!(index.sweep(t(61)), 1);
    assert_eq!(index.len(), 1);
    // A saga that moved on after an expiring record was seen is not dropped by the old expiry.
    let mut first = update(3, 3, "order-creation", Phase::Completed, None, 0);
    first.expires = Some(t(100));
    index.apply(&first);
    index.apply(&update(
        4,
        3,
        "order-creation",
        Phase::Running,
        Some("x"),
        1,
    ));
    assert_eq!(index.sweep(t(200)), 0);
    assert_eq!(index.len(), 2);
}

#[test]
fn record_headers_are_read_or_refused_by_name() {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(header::SAGA_ID, id(9).as_str());
    headers.insert(header::SAGA_TYPE, "order-creation");
    headers.insert(header::PHASE, "completed");
    headers.insert(header::KEY, "order-9");
    headers.insert(header::CREATED, "2027-01-15T08:00:00Z");
    headers.insert(header::TIMER_AT, "2027-01-15T08:00:05.250Z");
    headers.insert(header::TTL, "1h30m");
    let update = Update::from_headers(7, &headers, t(10)).unwrap();
    assert_eq!(update.seq, 7);
    assert_eq!(update.phase, Phase::Completed);
    assert_eq!(update.step, None);
    assert_eq!(update.key.as_deref(), Some("order-9"));
    assert_eq!(update.expires, Some(t(10) + TimeDelta::minutes(90)));
    assert_eq!(update.timer_at.unwrap().timestamp_subsec_millis(), 250);

    headers.insert(header::TTL, "30");
    assert_eq!(
        Update::from_headers(7, &headers, t(10)).unwrap().expires,
        Some(t(40))
    );
    for (name, value, problem) in [
        (header::PHASE, "sleeping", "unknown saga state"),
        (header::CREATED, "yesterday", header::CREATED),
        (header::TTL, "soon", "Nats-TTL"),
    ] {
        let mut bad = headers.clone();
        bad.insert(name, value);
        let err = Update::from_headers(7, &bad, t(10))
            .unwrap_err()
            .to_string();
        assert!(err.contains(problem) && err.contains("record 7"), "{err}");
    }
    let mut missing = async_nats::HeaderMap::new();
    missing.insert(header::PHASE, "running");
    missing.insert(header::CREATED, "2027-01-15T08:00:00Z");
    let err = Update::from_headers(1, &missing, t(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains(header::SAGA_ID), "{err}");
}

#[test]
fn overdue_lists_live_sagas_whose_timer_passed() {
    let index = Index::new(Arc::new(Registry::builtin()));
    let with_timer = |seq, saga, phase, timer: Option<i64>| Update {
        timer_at: timer.map(t),
        ..update(seq, saga, "order-creation", phase, Some("reserve-stock"), 1)
    };
    index.apply(&with_timer(1, 1, Phase::Running, Some(5)));
    index.apply(&with_timer(2, 2, Phase::Compensating, Some(8)));
    index.apply(&with_timer(3, 3, Phase::Running, Some(20)));
    index.apply(&with_timer(4, 4, Phase::Running, None));
    index.apply(&with_timer(5, 5, Phase::Failed, None));
    index.apply(&with_timer(6, 6, Phase::Completed, None));
    let overdue_ids = |before| {
        let mut ids: Vec<String> = index
            .overdue(t(before), 100)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        ids
    };
    // A live saga with no timer at all is overdue too: nothing would wake it.
    assert_eq!(overdue_ids(10), vec![id(1), id(2), id(4)]);
    let mut found = index.overdue(t(10), 100);
    found.sort();
    assert_eq!(found[0], (id(1), Some(t(5))));
    assert_eq!(found[2], (id(4), None));
    assert_eq!(index.overdue(t(10), 1).len(), 1);
    assert_eq!(overdue_ids(4), vec![id(4)], "only the one with no timer");
    // A newer record with a later timer takes the saga off the list.
    index.apply(&with_timer(7, 1, Phase::Running, Some(30)));
    index.apply(&with_timer(8, 4, Phase::Running, Some(30)));
    assert_eq!(overdue_ids(10), vec![id(2)]);
}

/// The listing's consumer counts as stalled only when it has been idle long
/// enough while the journal holds records it has not delivered.
#[test]
fn a_consumer_idle_behind_the_journal_is_stalled() {
    let long = STALL_AFTER;
    let short = STALL_AFTER - Duration::from_millis(1);
    assert!(stalled(10, 11, long), "behind and idle");
    assert!(!stalled(10, 11, short), "behind, but not idle for long");
    assert!(!stalled(11, 11, long * 10), "idle, but nothing to deliver");
    assert!(!stalled(0, 0, long), "an empty journal");
}

#[test]
fn the_listing_holds_at_most_its_bound_of_finished_sagas_and_every_live_one() {
    let index = Index::bounded(Arc::new(Registry::builtin()), 2);
    let finished = |seq: u64, saga: u32, phase: Phase, at: i64| Update {
        expires: Some(t(at + 86_400)),
        ..update(seq, saga, "order-creation", phase, None, at)
    };
    index.apply(&update(
        1,
        1,
        "order-creation",
        Phase::Running,
        Some("reserve-stock"),
        1,
    ));
    index.apply(&update(2, 2, "order-creation", Phase::Failed, Some("x"), 2));
    index.apply(&finished(3, 3, Phase::Completed, 3));
    index.apply(&finished(4, 4, Phase::Compensated, 4));
    assert_eq!(index.unlisted(), 0);
    // A third finished saga pushes out the oldest finished one, and only it.
    index.apply(&finished(5, 5, Phase::Completed, 5));
    assert_eq!(
        ids(&index, &Filter::default(), 6),
        [id(5), id(4), id(2), id(1)]
    );
    assert_eq!(index.unlisted(), 1);
    // The running saga finishing counts as the newest finished: the oldest goes.
    index.apply(&finished(6, 1, Phase::Completed, 6));
    assert_eq!(ids(&index, &Filter::default(), 7), [id(1), id(5), id(2)]);
    assert_eq!(index.unlisted(), 2);
    // A parked failed saga is never dropped, however many finish after it.
    for n in 10..20 {
        index.apply(&finished(u64::from(n), n, Phase::Completed, i64::from(n)));
    }
    let failed = Filter {
        phase: Some(Phase::Failed),
        ..Filter::default()
    };
    assert_eq!(ids(&index, &failed, 30), [id(2)]);
    assert_eq!(index.len(), 3);
    assert_eq!(index.unlisted(), 12);
    // What is left still expires by itself.
    assert_eq!(index.sweep(t(19 + 86_400)), 2);
    assert_eq!(ids(&index, &Filter::default(), 30), [id(2)]);
}
