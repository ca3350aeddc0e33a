//! What the runner sees on the wire, and what it adds to it.
//!
//! Two core NATS subscriptions (`saga.cmd.>` and `saga.reply.>`) see every command the
//! orchestrators publish and every reply the participants publish. From them:
//!
//! - the **recovery probe** (issue 10, hole 12): when a participant is killed and restarted,
//!   the commands it had in flight (sent to it in the last 30 s, not answered yet) are noted,
//!   and the time from its restart to each one's reply is measured; the summary gives the
//!   median and the share answered within 3 s;
//! - the **late successes**: which forward commands were answered with a success, so the
//!   checks can tell a step timeout whose success came after all ([`Traffic::answered_ok`]);
//! - **reply copies** (`--duplicates F`): a share `F` of the replies is published again 1–4
//!   more times (so delivered 2–5×), most within 10 s, a quarter of them (for replies seen early
//!   enough in the load) 125–150 s later, past the replies stream's 2-minute duplicate window.
//!   A copy carries the reply's headers without its `Nats-Msg-Id` and its
//!   `Nats-Expected-Last-Subject-Sequence`, so JetStream stores every copy (as from a
//!   participant that does not follow the protocol), plus [`COPY_HEADER`] so the runner tells
//!   its own copies apart.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use jetsaga_sagas::protocol::{self, Body, CommandId, Direction, Outcome, header};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;

use crate::Error;

/// The header on every reply copy the runner publishes (the copy's number, from 1).
pub(crate) const COPY_HEADER: &str = "Jetsaga-Chaos-Copy";
/// The replies stream's duplicate window (the streams' default).
const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// When an early copy goes out after its original.
const EARLY_COPY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));
/// When a late copy goes out after its original: past the duplicate window.
const LATE_COPY: (Duration, Duration) = (Duration::from_secs(125), Duration::from_secs(150));
/// Share of the copies sent late, where the load lasts long enough.
const LATE_SHARE: f64 = 0.25;
/// A command counts as in flight at a kill if it was sent this recently and is unanswered.
const IN_FLIGHT_AGE: Duration = Duration::from_secs(30);
/// Unanswered commands older than this are forgotten (their reply was missed, e.g. while
/// the runner's connection was down).
const FORGET_AFTER: Duration = Duration::from_secs(300);
/// The recovery the issue asks for: in-flight steps answered within this of the restart.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
/// Upper bound for publishing one copy.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the reply copies came to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Copies {
    /// Share of the replies copied.
    pub share: f64,
    /// Replies chosen for copies.
    pub replies_copied: u64,
    /// Copies JetStream stored.
    pub published: u64,
    /// Of those, copies published past the 2-minute duplicate window after their original.
    pub published_late: u64,
    /// Copies that could not be published (nats-server down) or were still due at the end.
    pub not_published: u64,
}

/// How fast the commands in flight on a killed participant were answered after its restart.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    /// Participant kills (each followed by a restart at once).
    pub kills: u64,
    /// Commands in flight on the participant at its kills (sent, unanswered).
    pub in_flight: u64,
    /// Of those, answered before the participant was killed again.
    pub answered: u64,
    /// Restart to reply: median, in seconds.
    pub median_s: f64,
    /// 90th percentile, in seconds.
    pub p90_s: f64,
    /// Longest, in seconds.
    pub max_s: f64,
    /// Share of the answered ones answered within 3 s of the restart.
    pub within_3s: f64,
    /// Answered, but another fault came between the restart and the reply (the same
    /// participant stopped, nats-server restarted): left out of the figures above.
    pub disturbed: u64,
    /// The longest of those, in seconds.
    pub disturbed_max_s: f64,
    /// Not answered before the participant's next kill (measured again from that restart).
    pub interrupted: u64,
    /// Never answered by the end of the run.
    pub unanswered: u64,
}

impl Recovery {
    /// The summary line.
    pub fn render(&self) -> String {
        format!(
            "  recovery after a participant kill (hole 12): {} commands in flight over {} kills, \
             {} answered: restart to reply median {:.2} s, p90 {:.2} s, max {:.2} s, {:.0} % within 3 s; \
             {} more answered after another fault in between (a stop of that participant, a \
             nats-server restart; max {:.2} s); {} interrupted by the next kill, {} never answered",
            self.in_flight,
            self.kills,
            self.answered,
            self.median_s,
            self.p90_s,
            self.max_s,
            self.within_3s * 100.0,
            self.disturbed,
            self.disturbed_max_s,
            self.interrupted,
            self.unanswered
        )
    }
}

impl Copies {
    /// The summary line.
    pub fn render(&self) -> String {
        format!(
            "  reply copies: {} of the replies ({:.0} %) published again: {} copies stored, {} of \
             them past the 2-minute duplicate window; {} not published",
            self.replies_copied,
            self.share * 100.0,
            self.published,
            self.published_late,
            self.not_published
        )
    }
}

struct Open {
    participant: String,
    sent: Instant,
}

struct Probe {
    participant: String,
    restarted: Instant,
    /// Another fault came before the reply.
    disturbed: bool,
}

struct Due {
    late: bool,
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
}

struct State {
    open: HashMap<String, Open>,
    /// Every command answered (by an original reply).
    answered: HashSet<String>,
    answered_ok: HashSet<String>,
    probes: HashMap<String, Probe>,
    samples: Vec<f64>,
    disturbed_samples: Vec<f64>,
    recovery: Recovery,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    due: HashMap<u64, Due>,
    next_copy: u64,
    copies: Copies,
    rng: rand::rngs::StdRng,
    /// Replies seen before this may get late copies (they go out before the load ends);
    /// `None`: the load is too short for any.
    late_until: Option<Instant>,
}

/// The runner's subscriptions and copier; stopped when dropped.
#[derive(Debug)]
pub(crate) struct Traffic {
    state: Arc<Mutex<State>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("open", &self.open.len())
            .field("due", &self.due.len())
            .finish_non_exhaustive()
    }
}

impl Traffic {
    /// Subscribes to every command and reply; copies a `share` of the replies, late ones only
    /// for replies seen before `load_ends` less the late delay.
    pub(crate) async fn start(
        client: async_nats::Client,
        share: f64,
        seed: u64,
        load_ends: Instant,
    ) -> Result<Self, Error> {
        let subscribe = |subject: &'static str| {
            let client = client.clone();
            async move {
                client
                    .subscribe(subject)
                    .await
                    .map_err(|e| Error::Io(format!("subscribing to {subject}: {e}")))
            }
        };
        let mut commands = subscribe(protocol::subject::COMMANDS).await?;
        let mut replies = subscribe(protocol::subject::REPLIES).await?;
        client
            .flush()
            .await
            .map_err(|e| Error::Io(format!("NATS: {e}")))?;
        let state = Arc::new(Mutex::new(State::new(share, seed, load_ends)));
        let watch = {
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        Some(m) = commands.next() => lock(&state).on_command(&m),
                        Some(m) = replies.next() => lock(&state).on_reply(&m, share),
                        else => break,
                    }
                }
            })
        };
        let copier = {
            let state = state.clone();
            let js = jetstream::new(client);
            tokio::spawn(async move { copy(&state, &js).await })
        };
        Ok(Self {
            state,
            tasks: vec![watch, copier],
        })
    }

    /// Participant `name` was killed and has just been started again.
    pub(crate) fn restarted(&self, name: &str) {
        lock(&self.state).restarted(name);
    }

    /// Another fault hits the commands measured so far: those of `participant` (stopped), or
    /// all of them (`None`: nats-server restarts).
    pub(crate) fn disturbed(&self, participant: Option<&str>) {
        lock(&self.state).disturbed(participant);
    }

    /// Waits until every copy has been published, or `within` has passed.
    pub(crate) async fn copies_sent(&self, within: Duration) {
        let give_up = Instant::now() + within;
        while !lock(&self.state).due.is_empty() && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The forward commands answered with a success (by their original reply).
    pub(crate) fn answered_ok(&self) -> HashSet<String> {
        lock(&self.state).answered_ok.clone()
    }

    /// The recovery probe's and the copies' figures so far.
    pub(crate) fn report(&self) -> (Recovery, Copies) {
        lock(&self.state).report()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// The recovery probe's and the copies' figures so far.
    fn report(&self) -> (Recovery, Copies) {
        let mut recovery = self.recovery.clone();
        let mut samples = self.samples.clone();
        let latency = jetsaga_bench::percentiles(&mut samples);
        recovery.answered = samples.len() as u64;
        recovery.median_s = latency.p50;
        recovery.p90_s = latency.p90;
        recovery.max_s = latency.max;
        let within = samples
            .iter()
            .filter(|s| **s <= ANSWER_WITHIN.as_secs_f64())
            .count();
        recovery.within_3s = if samples.is_empty() {
            0.0
        } else {
            within as f64 / samples.len() as f64
        };
        recovery.unanswered = self.probes.len() as u64;
        recovery.disturbed = self.disturbed_samples.len() as u64;
        recovery.disturbed_max_s = self.disturbed_samples.iter().copied().fold(0.0, f64::max);
        let mut copies = self.copies.clone();
        copies.not_published += self.due.len() as u64;
        (recovery, copies)
    }

    fn new(share: f64, seed: u64, load_ends: Instant) -> Self {
        Self {
            open: HashMap::new(),
            answered: HashSet::new(),
            answered_ok: HashSet::new(),
            probes: HashMap::new(),
            samples: Vec::new(),
            disturbed_samples: Vec::new(),
            recovery: Recovery::default(),
            queue: BinaryHeap::new(),
            due: HashMap::new(),
            next_copy: 0,
            copies: Copies {
                share,
                ..Copies::default()
            },
            // Its own stream of numbers: the fault schedule's stays as it was for a seed.
            rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0x636f_7069_6573),
            late_until: load_ends.checked_sub(LATE_COPY.1),
        }
    }

    fn on_command(&mut self, message: &async_nats::Message) {
        let Ok(command) = protocol::Command::decode(&message.payload) else {
            return;
        };
        let Some(participant) = message.subject.split('.').nth(2) else {
            return;
        };
        // An orchestrator publishes a transition's commands again when it completes an
        // interrupted one; JetStream drops such a copy of an answered command, so it is not in
        // flight. A command sent again unanswered keeps the time it was first sent.
        if self.answered.contains(&command.command_id) {
            return;
        }
        self.open.entry(command.command_id).or_insert_with(|| Open {
            participant: participant.to_owned(),
            sent: Instant::now(),
        });
    }

    fn on_reply(&mut self, message: &async_nats::Message, share: f64) {
        let headers = message.headers.clone().unwrap_or_default();
        if headers.get(COPY_HEADER).is_some() {
            return;
        }
        let Ok(reply) = protocol::Reply::decode(&message.payload) else {
            return;
        };
        let now = Instant::now();
        self.open.remove(&reply.command_id);
        self.answered.insert(reply.command_id.clone());
        if let Some(probe) = self.probes.remove(&reply.command_id) {
            let took = now.duration_since(probe.restarted).as_secs_f64();
            if probe.disturbed {
                self.disturbed_samples.push(took);
            } else {
                self.samples.push(took);
            }
        }
        let forward =
            CommandId::parse(&reply.command_id).is_ok_and(|id| id.direction == Direction::Forward);
        if forward && matches!(reply.outcome, Outcome::Ok { .. }) {
            self.answered_ok.insert(reply.command_id.clone());
        }
        if share > 0.0 && self.rng.random_bool(share) {
            self.copies.replies_copied += 1;
            let mut copy_headers = HeaderMap::new();
            for (name, values) in headers.iter() {
                let name_str: &str = name.as_ref();
                if name_str == header::MSG_ID || name_str == header::EXPECTED_LAST_SUBJECT_SEQUENCE
                {
                    continue;
                }
                for value in values {
                    copy_headers.append(name.clone(), value.clone());
                }
            }
            let copies = self.rng.random_range(1..=4_u32);
            for n in 1..=copies {
                let late = self.late_until.is_some_and(|until| now < until)
                    && self.rng.random_bool(LATE_SHARE);
                let (lo, hi) = if late { LATE_COPY } else { EARLY_COPY };
                let delay = self.rng.random_range(lo.as_secs_f64()..=hi.as_secs_f64());
                let mut headers = copy_headers.clone();
                headers.insert(COPY_HEADER, n.to_string().as_str());
                let at = now + Duration::from_secs_f64(delay);
                let id = self.next_copy;
                self.next_copy += 1;
                self.queue.push(Reverse((at, id)));
                self.due.insert(
                    id,
                    Due {
                        late: at.duration_since(now) > DEDUP_WINDOW,
                        subject: message.subject.to_string(),
                        headers,
                        payload: message.payload.clone(),
                    },
                );
            }
        }
    }

    fn restarted(&mut self, name: &str) {
        let now = Instant::now();
        self.recovery.kills += 1;
        let before = self.probes.len();
        self.probes.retain(|_, p| p.participant != name);
        self.recovery.interrupted += (before - self.probes.len()) as u64;
        self.open
            .retain(|_, o| now.duration_since(o.sent) < FORGET_AFTER);
        for (id, open) in &self.open {
            if open.participant == name && now.duration_since(open.sent) < IN_FLIGHT_AGE {
                self.recovery.in_flight += 1;
                self.probes.insert(
                    id.clone(),
                    Probe {
                        participant: name.to_owned(),
                        restarted: now,
                        disturbed: false,
                    },
                );
            }
        }
    }

    fn disturbed(&mut self, participant: Option<&str>) {
        for probe in self.probes.values_mut() {
            if participant.is_none_or(|name| probe.participant == name) {
                probe.disturbed = true;
            }
        }
    }

    /// The next copy that is due now, if any; otherwise when the next one is due.
    fn next_due(&mut self, now: Instant) -> Result<Due, Option<Instant>> {
        match self.queue.peek() {
            Some(Reverse((at, _))) if *at > now => Err(Some(*at)),
            Some(_) => {
                let Some(Reverse((_, id))) = self.queue.pop() else {
                    return Err(None);
                };
                self.due.remove(&id).ok_or(None)
            }
            None => Err(None),
        }
    }
}

/// Publishes each copy when it is due, until aborted.
async fn copy(state: &Mutex<State>, js: &jetstream::Context) {
    loop {
        let now = Instant::now();
        let next = lock(state).next_due(now);
        let due = match next {
            Ok(due) => due,
            Err(at) => {
                let wake = at.unwrap_or(now + Duration::from_millis(100));
                tokio::time::sleep_until(wake.min(now + Duration::from_millis(100))).await;
                continue;
            }
        };
        let published = tokio::time::timeout(PUBLISH_TIMEOUT, async {
            js.publish_with_headers(due.subject, due.headers, due.payload)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        let mut state = lock(state);
        match published {
            Ok(Ok(_)) => {
                state.copies.published += 1;
                state.copies.published_late += u64::from(due.late);
            }
            Ok(Err(_)) | Err(_) => state.copies.not_published += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn message(subject: &str, body: Vec<u8>, headers: HeaderMap) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: None,
            length: body.len(),
            payload: body.into(),
            headers: Some(headers),
            status: None,
            description: None,
        }
    }

    fn command(id: &str) -> async_nats::Message {
        let body = protocol::Command {
            protocol: protocol::VERSION,
            command_id: id.to_owned(),
            saga_id: "s".to_owned(),
            saga_type: "order-creation".to_owned(),
            step: "take-payment".to_owned(),
            action: "charge".to_owned(),
            compensation: false,
            attempt: 1,
            reply_to: protocol::subject::reply("payment", id),
            input: serde_json::Value::Null,
        };
        message("saga.cmd.payment.charge", body.encode(), HeaderMap::new())
    }

    fn reply(id: &str, ok: bool, headers: HeaderMap) -> async_nats::Message {
        let outcome = if ok {
            Outcome::Ok {
                result: serde_json::Value::Null,
            }
        } else {
            Outcome::Failed {
                error: protocol::Failure::new("card_declined", "no", false),
            }
        };
        let body = protocol::Reply {
            protocol: protocol::VERSION,
            command_id: id.to_owned(),
            saga_id: "s".to_owned(),
            outcome,
        };
        let subject = protocol::subject::reply("payment", id);
        message(&subject, body.encode(), headers)
    }

    #[tokio::test]
    async fn commands_in_flight_at_a_kill_are_timed_to_their_reply_and_replies_are_copied() {
        let mut state = State::new(0.0, 1, Instant::now() + Duration::from_secs(60));
        // Answered, then published again by an orchestrator completing a transition: not in
        // flight at the kill.
        state.on_command(&command("s:take-payment:do:1"));
        state.on_reply(&reply("s:take-payment:do:1", true, HeaderMap::new()), 0.0);
        state.on_command(&command("s:take-payment:do:1"));
        state.on_command(&command("s:take-payment:do:2"));
        state.on_command(&command("s:take-payment:do:3"));
        state.restarted("inventory");
        assert_eq!(
            state.recovery.in_flight, 0,
            "no command went to the inventory"
        );
        state.restarted("payment");
        assert_eq!(state.recovery.in_flight, 2);
        state.on_reply(&reply("s:take-payment:do:2", false, HeaderMap::new()), 0.0);
        assert_eq!(state.samples.len(), 1);
        // Attempt 3 is still unanswered at the next kill: interrupted, and in flight again.
        state.restarted("payment");
        assert_eq!(
            (
                state.recovery.kills,
                state.recovery.interrupted,
                state.recovery.in_flight
            ),
            (3, 1, 3)
        );
        assert_eq!(
            state.answered_ok,
            HashSet::from(["s:take-payment:do:1".to_owned()]),
            "only forward successes"
        );
        // Another participant stopped: attempt 3 still counts; then payment itself stopped
        // (or nats-server restarted): its reply is counted apart.
        state.disturbed(Some("inventory"));
        assert!(!state.probes["s:take-payment:do:3"].disturbed);
        state.disturbed(None);
        state.on_reply(&reply("s:take-payment:do:3", true, HeaderMap::new()), 0.0);
        assert_eq!((state.samples.len(), state.disturbed_samples.len()), (1, 1));
        let (recovery, _) = state.report();
        assert_eq!((recovery.answered, recovery.disturbed), (1, 1));

        // Every reply copied (share 1): 1–4 copies each, without what makes JetStream drop a
        // copy (a message id, "only if the subject is empty"), marked.
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, "reply:s:take-payment:do:3");
        headers.insert(header::EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        headers.insert(header::TTL, "1h");
        state.on_reply(&reply("s:take-payment:do:3", true, headers), 1.0);
        let copies: Vec<&Due> = state.due.values().collect();
        assert!((1..=4).contains(&copies.len()), "{}", copies.len());
        for copy in &copies {
            assert!(copy.headers.get(header::MSG_ID).is_none());
            assert!(
                copy.headers
                    .get(header::EXPECTED_LAST_SUBJECT_SEQUENCE)
                    .is_none()
            );
            assert_eq!(copy.headers.get(header::TTL).unwrap().as_str(), "1h");
            assert!(copy.headers.get(COPY_HEADER).is_some());
            assert!(!copy.late, "the load is not long enough for late copies");
        }
        assert_eq!(state.copies.replies_copied, 1);
        // A copy the runner published is neither an answer nor copied again.
        let mut marked = HeaderMap::new();
        marked.insert(COPY_HEADER, "1");
        let before = state.due.len();
        state.on_reply(&reply("s:take-payment:do:4", true, marked), 1.0);
        assert_eq!(state.due.len(), before);
        assert!(!state.answered.contains("s:take-payment:do:4"));
    }
}
