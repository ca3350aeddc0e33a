//! Cluster mode (`jetsaga chaos --cluster`): the same system on a 3-node NATS cluster, and
//! the faults of a cluster.
//!
//! Three nats-servers on free loopback ports, each with its own temporary store and
//! `sync_interval: always`, routed to each other; the orchestrators create their streams and
//! the participants their buckets with 3 replicas, and every service (and the load generator)
//! gets all three URLs. While the load runs, [`inject`] kills a node with SIGKILL every
//! ~10 s, round robin, keeps it down for a few seconds and starts it again on its store; the
//! next node is killed only once every stream and consumer has a leader and all its replicas
//! are current again, so never two nodes are down (or behind) at once. In between it asks a
//! random stream or consumer leader to step down (`$JS.API.STREAM.LEADER.STEPDOWN.<stream>`,
//! `$JS.API.CONSUMER.LEADER.STEPDOWN.<stream>.<consumer>`).
//!
//! At the end, besides the common checks, [`acknowledged_starts`]: every start the load
//! generator saw acknowledged has a journal (no acknowledged start lost).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use jetsaga_sagas::Phase;
use jetsaga_testkit::{Cluster, NatsServer};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::checks::{Check, Saga};
use crate::system::{System, Tally};
use crate::{Error, Plan, blocking};

/// Nodes in the cluster (and replicas of every stream and bucket).
pub(crate) const NODES: usize = 3;
/// A node is killed every this much (uniform in the range).
const NODE_KILLS: (Duration, Duration) = (Duration::from_secs(9), Duration::from_secs(11));
/// How long a killed node stays down before it is started again on its store.
const NODE_DOWN_FOR: Duration = Duration::from_secs(3);
/// A leader step-down every this much.
const STEP_DOWNS: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(4));
/// Upper bound for every replica to be current again before the next kill; past it the
/// kill is skipped for this turn (two nodes behind at once would leave streams without a
/// quorum, which is an outage to wait out, not a fault this mode means to inject).
const CURRENT_TIMEOUT: Duration = Duration::from_secs(30);
/// A replica this many operations behind its leader counts as caught up: under load a
/// healthy follower is rarely `current` at the instant it is asked (it trails by the writes
/// in flight), while a node that has just come back is thousands behind or offline.
const CAUGHT_UP_LAG: u64 = 200;
/// Upper bound for one JetStream API request of the fault schedule.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// nats-server as the system runs it: one node, or a cluster.
#[derive(Debug)]
pub(crate) enum Nats {
    /// One server (the default mode).
    Single(NatsServer),
    /// [`NODES`] servers, each with what was done to it.
    Cluster {
        cluster: Cluster,
        tallies: Vec<Tally>,
        report: Report,
    },
}

impl Nats {
    /// Starts one server (default options), or a cluster with `sync_interval: always`.
    pub(crate) fn start(cluster: bool) -> Result<Self, Error> {
        if !cluster {
            return NatsServer::try_start()
                .map(Self::Single)
                .map_err(|e| Error::Io(format!("nats-server: {e}")));
        }
        let options = jetsaga_testkit::Options {
            sync_always: true,
            extra_config: String::new(),
            max_store: None,
        };
        let cluster = Cluster::try_start_with(NODES, &options)
            .map_err(|e| Error::Io(format!("nats cluster: {e}")))?;
        Ok(Self::Cluster {
            cluster,
            tallies: vec![Tally::default(); NODES],
            report: Report::default(),
        })
    }

    /// The client URL, or every node's comma-separated (as the services' `nats.url` takes
    /// them).
    pub(crate) fn url(&self) -> String {
        match self {
            Self::Single(server) => server.url(),
            Self::Cluster { cluster, .. } => cluster.url(),
        }
    }

    /// Replicas of the streams and buckets.
    pub(crate) fn replicas(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Cluster { .. } => NODES,
        }
    }

    /// Kills the server (every node of a cluster).
    pub(crate) fn kill(&mut self) {
        match self {
            Self::Single(server) => server.kill(),
            Self::Cluster { cluster, .. } => (0..NODES).for_each(|i| cluster.node_mut(i).kill()),
        }
    }

    /// Starts the server (every node that is down) again on its port and store.
    pub(crate) fn start_again(&mut self) -> Result<(), jetsaga_testkit::Error> {
        match self {
            Self::Single(server) => server.start_again(),
            Self::Cluster { cluster, .. } => {
                (0..NODES).try_for_each(|i| cluster.node_mut(i).start_again())
            }
        }
    }

    /// Everything the server (each node, one after the other) logged so far.
    pub(crate) fn log(&self) -> String {
        match self {
            Self::Single(server) => server.log(),
            Self::Cluster { cluster, .. } => cluster
                .nodes()
                .iter()
                .enumerate()
                .map(|(i, node)| format!("=== node n{i} ===\n{}", node.log()))
                .collect(),
        }
    }

    /// What happened to the server (`single`: its tally), or to each node.
    pub(crate) fn tallies(&self, single: &Tally) -> Vec<(String, Tally)> {
        match self {
            Self::Single(_) => vec![("nats-server".to_owned(), single.clone())],
            Self::Cluster { tallies, .. } => tallies
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("nats-n{i}"), t.clone()))
                .collect(),
        }
    }
}

/// What the cluster's fault schedule did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Nodes killed (SIGKILL) and started again on their store.
    pub node_kills: u64,
    /// Kills skipped because some replica was not current yet.
    pub kills_skipped: u64,
    /// How long each killed node was down (kill to accepting clients), in seconds.
    pub node_outages_s: Vec<f64>,
    /// The longest wait, after a restart, for every replica to be current, in seconds.
    pub max_catch_up_s: f64,
    /// Stream leader step-downs the server carried out.
    pub stream_step_downs: u64,
    /// Consumer leader step-downs the server carried out.
    pub consumer_step_downs: u64,
    /// Step-downs the server refused (e.g. no current replica to take over).
    pub step_downs_refused: u64,
    /// The dead letters at the end, by source subject and reason (numbers and ids
    /// replaced by `#`): what was given up on, and why.
    pub dead_letters: BTreeMap<String, u64>,
}

impl Report {
    /// The summary's lines.
    pub fn render(&self) -> String {
        let max_down = self.node_outages_s.iter().copied().fold(0.0_f64, f64::max);
        let mut out = format!(
            "  cluster: {} node kills (each down ≤ {max_down:.1} s, {} skipped: replicas behind), \
             replicas current again within {:.1} s; leader step-downs: {} stream, {} consumer, \
             {} refused",
            self.node_kills,
            self.kills_skipped,
            self.max_catch_up_s,
            self.stream_step_downs,
            self.consumer_step_downs,
            self.step_downs_refused,
        );
        let letters: u64 = self.dead_letters.values().sum();
        out.push_str(&format!("\n  dead letters: {letters}"));
        for (what, n) in &self.dead_letters {
            out.push_str(&format!("\n    {n:>5}  {what}"));
        }
        out
    }
}

/// The cluster's fault report, with the dead letters at the end, if the system runs on a
/// cluster.
pub(crate) async fn report(system: &System, js: &jetstream::Context) -> Option<Report> {
    let mut report = system
        .with_nats(|nats| match nats {
            Nats::Single(_) => None,
            Nats::Cluster { report, .. } => Some(report.clone()),
        })
        .flatten()?;
    report.dead_letters = match dead_letters(js).await {
        Ok(letters) => letters,
        Err(e) => BTreeMap::from([(format!("(unreadable: {e})"), 0)]),
    };
    Some(report)
}

/// Counts the dead letters by source subject (its first two tokens) and reason.
async fn dead_letters(js: &jetstream::Context) -> Result<BTreeMap<String, u64>, String> {
    use jetsaga_sagas::protocol::header;
    let mut stream = js
        .get_stream(jetsaga_sagas::streams::DEAD_LETTERS.name)
        .await
        .map_err(|e| e.to_string())?;
    let state = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .clone();
    let mut letters = BTreeMap::new();
    if state.messages == 0 {
        return Ok(letters);
    }
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        let value = |name: &str| {
            message
                .headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let subject: Vec<String> = value(header::DEAD_SUBJECT)
            .split('.')
            .take(3)
            .map(str::to_owned)
            .collect();
        let reason = value(header::DEAD_REASON);
        let reason: Vec<&str> = reason
            .split_whitespace()
            .map(|w| {
                if w.chars().any(|c| c.is_ascii_digit()) {
                    "#"
                } else {
                    w
                }
            })
            .collect();
        *letters
            .entry(format!("{}: {}", subject.join("."), reason.join(" ")))
            .or_insert(0) += 1;
    }
    Ok(letters)
}

/// Connects to `url`, or to each of several comma-separated URLs.
pub(crate) async fn connect(url: &str) -> Result<async_nats::Client, Error> {
    let urls: Vec<&str> = url.split(',').map(str::trim).collect();
    async_nats::connect(urls)
        .await
        .map_err(|e| Error::Io(format!("NATS: {e}")))
}

/// Every start the load generator saw acknowledged has a journal. `phases` come from
/// (possibly lagging) replicas; a saga they have no record of is read again from the
/// journal's leader before it counts as lost.
pub(crate) async fn acknowledged_starts(
    store: &jetsaga_orchestrator::store::Store,
    sagas: &[Saga],
    phases: &HashMap<String, Option<Phase>>,
) -> Result<Check, Error> {
    let mut lost = Vec::new();
    for saga in sagas {
        if phases.get(&saga.id).is_some_and(Option::is_some) {
            continue;
        }
        let found = store
            .load(&saga.id, true)
            .await
            .map_err(|e| Error::Io(format!("reading the journal: {e}")))?;
        if found.is_none() {
            lost.push(format!("{}: acknowledged, but no journal", saga.id));
        }
    }
    Ok(Check::new(
        "acknowledged starts",
        format!(
            "{} of {} acknowledged starts in the journal",
            sagas.len() - lost.len(),
            sagas.len()
        ),
        lost,
    ))
}

/// The cluster's fault schedule: node kills and leader step-downs for the plan's duration,
/// then only restarts of services that exit on their own, until aborted.
pub(crate) async fn inject(system: System, plan: Plan) -> Result<(), Error> {
    let client = connect(system.nats_url()).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let begin = tokio::time::Instant::now();
    let end = begin + plan.duration;
    let pick = |rng: &mut rand::rngs::StdRng, (lo, hi): (Duration, Duration)| {
        Duration::from_secs_f64(rng.random_range(lo.as_secs_f64()..=hi.as_secs_f64()))
    };
    let log = |what: String| eprintln!("chaos: {:>6.1} s  {what}", begin.elapsed().as_secs_f64());
    let mut next_kill = begin + pick(&mut rng, NODE_KILLS);
    let mut next_step_down = begin + pick(&mut rng, STEP_DOWNS);
    let mut turn = 0_usize;
    let mut watch = tokio::time::interval(crate::WATCH_INTERVAL);
    loop {
        let earliest = next_kill.min(next_step_down).min(end);
        tokio::select! {
            _ = watch.tick() => {
                let s = system.clone();
                for name in blocking(move || s.restart_exited()).await? {
                    log(format!("{name} had exited; restarted"));
                }
                continue;
            }
            () = tokio::time::sleep_until(earliest) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= end {
            log("end of the fault schedule".to_owned());
            loop {
                watch.tick().await;
                let s = system.clone();
                for name in blocking(move || s.restart_exited()).await? {
                    log(format!("{name} had exited; restarted"));
                }
            }
        }
        if next_step_down <= now {
            log(step_down(&client, &js, &system, &mut rng).await);
            next_step_down = tokio::time::Instant::now() + pick(&mut rng, STEP_DOWNS);
        }
        if next_kill <= now {
            let waited = Instant::now();
            match wait_current(&js).await {
                Ok(()) => {
                    let caught_up = waited.elapsed();
                    let node = turn % NODES;
                    turn += 1;
                    log(format!(
                        "replicas current ({caught_up:.1?}); kill -9 nats-n{node}, down for {NODE_DOWN_FOR:?}"
                    ));
                    let s = system.clone();
                    let outage = blocking(move || kill_node(&s, node, caught_up)).await?;
                    log(format!("nats-n{node} back after {outage:.1?}"));
                }
                Err(behind) => {
                    log(format!("not killing a node: {behind}"));
                    system.with_nats(|nats| {
                        if let Nats::Cluster { report, .. } = nats {
                            report.kills_skipped += 1;
                        }
                    });
                }
            }
            next_kill = tokio::time::Instant::now() + pick(&mut rng, NODE_KILLS);
        }
    }
}

/// Kills node `i`, keeps it down for [`NODE_DOWN_FOR`] and starts it again on its store,
/// blocking until it accepts clients; returns how long it was down.
fn kill_node(system: &System, i: usize, caught_up: Duration) -> Result<Duration, Error> {
    system
        .with_nats(|nats| {
            let Nats::Cluster {
                cluster,
                tallies,
                report,
            } = nats
            else {
                return Err(Error::Io("not a cluster".to_owned()));
            };
            report.max_catch_up_s = report.max_catch_up_s.max(caught_up.as_secs_f64());
            let down = Instant::now();
            cluster.node_mut(i).kill();
            tallies[i].killed += 1;
            report.node_kills += 1;
            std::thread::sleep(NODE_DOWN_FOR);
            cluster
                .node_mut(i)
                .start_again()
                .map_err(|e| Error::Io(format!("nats-n{i} did not come back: {e}")))?;
            tallies[i].restarted += 1;
            let outage = down.elapsed();
            report.node_outages_s.push(outage.as_secs_f64());
            Ok(outage)
        })
        .unwrap_or(Ok(Duration::ZERO))
}

/// Waits until every stream and consumer has a leader and all its replicas are current; the
/// error names what is still behind after [`CURRENT_TIMEOUT`].
async fn wait_current(js: &jetstream::Context) -> Result<(), String> {
    let give_up = Instant::now() + CURRENT_TIMEOUT;
    loop {
        let behind = match tokio::time::timeout(REQUEST_TIMEOUT * 4, behind(js)).await {
            Ok(behind) => behind,
            Err(_) => Some("the cluster state did not answer in time".to_owned()),
        };
        let Some(behind) = behind else {
            return Ok(());
        };
        if Instant::now() >= give_up {
            return Err(behind);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The first stream or consumer without a leader or with a replica that is not current.
async fn behind(js: &jetstream::Context) -> Option<String> {
    let names = match stream_names(js).await {
        Ok(names) => names,
        Err(e) => return Some(e),
    };
    for name in names {
        let mut stream = match js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) => return Some(format!("stream {name}: {e}")),
        };
        let cluster = match stream.info().await {
            Ok(info) => info.cluster.clone(),
            Err(e) => return Some(format!("stream {name}: {e}")),
        };
        if let Some(what) = lagging(cluster.as_ref(), NODES) {
            return Some(format!("stream {name}: {what}"));
        }
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            match info {
                Ok(info) => {
                    // Ephemeral consumers may have one replica (their clients make a new
                    // one when its node goes away): only replicated ones are waited for.
                    let replicated = info.config.num_replicas > 1
                        || info
                            .cluster
                            .as_ref()
                            .is_some_and(|c| !c.replicas.is_empty());
                    if replicated && let Some(what) = lagging(info.cluster.as_ref(), NODES) {
                        return Some(format!("consumer {name}/{}: {what}", info.name));
                    }
                }
                Err(e) => return Some(format!("consumers of {name}: {e}")),
            }
        }
    }
    None
}

/// What keeps a group of `nodes` replicas from being whole: no leader, a replica missing,
/// offline or more than [`CAUGHT_UP_LAG`] behind.
fn lagging(cluster: Option<&jetstream::stream::ClusterInfo>, nodes: usize) -> Option<String> {
    let Some(cluster) = cluster else {
        return Some("no cluster information".to_owned());
    };
    if cluster.leader.is_none() {
        return Some("no leader".to_owned());
    }
    if cluster.replicas.len() + 1 < nodes {
        return Some(format!(
            "{} replicas besides the leader",
            cluster.replicas.len()
        ));
    }
    cluster.replicas.iter().find_map(|r| {
        let lag = r.lag.unwrap_or_default();
        if r.offline {
            Some(format!("replica {} offline", r.name))
        } else if !r.current && lag > CAUGHT_UP_LAG {
            Some(format!("replica {} {lag} behind", r.name))
        } else {
            None
        }
    })
}

async fn stream_names(js: &jetstream::Context) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut list = js.stream_names();
    while let Some(name) = list.next().await {
        names.push(name.map_err(|e| format!("listing streams: {e}"))?);
    }
    names.sort();
    Ok(names)
}

/// Asks the leader of a random stream, or of a random consumer of it, to step down; says
/// what happened.
async fn step_down(
    client: &async_nats::Client,
    js: &jetstream::Context,
    system: &System,
    rng: &mut rand::rngs::StdRng,
) -> String {
    let names = match stream_names(js).await {
        Ok(names) if !names.is_empty() => names,
        Ok(_) => return "no stream to step down".to_owned(),
        Err(e) => return format!("no step-down: {e}"),
    };
    let stream = names[rng.random_range(0..names.len())].clone();
    let mut consumers = Vec::new();
    if let Ok(s) = js.get_stream(&stream).await {
        let mut list = s.consumer_names();
        while let Some(Ok(name)) = list.next().await {
            consumers.push(name);
        }
        consumers.sort();
    }
    let (what, subject, is_stream) = if consumers.is_empty() || rng.random_bool(0.5) {
        (
            format!("stream {stream}"),
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
            true,
        )
    } else {
        let consumer = &consumers[rng.random_range(0..consumers.len())];
        (
            format!("consumer {stream}/{consumer}"),
            format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"),
            false,
        )
    };
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, client.request(subject, "".into())).await;
    let outcome = match answer {
        Ok(Ok(reply)) => match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
            Ok(v) if v["success"] == serde_json::Value::Bool(true) => Ok(()),
            Ok(v) => Err(v["error"]["description"]
                .as_str()
                .unwrap_or("refused")
                .to_owned()),
            Err(e) => Err(format!("unreadable answer: {e}")),
        },
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".to_owned()),
    };
    system.with_nats(|nats| {
        if let Nats::Cluster { report, .. } = nats {
            match (&outcome, is_stream) {
                (Ok(()), true) => report.stream_step_downs += 1,
                (Ok(()), false) => report.consumer_step_downs += 1,
                (Err(_), _) => report.step_downs_refused += 1,
            }
        }
    });
    match outcome {
        Ok(()) => format!("leader of {what} stepped down"),
        Err(e) => format!("step-down of {what} refused: {e}"),
    }
}

/// The journal history (every entry the last record keeps, and its effects) of the first
/// sagas each failed check names, to tell what happened to them after the run is gone.
pub(crate) async fn histories(
    store: &jetsaga_orchestrator::store::Store,
    checks: &[Check],
) -> String {
    const SHOWN: usize = 5;
    // The first few of each failed check: one check's many violations hide no other's.
    let mut ids: Vec<&str> = Vec::new();
    for check in checks {
        for id in check
            .violations
            .iter()
            .filter_map(|v| v.split(':').next())
            .take(SHOWN)
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    let mut out = String::new();
    for id in ids {
        out.push_str(&format!("saga {id}:\n"));
        match store.load(id, true).await {
            Ok(Some(stored)) => {
                let record = &stored.record;
                for entry in record.earlier.iter().chain([&record.entry]) {
                    let line = serde_json::to_string(entry).unwrap_or_default();
                    out.push_str(&format!("  {line}\n"));
                }
                out.push_str(&format!(
                    "  seq {}, effects {:?}, timer {:?}\n",
                    stored.seq, record.effects, record.timer_at
                ));
            }
            Ok(None) => out.push_str("  no journal\n"),
            Err(e) => out.push_str(&format!("  unreadable: {e}\n")),
        }
    }
    out
}
