//! `jetsaga chaos`: the chaos runner.
//!
//! Starts a whole system of its own on loopback — nats-server on a free port with a temporary
//! store, two orchestrators (active-active) and the reference participants — drives mixed order
//! sagas through it with the load generator (`jetsaga bench`, open loop; some payments declined,
//! one product running out of stock, so compensations happen), and injects faults on a
//! schedule while the load runs:
//!
//! - kill -9 of an orchestrator every 1–3 s, the two alternately, restarted at once;
//! - kill -9 of a participant every 1–3 s, inventory, payment and notification in turn,
//!   restarted at once;
//! - SIGSTOP of an orchestrator for longer than its `ack_wait`, then SIGCONT;
//! - nats-server killed (SIGKILL), kept down for 3 s and restarted on the same store.
//!
//! Then it waits for the sagas to finish and checks the real state ([`checks`]): every saga
//! terminal, in the journal and in each orchestrator's listing; no declined payment completed;
//! the payment ledger; the inventory's holds, sales and stock; one email and one terminal event
//! per saga. The [`Summary`] says what was killed, how often, how many sagas ran and each
//! check's result. Every process it starts is killed by its handle at the end, also on an error
//! or Ctrl-C.
//!
//! With `--cluster` ([`cluster`]) the system runs on a 3-node NATS cluster (R3 streams,
//! `sync_interval: always`) and the faults are node kills every ~10 s and leader step-downs
//! instead; a further check finds every acknowledged start in the journal.
//!
//! Modules: [`system`] (the processes), [`checks`] (the final checks), [`cluster`] (cluster
//! mode).

pub mod checks;
pub mod cluster;
pub mod system;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::checks::{Check, Saga};
use crate::system::{Layout, ORCHESTRATOR_ACK_WAIT, PARTICIPANTS, System, Tally};

/// The saga type the runner drives.
const SAGA_TYPE: &str = "order-creation";
/// Order lines per saga: two products each, so one product running out rejects a share.
const ITEMS: u32 = 2;
/// Share of payments declined.
const DECLINE_SHARE: f64 = 0.1;
/// Upper bound for the system to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often processes that exited on their own are looked for (and restarted).
pub(crate) const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Why a run could not be carried out (a broken invariant is a failed check instead).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A process, NATS, HTTP or a file failed.
    #[error("{0}")]
    Io(String),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
}

/// A named set of settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// About a minute of load (2,400 sagas at 40/s), for the test command.
    Short,
    /// Over 10,000 sagas (25/s for 420 s), for the README's figures.
    Long,
}

/// The command line of `jetsaga chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// `short` (60 s of load, 2,400 sagas) or `long` (420 s, 10,500 sagas).
    #[arg(long, value_enum, default_value = "short")]
    pub profile: Profile,
    /// Starts per second (overrides the profile's).
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// How long load and faults run, e.g. `60s` (overrides the profile's).
    #[arg(long, value_name = "D", value_parser = jetsaga_bench::parse_duration)]
    pub duration: Option<Duration>,
    /// Seed of the fault schedule's random intervals (printed; give it to replay a schedule).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Keep every process's log in this directory (otherwise a temporary one, kept only when
    /// the run fails).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Also print the summary as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
    /// Run on a 3-node NATS cluster (R3, `sync_interval: always`) and kill a node every
    /// ~10 s and step leaders down, instead of killing and stopping services.
    #[arg(long)]
    pub cluster: bool,
}

/// What a run does, from [`Args`] and the directory of the binaries.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Profile name (for the summary).
    pub profile: Profile,
    /// Starts per second.
    pub rate: f64,
    /// How long load and faults run.
    pub duration: Duration,
    /// Seed of the schedule.
    pub seed: u64,
    /// Kill an orchestrator every this much (uniform in the range).
    pub orchestrator_kills: (Duration, Duration),
    /// Kill a participant every this much.
    pub participant_kills: (Duration, Duration),
    /// First SIGSTOP, then one every this much.
    pub stops: (Duration, Duration),
    /// How long an orchestrator stays stopped.
    pub stop_for: Duration,
    /// First nats-server restart, then one every this much.
    pub nats_restarts: (Duration, Duration),
    /// How long nats-server stays down before it is started again.
    pub nats_down_for: Duration,
    /// How long to wait for the last sagas after the load.
    pub settle: Duration,
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// Where logs go, if kept.
    pub logs: Option<PathBuf>,
    /// Cluster mode: a 3-node cluster and its faults ([`cluster`]).
    pub cluster: bool,
}

impl Args {
    /// The plan these arguments describe; the binaries are looked for in `bin_dir`.
    pub fn plan(self, bin_dir: PathBuf) -> Plan {
        let (rate, duration) = match self.profile {
            Profile::Short => (40.0, Duration::from_secs(60)),
            Profile::Long => (25.0, Duration::from_secs(420)),
        };
        let s = Duration::from_secs;
        Plan {
            profile: self.profile,
            rate: self.rate.unwrap_or(rate),
            duration: self.duration.unwrap_or(duration),
            seed: self.seed.unwrap_or_else(rand::random),
            orchestrator_kills: (s(1), s(3)),
            participant_kills: (s(1), s(3)),
            stops: (s(10), s(25)),
            stop_for: ORCHESTRATOR_ACK_WAIT + s(3),
            nats_restarts: (s(20), s(25)),
            nats_down_for: s(3),
            settle: s(180),
            bin_dir,
            logs: self.logs,
            cluster: self.cluster,
        }
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The profile.
    pub profile: Profile,
    /// The schedule's seed.
    pub seed: u64,
    /// Starts per second offered.
    pub rate: f64,
    /// Seconds of load and faults.
    pub duration_s: f64,
    /// The load generator's report.
    pub bench: jetsaga_bench::Report,
    /// Per process: kills, stops, exits, restarts.
    pub processes: Vec<(String, Tally)>,
    /// How long each nats-server restart kept it down, in seconds.
    pub nats_outages_s: Vec<f64>,
    /// Cluster mode: node kills and leader step-downs.
    pub cluster: Option<cluster::Report>,
    /// Each check and what it found.
    pub checks: Vec<Check>,
    /// Start of the load to the end of the checks, in seconds.
    pub elapsed_s: f64,
}

impl Summary {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(Check::passed)
    }

    /// The human-readable summary.
    pub fn render(&self) -> String {
        let b = &self.bench;
        let mut out = format!(
            "chaos run{}, profile {:?}, seed {}: {} sagas at {:.0}/s for {:.0} s, {:.0} s in all\n\
             bench: {} completed, {} compensated ({} declined), {} failed, {} unfinished; \
             {} start retries; latency ms p50 {:.0} p99 {:.0} max {:.0}\nfaults:\n",
            if self.cluster.is_some() {
                " on a 3-node cluster"
            } else {
                ""
            },
            self.profile,
            self.seed,
            b.sagas,
            self.rate,
            self.duration_s,
            self.elapsed_s,
            b.completed,
            b.compensated,
            b.declined,
            b.failed,
            b.unfinished,
            b.start_retries,
            b.latency_ms.p50,
            b.latency_ms.p99,
            b.latency_ms.max,
        );
        for (name, t) in &self.processes {
            out.push_str(&format!(
                "  {name:<15} killed {:>3}, stopped {:>2}, exited on its own {:>2}, restarted {:>3}\n",
                t.killed, t.stopped, t.exited, t.restarted
            ));
        }
        if !self.nats_outages_s.is_empty() {
            let outages: Vec<String> = self
                .nats_outages_s
                .iter()
                .map(|s| format!("{s:.1} s"))
                .collect();
            out.push_str(&format!("  nats-server down for {}\n", outages.join(", ")));
        }
        if let Some(cluster) = &self.cluster {
            out.push_str(&cluster.render());
            out.push('\n');
        }
        out.push_str("checks:\n");
        for check in &self.checks {
            out.push_str(&format!("  {}\n", check.render()));
        }
        out.push_str(if self.passed() {
            "RESULT: every check passed"
        } else {
            "RESULT: VIOLATIONS FOUND"
        });
        out
    }
}

/// The inventory's catalogue for a run of `sagas`: four products that never run out and
/// `sku-5`, which two in five sagas order, with stock for about half of them.
fn catalogue(sagas: u64) -> BTreeMap<String, u64> {
    let mut c: BTreeMap<String, u64> = (1..=4).map(|i| (format!("sku-{i}"), 10_000_000)).collect();
    c.insert("sku-5".to_owned(), (sagas / 5).max(1));
    c
}

/// Carries out the plan. The returned summary says whether the checks passed.
///
/// # Errors
///
/// The system does not start, the load cannot be offered, the state cannot be read, or Ctrl-C.
pub async fn run(plan: Plan) -> Result<Summary, Error> {
    let temp = tempfile::Builder::new()
        .prefix("jetsaga-chaos-")
        .tempdir()
        .map_err(|e| Error::Io(format!("temporary directory: {e}")))?;
    let log_dir = plan.logs.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| Error::Io(format!("{}: {e}", log_dir.display())))?;
    let result = tokio::select! {
        result = run_in(&plan, log_dir.clone()) => result,
        _ = tokio::signal::ctrl_c() => Err(Error::Interrupted),
    };
    let keep = plan.logs.is_some() || !result.as_ref().is_ok_and(Summary::passed);
    if keep {
        let kept = if plan.logs.is_some() {
            log_dir
        } else {
            temp.keep()
        };
        eprintln!("chaos: logs in {}", kept.display());
    }
    result
}

/// Kills every process of the system when dropped, however the run ends.
struct ShutDown(System);

impl Drop for ShutDown {
    fn drop(&mut self) {
        self.0.shut_down();
    }
}

async fn run_in(plan: &Plan, log_dir: PathBuf) -> Result<Summary, Error> {
    let began = Instant::now();
    let sagas_planned = (plan.rate * plan.duration.as_secs_f64()).round() as u64;
    let catalogue = catalogue(sagas_planned);
    let system = System::start(&Layout {
        bin_dir: plan.bin_dir.clone(),
        log_dir: log_dir.clone(),
        catalogue: catalogue.clone(),
        cluster: plan.cluster,
    })?;
    let guard = ShutDown(system.clone());
    eprintln!(
        "chaos: nats-server at {}, orchestrators at {}, seed {}",
        system.nats_url(),
        system.orchestrator_http().join(" and "),
        plan.seed
    );
    let client = cluster::connect(system.nats_url()).await?;
    let js = async_nats::jetstream::new(client);
    wait_ready(&system, &js).await?;

    let faults = {
        let (system, plan) = (system.clone(), plan.clone());
        tokio::spawn(async move {
            if plan.cluster {
                cluster::inject(system, plan).await
            } else {
                inject(system, plan).await
            }
        })
    };
    let bench = jetsaga_bench::run(jetsaga_bench::Options {
        nats_url: system.nats_url().to_owned(),
        load: jetsaga_bench::Load::Open {
            rate: plan.rate,
            duration: plan.duration,
        },
        decline_share: DECLINE_SHARE,
        items: ITEMS,
        timeout: Duration::from_secs(120),
        saga_type: SAGA_TYPE.to_owned(),
        ..Default::default()
    })
    .await;
    // The schedule has ended with the load (unless the load generator gave up early).
    faults.abort();
    if let Ok(Err(e)) = faults.await {
        return Err(Error::Io(format!("the fault schedule failed: {e}")));
    }
    for name in ["orchestrator-a", "orchestrator-b"] {
        system.resume(name)?;
    }
    let bench = bench.map_err(|e| Error::Io(format!("the load generator failed: {e}")))?;
    // Faults stop with the load: a process that exited on its own since is started again
    // (and counted) so the system can finish.
    system.restart_exited()?;
    eprintln!("chaos: load done:\n{}", bench.table());

    let sagas: Vec<Saga> = (0..bench.sagas)
        .map(|i| Saga::of_bench(SAGA_TYPE, &bench.key_prefix, i, ITEMS, DECLINE_SHARE))
        .collect();
    let store = jetsaga_orchestrator::store::Store::new(js.clone())
        .await
        .map_err(|e| Error::Io(format!("the journal: {e}")))?;
    let phases = checks::settle(&store, &sagas, plan.settle).await?;
    // Commands and events still in flight (a compensation's release, an email) finish
    // within the participants' redelivery time once every saga is terminal.
    wait_quiet(&js).await?;
    let mut checks = checks::run(
        &js,
        system.orchestrator_http(),
        &sagas,
        &phases,
        &catalogue,
        SAGA_TYPE,
    )
    .await?;
    checks.push(cluster::acknowledged_starts(&store, &sagas, &phases).await?);
    let (processes, outages) = system.tallies();
    let summary = Summary {
        profile: plan.profile,
        seed: plan.seed,
        rate: plan.rate,
        duration_s: plan.duration.as_secs_f64(),
        bench,
        processes,
        nats_outages_s: outages.iter().map(Duration::as_secs_f64).collect(),
        cluster: cluster::report(&system, &js).await,
        checks,
        elapsed_s: began.elapsed().as_secs_f64(),
    };
    if !summary.passed() {
        let path = system::log_path(&log_dir, "nats-server");
        let _ = std::fs::write(path, system.nats_log());
        let path = system::log_path(&log_dir, "histories");
        let _ = std::fs::write(path, cluster::histories(&store, &summary.checks).await);
    }
    drop(guard);
    Ok(summary)
}

/// Waits until both orchestrators are ready and every participant has its consumer and the
/// inventory its products.
async fn wait_ready(system: &System, js: &async_nats::jetstream::Context) -> Result<(), Error> {
    let http = reqwest::Client::new();
    let give_up = Instant::now() + READY_TIMEOUT;
    let mut waiting_for = String::new();
    while Instant::now() < give_up {
        system.restart_exited()?;
        waiting_for = match what_is_not_ready(system, js, &http).await {
            None => return Ok(()),
            Some(what) => what,
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(Error::Io(format!(
        "the system did not come up within {READY_TIMEOUT:?}: {waiting_for}"
    )))
}

async fn what_is_not_ready(
    system: &System,
    js: &async_nats::jetstream::Context,
    http: &reqwest::Client,
) -> Option<String> {
    for addr in system.orchestrator_http() {
        let ready = http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !ready {
            return Some(format!("orchestrator {addr} /readyz"));
        }
    }
    for (stream, consumer) in [
        (
            jetsaga_sagas::streams::COMMANDS.name,
            "participant-inventory",
        ),
        (jetsaga_sagas::streams::COMMANDS.name, "participant-payment"),
        (jetsaga_sagas::streams::EVENTS.name, "notification"),
    ] {
        let exists = match js.get_stream(stream).await {
            Ok(s) => s
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(consumer)
                .await
                .is_ok(),
            Err(_) => false,
        };
        if !exists {
            return Some(format!("consumer {consumer}"));
        }
    }
    let seeded = match js
        .get_key_value(jetsaga_reference::inventory::Settings::default().bucket)
        .await
    {
        Ok(kv) => kv.get("product.sku-5").await.ok().flatten().is_some(),
        Err(_) => false,
    };
    (!seeded).then(|| "the inventory's catalogue".to_owned())
}

/// Waits until no participant consumer has a command or event pending or unacknowledged.
async fn wait_quiet(js: &async_nats::jetstream::Context) -> Result<(), Error> {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let mut busy = Vec::new();
        for (stream, consumer) in [
            (
                jetsaga_sagas::streams::COMMANDS.name,
                "participant-inventory",
            ),
            (jetsaga_sagas::streams::COMMANDS.name, "participant-payment"),
            (jetsaga_sagas::streams::EVENTS.name, "notification"),
        ] {
            let info = async {
                let stream = js.get_stream(stream).await.ok()?;
                let mut c = stream
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>(consumer)
                    .await
                    .ok()?;
                c.info().await.ok().cloned()
            }
            .await;
            match info {
                Some(i) if i.num_pending == 0 && i.num_ack_pending == 0 => {}
                Some(i) => busy.push(format!(
                    "{consumer}: {} pending, {} unacknowledged",
                    i.num_pending, i.num_ack_pending
                )),
                None => busy.push(format!("{consumer}: unreadable")),
            }
        }
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= give_up {
            // Not an error in itself: the checks will say what the state is.
            eprintln!("chaos: participants still busy: {}", busy.join("; "));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The fault schedule; runs for the plan's duration (the load's), then continues a stopped
/// orchestrator and only restarts processes that exit on their own, until aborted.
async fn inject(system: System, plan: Plan) -> Result<(), Error> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let begin = tokio::time::Instant::now();
    let end = begin + plan.duration;
    let pick = |rng: &mut rand::rngs::StdRng, (lo, hi): (Duration, Duration)| {
        Duration::from_secs_f64(rng.random_range(lo.as_secs_f64()..=hi.as_secs_f64()))
    };
    let mut next_orchestrator = begin + pick(&mut rng, plan.orchestrator_kills);
    let mut next_participant = begin + pick(&mut rng, plan.participant_kills);
    let mut next_stop = begin + plan.stops.0;
    let mut next_nats = begin + plan.nats_restarts.0;
    let mut resume_at: Option<(tokio::time::Instant, &str)> = None;
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let (mut orchestrator_turn, mut participant_turn) = (0_usize, 0_usize);
    let orchestrators = ["orchestrator-a", "orchestrator-b"];
    let log = |what: String| eprintln!("chaos: {:>6.1} s  {what}", begin.elapsed().as_secs_f64());
    loop {
        let resume = resume_at.map_or(next_stop + plan.duration, |(at, _)| at);
        let earliest = next_orchestrator
            .min(next_participant)
            .min(next_stop)
            .min(next_nats)
            .min(resume)
            .min(end);
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
            if let Some((_, name)) = resume_at {
                system.resume(name)?;
                log(format!("SIGCONT {name}"));
            }
            log("end of the fault schedule".to_owned());
            // Until aborted, still restart whatever exits on its own.
            loop {
                watch.tick().await;
                let s = system.clone();
                for name in blocking(move || s.restart_exited()).await? {
                    log(format!("{name} had exited; restarted"));
                }
            }
        }
        if let Some((_, name)) = resume_at.filter(|(at, _)| *at <= now) {
            system.resume(name)?;
            log(format!("SIGCONT {name}"));
            resume_at = None;
        }
        if next_orchestrator <= now {
            let name = orchestrators[orchestrator_turn % 2];
            orchestrator_turn += 1;
            if system.is_stopped(name) {
                log(format!("{name} is stopped; not killed this turn"));
            } else {
                let s = system.clone();
                blocking(move || s.kill_and_restart(name)).await?;
                log(format!("kill -9 {name}, restarted"));
            }
            next_orchestrator = now + pick(&mut rng, plan.orchestrator_kills);
        }
        if next_participant <= now {
            let name = PARTICIPANTS[participant_turn % PARTICIPANTS.len()];
            participant_turn += 1;
            let s = system.clone();
            blocking(move || s.kill_and_restart(name)).await?;
            log(format!("kill -9 {name}, restarted"));
            next_participant = now + pick(&mut rng, plan.participant_kills);
        }
        if next_stop <= now {
            if resume_at.is_none() {
                let name = orchestrators[rng.random_range(0..2)];
                if system.stop(name)? {
                    log(format!("SIGSTOP {name} for {:?}", plan.stop_for));
                    resume_at = Some((now + plan.stop_for, name));
                }
            }
            next_stop = now + plan.stops.1;
        }
        if next_nats <= now {
            log(format!(
                "kill -9 nats-server, down for {:?}",
                plan.nats_down_for
            ));
            let (s, down_for) = (system.clone(), plan.nats_down_for);
            let outage = blocking(move || s.restart_nats(down_for)).await?;
            log(format!("nats-server back after {outage:.1?}"));
            next_nats = tokio::time::Instant::now() + plan.nats_restarts.1;
        }
    }
}

/// Runs a blocking system operation (spawning, waiting for nats-server) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Io(format!("fault task: {e}")))?
}
