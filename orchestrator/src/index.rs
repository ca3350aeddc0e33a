//! The saga listing: an in-memory projection of the journal stream, one per
//! orchestrator instance.
//!
//! Every journal record carries its saga's summary in headers (`Jetsaga-Saga-Id`,
//! `-Saga-Type`, `-Phase`, `-Step`, `-Key`, `-Timer-At`, `-Created`, and `Nats-TTL`
//! on a finished saga's record). [`run`] reads them with a headers-only ordered
//! consumer over `saga.journal.>` — record bodies never travel — and keeps the last
//! record of each saga. At start it replays the whole stream (the listing survives
//! a restart because the journal does); every instance keeps its own copy of the
//! same stream, so several instances list the same sagas.
//!
//! Entries are grouped by (saga type, state), each group ordered by (updated time,
//! journal sequence) of the saga's last record. A page merges the groups the filter
//! selects, newest first, starting below the cursor or `updated_before` and
//! stopping at `updated_after` or after `limit` matches: a page costs
//! O(groups × log n + limit), whatever the number of sagas; only `stuck` (which
//! the order cannot bound) skips entries. The cursor is the position of the last
//! entry returned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use jetsaga_sagas::Phase;
use tokio_util::sync::CancellationToken;

use crate::definitions::Registry;

/// The headers of a journal record the listing reads (see `record::headers`).
pub use jetsaga_sagas::protocol::header;

/// What one journal record says about its saga.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The journal sequence of the record.
    pub seq: u64,
    /// The saga id.
    pub saga_id: String,
    /// Its type.
    pub saga_type: String,
    /// Its state.
    pub phase: Phase,
    /// Its current step.
    pub step: Option<String>,
    /// Its business key.
    pub key: Option<String>,
    /// Its armed timer.
    pub timer_at: Option<DateTime<Utc>>,
    /// When it was created.
    pub created: DateTime<Utc>,
    /// When the record was written (the saga's last update).
    pub updated: DateTime<Utc>,
    /// When the record expires (finished sagas).
    pub expires: Option<DateTime<Utc>>,
}

/// Why a record's headers could not be read.
#[derive(Debug, thiserror::Error)]
#[error("journal record {seq}: {problem}")]
pub struct BadRecord {
    seq: u64,
    problem: String,
}

impl Update {
    /// Reads a record's headers; `updated` is the message's timestamp.
    ///
    /// # Errors
    ///
    /// [`BadRecord`] when a required header is missing or malformed.
    pub fn from_headers(
        seq: u64,
        headers: &async_nats::HeaderMap,
        updated: DateTime<Utc>,
    ) -> Result<Self, BadRecord> {
        let bad = |problem: String| BadRecord { seq, problem };
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        let need = |name: &str| get(name).ok_or_else(|| bad(format!("no {name} header")));
        let time = |name: &str, value: &str| {
            DateTime::parse_from_rfc3339(value)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| bad(format!("{name}: {e}")))
        };
        let phase: Phase = need(header::PHASE)?.parse().map_err(|e: String| bad(e))?;
        let created = time(header::CREATED, &need(header::CREATED)?)?;
        let timer_at = match get(header::TIMER_AT) {
            Some(t) => Some(time(header::TIMER_AT, &t)?),
            None => None,
        };
        let expires = match get(header::TTL) {
            Some(ttl) => {
                Some(updated + parse_ttl(&ttl).map_err(|e| bad(format!("Nats-TTL: {e}")))?)
            }
            None => None,
        };
        Ok(Self {
            seq,
            saga_id: need(header::SAGA_ID)?,
            saga_type: need(header::SAGA_TYPE)?,
            phase,
            step: get(header::STEP),
            key: get(header::KEY),
            timer_at,
            created,
            updated,
            expires,
        })
    }
}

/// `Nats-TTL` values: a Go duration (`30m`, `1h30m`, `10s`), plain seconds, or
/// `never`.
fn parse_ttl(text: &str) -> Result<chrono::TimeDelta, String> {
    if text.eq_ignore_ascii_case("never") {
        return Ok(chrono::TimeDelta::MAX);
    }
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(chrono::TimeDelta::seconds(seconds));
    }
    let d = humantime_like(text).ok_or_else(|| format!("invalid duration \"{text}\""))?;
    chrono::TimeDelta::from_std(d).map_err(|e| e.to_string())
}

fn humantime_like(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let n: f64 = number.parse().ok()?;
        let seconds = match unit {
            "ns" => n / 1e9,
            "us" | "µs" => n / 1e6,
            "ms" => n / 1e3,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return None,
        };
        total += Duration::try_from_secs_f64(seconds).ok()?;
        rest = next;
    }
    Some(total)
}

/// What a page asks for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this type.
    pub saga_type: Option<String>,
    /// Only this state.
    pub phase: Option<Phase>,
    /// Only stuck (true) or only not stuck (false) sagas.
    pub stuck: Option<bool>,
    /// Only sagas updated before this.
    pub updated_before: Option<DateTime<Utc>>,
    /// Only sagas updated after this.
    pub updated_after: Option<DateTime<Utc>>,
}

/// One saga in a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Its id.
    pub saga_id: String,
    /// Its type.
    pub saga_type: String,
    /// Its state.
    pub phase: Phase,
    /// Its current step.
    pub step: Option<String>,
    /// Its business key (when printable and short).
    pub key: Option<String>,
    /// When it was created.
    pub created: DateTime<Utc>,
    /// When it was last updated.
    pub updated: DateTime<Utc>,
    /// Its armed timer.
    pub timer_at: Option<DateTime<Utc>>,
    /// Whether it is stuck.
    pub stuck: bool,
}

/// A page of sagas.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Newest first.
    pub items: Vec<Summary>,
    /// Where the next page starts, if there may be one.
    pub next: Option<Position>,
}

/// One saga's entry. Times are milliseconds since the epoch; small on purpose:
/// with its B-tree position, id-map and expiry entries and a 13-byte key, a saga
/// costs about 370 bytes of resident memory (`examples/index_bench.rs`).
#[derive(Debug, Clone)]
struct Slot {
    id: u128,
    step: u32,
    updated: i64,
    created: i64,
    timer_at: i64,
    stuck_at: i64,
    expires: i64,
    key: Option<Box<str>>,
}

const NONE: i64 = i64::MAX;
const NO_STEP: u32 = u32::MAX;

/// Which group an entry is in: (type, phase).
type Group = (u32, u8);

/// Where an entry sits in its group: (updated, milliseconds since the epoch;
/// journal sequence). Also the listing's cursor.
pub type Position = (i64, u64);

#[derive(Debug, Default)]
struct Inner {
    types: Interner,
    steps: Interner,
    groups: HashMap<Group, BTreeMap<Position, Slot>>,
    /// Saga id → (group, position).
    by_id: HashMap<u128, (Group, Position)>,
    /// (expiry, id) of finished sagas, for the sweep.
    expiring: BTreeSet<(i64, u128)>,
}

#[derive(Debug, Default)]
struct Interner {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
}

impl Interner {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX - 1);
        let name: Arc<str> = name.into();
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }

    fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    fn name(&self, id: u32) -> Option<&Arc<str>> {
        self.names.get(id as usize)
    }
}

fn phase_code(phase: Phase) -> u8 {
    match phase {
        Phase::Running => 0,
        Phase::Compensating => 1,
        Phase::Completed => 2,
        Phase::Compensated => 3,
        Phase::Failed => 4,
    }
}

/// Running or compensating.
fn is_active(phase: u8) -> bool {
    phase <= 1
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The saga listing of one instance; cheap to clone.
#[derive(Debug, Clone)]
pub struct Index {
    inner: Arc<RwLock<Inner>>,
    registry: Arc<Registry>,
    caught_up: Arc<AtomicBool>,
    /// Sagas seen leaving running/compensating (finished, or parked failed), ever.
    finished: Arc<AtomicU64>,
    /// The most finished (completed or compensated) sagas it lists: past it the
    /// oldest are dropped from the listing (their records stay in the journal, and
    /// `GET /v1/sagas/{id}` still reads them), so memory is bounded by this, not by
    /// the journal's retention.
    max_finished: usize,
    /// Finished sagas dropped for `max_finished`, ever.
    unlisted: Arc<AtomicU64>,
}

/// The default of `engine.listing-max-finished`: ~400 MB of listing.
pub const MAX_FINISHED: usize = 1_000_000;

impl Index {
    /// An empty index; step timeouts for `stuck` come from `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self::bounded(registry, MAX_FINISHED)
    }

    /// An empty index that lists at most `max_finished` finished sagas, the newest.
    pub fn bounded(registry: Arc<Registry>, max_finished: usize) -> Self {
        Self {
            inner: Arc::default(),
            registry,
            caught_up: Arc::new(AtomicBool::new(false)),
            finished: Arc::default(),
            max_finished,
            unlisted: Arc::default(),
        }
    }

    /// How many finished sagas were dropped from the listing because it held
    /// `max_finished` newer ones.
    pub fn unlisted(&self) -> u64 {
        self.unlisted.load(Ordering::Relaxed)
    }

    /// Whether the initial replay of the journal is done.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    /// Marks the initial replay as done.
    pub fn set_caught_up(&self) {
        self.caught_up.store(true, Ordering::SeqCst);
    }

    /// The sagas under way (running or compensating) and how many have left that state so
    /// far (finished, or parked failed): what admission control decides on.
    pub fn activity(&self) -> (u64, u64) {
        let inner = self.read();
        let active: usize = inner
            .groups
            .iter()
            .filter(|(group, _)| is_active(group.1))
            .map(|(_, slots)| slots.len())
            .sum();
        (
            u64::try_from(active).unwrap_or(u64::MAX),
            self.finished.load(Ordering::Relaxed),
        )
    }

    /// How many sagas it holds.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When a saga waiting in `step` since `updated` counts as stuck: after twice
    /// the step's timeout (of the newest loaded version of its type).
    fn stuck_at(&self, update: &Update) -> i64 {
        match update.phase {
            Phase::Failed => ms(update.updated),
            Phase::Completed | Phase::Compensated => NONE,
            Phase::Running | Phase::Compensating => {
                let timeout = update.step.as_deref().and_then(|step| {
                    let def = self.registry.latest(&update.saga_type)?;
                    def.steps.iter().find(|s| s.name == step).map(|s| s.timeout)
                });
                match timeout {
                    Some(t) => {
                        let twice = i64::try_from(t.as_millis().saturating_mul(2)).unwrap_or(NONE);
                        ms(update.updated).saturating_add(twice)
                    }
                    None => NONE,
                }
            }
        }
    }

    /// Applies one journal record: the newest record of a saga wins.
    pub fn apply(&self, update: &Update) {
        let Ok(id) = uuid::Uuid::parse_str(&update.saga_id).map(|u| u.as_u128()) else {
            tracing::warn!(
                saga_id = update.saga_id,
                "saga listing: id is not a UUID; skipped"
            );
            return;
        };
        let stuck_at = self.stuck_at(update);
        let mut inner = self.write();
        let was_active = match inner.by_id.get(&id).copied() {
            Some((group, position)) => {
                if position.1 >= update.seq {
                    return;
                }
                inner.remove(id, group, position);
                is_active(group.1)
            }
            // A saga first seen finished (the follower lagged past its earlier records).
            None => true,
        };
        if was_active && !is_active(phase_code(update.phase)) {
            self.finished.fetch_add(1, Ordering::Relaxed);
        }
        let group = (
            inner.types.intern(&update.saga_type),
            phase_code(update.phase),
        );
        let step = match &update.step {
            Some(s) => inner.steps.intern(s),
            None => NO_STEP,
        };
        let expires = update.expires.map_or(NONE, ms);
        let slot = Slot {
            id,
            step,
            updated: ms(update.updated),
            created: ms(update.created),
            timer_at: update.timer_at.map_or(NONE, ms),
            stuck_at,
            expires,
            key: update.key.as_deref().map(Into::into),
        };
        let position = (slot.updated, update.seq);
        inner
            .groups
            .entry(group)
            .or_default()
            .insert(position, slot);
        inner.by_id.insert(id, (group, position));
        if expires != NONE {
            inner.expiring.insert((expires, id));
            // Every finished record has the same time to live, so the first to
            // expire is the oldest finished saga.
            while inner.expiring.len() > self.max_finished {
                let Some((_, oldest)) = inner.expiring.pop_first() else {
                    break;
                };
                if let Some((group, position)) = inner.by_id.get(&oldest).copied() {
                    inner.remove(oldest, group, position);
                }
                self.unlisted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Live sagas by (type, phase) and stuck ones by type, for the census.
    pub fn counts(&self, now: DateTime<Utc>) -> crate::census::Counts {
        let now = ms(now);
        let inner = self.read();
        let mut counts = crate::census::Counts::default();
        for ((saga_type, phase), slots) in &inner.groups {
            let phase = match phase {
                0 => Phase::Running,
                1 => Phase::Compensating,
                4 => Phase::Failed,
                _ => continue,
            };
            let Some(name) = inner.types.name(*saga_type) else {
                continue;
            };
            let n = i64::try_from(slots.len()).unwrap_or(i64::MAX);
            *counts
                .by_state
                .entry((name.to_string(), phase))
                .or_default() += n;
            if phase != Phase::Failed {
                let stuck = slots.values().filter(|s| s.stuck_at <= now).count();
                *counts.stuck.entry(name.to_string()).or_default() +=
                    i64::try_from(stuck).unwrap_or(i64::MAX);
            }
        }
        counts
    }

    /// Up to `limit` running or compensating sagas whose recorded timer was due
    /// before `before`, or that have none, with that timer: their timer fire was
    /// lost (or never armed), so nothing else would wake them.
    pub fn overdue(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Vec<(String, Option<DateTime<Utc>>)> {
        let before = ms(before);
        let live = [phase_code(Phase::Running), phase_code(Phase::Compensating)];
        let inner = self.read();
        inner
            .groups
            .iter()
            .filter(|((_, phase), _)| live.contains(phase))
            .flat_map(|(_, slots)| slots.values())
            .filter(|slot| slot.timer_at < before || slot.timer_at == NONE)
            .take(limit)
            .map(|slot| {
                let timer_at = (slot.timer_at != NONE).then(|| time(slot.timer_at));
                (uuid::Uuid::from_u128(slot.id).to_string(), timer_at)
            })
            .collect()
    }

    /// Drops the sagas whose last record expired by `now` (expiry sends nothing).
    pub fn sweep(&self, now: DateTime<Utc>) -> usize {
        let now = ms(now);
        let mut inner = self.write();
        let mut dropped = 0;
        while let Some(&(at, id)) = inner.expiring.first() {
            if at > now {
                break;
            }
            inner.expiring.pop_first();
            if let Some((group, position)) = inner.by_id.get(&id).copied() {
                let current = inner
                    .groups
                    .get(&group)
                    .and_then(|g| g.get(&position))
                    .is_some_and(|s| s.expires == at);
                if current {
                    inner.remove(id, group, position);
                    dropped += 1;
                }
            }
        }
        dropped
    }

    /// A page of sagas matching `filter`, newest first, positioned below `before`
    /// (the previous page's cursor).
    pub fn page(
        &self,
        filter: &Filter,
        before: Option<Position>,
        limit: usize,
        now: DateTime<Utc>,
    ) -> Page {
        let now_ms = ms(now);
        let inner = self.read();
        let type_id = match &filter.saga_type {
            Some(t) => match inner.types.get(t) {
                Some(id) => Some(id),
                None => {
                    return Page {
                        items: Vec::new(),
                        next: None,
                    };
                }
            },
            None => None,
        };
        let phases: Vec<u8> = match (filter.phase, filter.stuck) {
            (Some(p), _) => vec![phase_code(p)],
            // Finished sagas are never stuck.
            (None, Some(true)) => vec![0, 1, 4],
            (None, _) => (0..5).collect(),
        };
        // Strictly below both the cursor and updated_before, strictly above updated_after.
        let mut upper = before.unwrap_or((i64::MAX, u64::MAX));
        if let Some(b) = filter.updated_before.map(ms) {
            upper = upper.min((b, 0));
        }
        let lower = filter
            .updated_after
            .map_or((i64::MIN, 0), |a| (ms(a), u64::MAX));
        if lower >= upper {
            return Page {
                items: Vec::new(),
                next: None,
            };
        }
        let mut cursors: Vec<_> = inner
            .groups
            .iter()
            .filter(|((t, p), _)| type_id.is_none_or(|id| id == *t) && phases.contains(p))
            .map(|(group, slots)| {
                let range = slots.range((
                    std::ops::Bound::Excluded(lower),
                    std::ops::Bound::Excluded(upper),
                ));
                (*group, range.rev().peekable())
            })
            .collect();
        let mut items = Vec::new();
        let mut last = None;
        while items.len() < limit {
            // The group whose next entry is the newest.
            let mut best: Option<(usize, Position)> = None;
            for (i, (_, it)) in cursors.iter_mut().enumerate() {
                if let Some((position, _)) = it.peek()
                    && best.is_none_or(|(_, b)| **position > b)
                {
                    best = Some((i, **position));
                }
            }
            let Some((i, _)) = best else { break };
            let (group, it) = &mut cursors[i];
            let group = *group;
            let Some((position, slot)) = it.next() else {
                break;
            };
            last = Some(*position);
            if slot.expires <= now_ms {
                continue;
            }
            let stuck = slot.stuck_at <= now_ms;
            if filter.stuck.is_some_and(|want| want != stuck) {
                continue;
            }
            items.push(inner.summary(group, slot, stuck));
        }
        let more = items.len() == limit && cursors.iter_mut().any(|(_, it)| it.peek().is_some());
        Page {
            items,
            next: if more { last } else { None },
        }
    }
}

impl Inner {
    fn remove(&mut self, id: u128, group: Group, position: Position) {
        if let Some(slots) = self.groups.get_mut(&group)
            && let Some(slot) = slots.remove(&position)
            && slot.expires != NONE
        {
            self.expiring.remove(&(slot.expires, id));
        }
        self.by_id.remove(&id);
    }

    fn summary(&self, (type_id, phase): Group, slot: &Slot, stuck: bool) -> Summary {
        Summary {
            saga_id: uuid::Uuid::from_u128(slot.id).to_string(),
            saga_type: self
                .types
                .name(type_id)
                .map(ToString::to_string)
                .unwrap_or_default(),
            phase: Phase::ALL[phase as usize],
            step: (slot.step != NO_STEP)
                .then(|| self.steps.name(slot.step).map(ToString::to_string))
                .flatten(),
            key: slot.key.as_deref().map(ToOwned::to_owned),
            created: time(slot.created),
            updated: time(slot.updated),
            timer_at: (slot.timer_at != NONE).then(|| time(slot.timer_at)),
            stuck,
        }
    }
}

/// Keeps `index` current from the journal until cancelled: replays the stream,
/// marks the index caught up, then follows new records; sweeps expired entries
/// every second. A consumer that fails, or stalls (no record for
/// [`STALL_AFTER`] while the journal has newer ones: an ordered consumer can
/// hang after its node is lost), is created again from the record after the
/// last one applied.
pub async fn run(js: jetstream::Context, index: Index, token: CancellationToken) {
    let mut applied = 0;
    loop {
        match follow(&js, &index, &token, &mut applied).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, applied, "saga listing: following the journal failed; resuming after the last record applied");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = token.cancelled() => return,
                }
            }
        }
    }
}

/// How long the listing's consumer may deliver nothing while the journal has
/// records it has not delivered before it counts as stalled.
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(10);

/// Whether a consumer that delivered `applied` last, and nothing for `idle`,
/// is stalled behind a journal whose last record is `last`.
pub(crate) fn stalled(applied: u64, last: u64, idle: Duration) -> bool {
    idle >= STALL_AFTER && last > applied
}

async fn follow(
    js: &jetstream::Context,
    index: &Index,
    token: &CancellationToken,
    applied: &mut u64,
) -> Result<(), async_nats::Error> {
    let mut stream = js.get_stream(jetsaga_sagas::streams::JOURNAL.name).await?;
    let last = stream.info().await?.state.last_sequence;
    if last == 0 || last <= *applied {
        index.set_caught_up();
    }
    let deliver_policy = match *applied {
        0 => jetstream::consumer::DeliverPolicy::All,
        seq => jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
    };
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: jetsaga_sagas::protocol::subject::journal(">"),
            headers_only: true,
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut progressed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            next = messages.next() => {
                let message = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err("the journal consumer ended".into()),
                };
                let info = message.info()?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                let nanos = info.published.unix_timestamp_nanos();
                let updated = DateTime::from_timestamp_nanos(i64::try_from(nanos).unwrap_or(i64::MAX));
                match message.headers.as_ref() {
                    Some(headers) => match Update::from_headers(seq, headers, updated) {
                        Ok(update) => index.apply(&update),
                        Err(e) => tracing::debug!(error = %e, "saga listing: record skipped"),
                    },
                    None => tracing::debug!(seq, "saga listing: record without headers skipped"),
                }
                *applied = (*applied).max(seq);
                progressed = tokio::time::Instant::now();
                if pending == 0 || seq >= last {
                    index.set_caught_up();
                }
            }
            _ = sweep.tick() => {
                index.sweep(Utc::now());
                let idle = progressed.elapsed();
                if idle >= STALL_AFTER {
                    let last = stream.info().await?.state.last_sequence;
                    if stalled(*applied, last, idle) {
                        return Err(format!(
                            "no journal record for {}s while the journal is at {last}, the listing at {applied}",
                            idle.as_secs()
                        )
                        .into());
                    }
                    progressed = tokio::time::Instant::now();
                }
            }
            () = token.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
