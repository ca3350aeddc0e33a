//! Fills a saga listing with N sagas (default 1,000,000) and times page queries.
//!
//! `cargo run --release -p jetsaga-orchestrator --example index_bench -- 1000000`
//!
//! Prints the fill time, the resident memory the entries added (from
//! `/proc/self/statm`, Linux only) and the median and worst of 20 runs of each
//! query shape.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use jetsaga_orchestrator::definitions::Registry;
use jetsaga_orchestrator::index::{Filter, Index, Update};
use jetsaga_sagas::Phase;

fn rss_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N is a number"))
        .unwrap_or(1_000_000);
    let index = Index::new(Arc::new(Registry::builtin()));
    let start = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let before = rss_bytes();
    let filled = Instant::now();
    for i in 0..n {
        // Mostly finished sagas, some running, a few failed: a realistic mix.
        let phase = match i % 100 {
            0 => Phase::Failed,
            1..=4 => Phase::Running,
            5 => Phase::Compensating,
            6..=15 => Phase::Compensated,
            _ => Phase::Completed,
        };
        let step = matches!(phase, Phase::Running | Phase::Compensating | Phase::Failed)
            .then(|| "take-payment".to_owned());
        index.apply(&Update {
            seq: u64::from(i) + 1,
            saga_id: uuid::Uuid::new_v4().to_string(),
            saga_type: "order-creation".to_owned(),
            phase,
            step,
            key: Some(format!("order-{i:07}")),
            timer_at: None,
            created: start + TimeDelta::milliseconds(i64::from(i)),
            updated: start + TimeDelta::milliseconds(i64::from(i)),
            expires: phase.is_finished().then(|| start + TimeDelta::days(7)),
        });
    }
    let fill = filled.elapsed();
    let added = rss_bytes().zip(before).map(|(a, b)| a.saturating_sub(b));
    println!("filled {n} sagas in {fill:?}");
    if let Some(bytes) = added {
        println!(
            "resident memory added: {:.1} MiB, {} bytes per saga",
            bytes as f64 / 1048576.0,
            bytes / n.max(1) as usize
        );
    }
    let now: DateTime<Utc> = start + TimeDelta::milliseconds(i64::from(n) + 1000);
    let mid = start + TimeDelta::milliseconds(i64::from(n / 2));
    let shapes: Vec<(&str, Filter)> = vec![
        ("newest 50, no filter", Filter::default()),
        (
            "state=failed",
            Filter {
                phase: Some(Phase::Failed),
                ..Filter::default()
            },
        ),
        (
            "state=running type=order-creation",
            Filter {
                phase: Some(Phase::Running),
                saga_type: Some("order-creation".into()),
                ..Filter::default()
            },
        ),
        (
            "stuck=true",
            Filter {
                stuck: Some(true),
                ..Filter::default()
            },
        ),
        (
            "updated_before=middle",
            Filter {
                updated_before: Some(mid),
                ..Filter::default()
            },
        ),
        (
            "no match (updated_after=future)",
            Filter {
                updated_after: Some(now),
                ..Filter::default()
            },
        ),
    ];
    for (name, filter) in shapes {
        let mut times = Vec::new();
        let mut found = 0;
        for _ in 0..20 {
            let t = Instant::now();
            let page = index.page(&filter, None, 50, now);
            times.push(t.elapsed());
            found = page.items.len();
        }
        times.sort();
        println!(
            "{name:<45} {found:>3} items  median {:?}  max {:?}",
            times[10], times[19]
        );
    }
    // A deep page: the cursor of page 1000.
    let mut cursor = None;
    for _ in 0..1000 {
        cursor = index.page(&Filter::default(), cursor, 50, now).next;
    }
    let t = Instant::now();
    let page = index.page(&Filter::default(), cursor, 50, now);
    println!(
        "page 1001 by cursor: {} items in {:?}",
        page.items.len(),
        t.elapsed()
    );
}
