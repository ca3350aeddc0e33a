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
//! - nats-server killed (SIGKILL), kept down for 3 s and restarted on the same store;
//! - the journal stream unavailable for a while (its subjects moved aside, so every append
//!   finds no stream; `--journal-outage D`): short profile 8 s, long profile 30 s and 60 s;
//!   orchestrators are not killed meanwhile (a new one refuses the moved stream);
//! - SIGSTOP of the payment participant past the 10 s step timeout (`--payment-stop D`), so
//!   its successes come after the timeouts: short profile once for 14 s, long profile three
//!   times for 35 s (past all three attempts, so some of those sagas compensate);
//! - reply copies (`--duplicates F`): a share of the participants' replies published again
//!   1–4 more times, some past the 2-minute duplicate window ([`traffic`]).
//!
//! The `overload` profile injects none of these: it measures the saturation with a closed-loop
//! run, then offers five times that rate for 30 s (`--max-in-flight N` sets the orchestrators'
//! `engine.max-in-flight`).
//!
//! Then it waits for the sagas to finish and checks the real state ([`checks`]): every saga
//! terminal, in the journal and in each orchestrator's listing; no declined payment completed;
//! the payment ledger; the inventory's holds, sales and stock; one email and one terminal event
//! per saga; each step's success after its timeout compensated exactly once, and one refund per
//! compensated saga whose charge was taken; every acknowledged start in the journal; the
//! orchestrators' peak RSS under 1 GiB. The [`Summary`] says what was done, how often, how
//! many sagas ran, how fast a killed participant's commands in flight were answered after its
//! restart (hole 12), and each check's result. Every process it starts is killed by its handle
//! at the end, also on an error or Ctrl-C.
//!
//! With `--cluster` ([`cluster`]) the system runs on a 3-node NATS cluster (R3 streams,
//! `sync_interval: always`) and the faults are node kills every ~10 s and leader step-downs
//! instead of the service kills and stops (journal outages and reply copies only when asked
//! for).
//!
//! Modules: [`system`] (the processes), [`checks`] (the final checks), [`cluster`] (cluster
//! mode), [`traffic`] (the commands and replies the runner sees, and the copies it adds).

pub mod checks;
pub mod cluster;
pub mod system;
pub mod traffic;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// The overload profile offers this many times the measured saturation.
const OVERLOAD_FACTOR: f64 = 5.0;
/// The overload profile's guess of the rate, for the catalogue (before it is measured).
const OVERLOAD_GUESS: f64 = 40.0;
/// Sagas of the closed-loop run that measures the saturation, and how many at once.
const CALIBRATION: (u64, u64) = (600, 200);
/// The orchestrators' memory bound the checks hold them to.
const MAX_RSS_MIB: u64 = 1024;

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
    /// No faults: the system's saturation measured first (a closed-loop run), then five times
    /// that rate offered for 30 s.
    Overload,
}

/// The command line of `jetsaga chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// `short` (60 s of load, 2,400 sagas), `long` (420 s, 10,500 sagas) or `overload` (5×
    /// the measured saturation for 30 s, no faults).
    #[arg(long, value_enum, default_value = "short")]
    pub profile: Profile,
    /// Starts per second (overrides the profile's; with `overload`, skips measuring the
    /// saturation).
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
    /// Make the journal stream unavailable this long, once, a third into the load (its
    /// subjects moved aside, so every append finds no stream), instead of the profile's
    /// outages; `0` for none.
    #[arg(long, value_name = "D", value_parser = jetsaga_bench::parse_duration)]
    pub journal_outage: Option<Duration>,
    /// Share of the participants' replies the runner publishes again 1–4 more times (some past
    /// the 2-minute duplicate window when the load lasts long enough), instead of the
    /// profile's; `0` for none.
    #[arg(long, value_name = "F", value_parser = jetsaga_bench::share)]
    pub duplicates: Option<f64>,
    /// SIGSTOP the payment participant this long (past the 10 s step timeout: late successes)
    /// at each of the profile's payment stops; `0` for none.
    #[arg(long, value_name = "D", value_parser = jetsaga_bench::parse_duration)]
    pub payment_stop: Option<Duration>,
    /// The orchestrators' `engine.max-in-flight`.
    #[arg(long, value_name = "N", default_value_t = system::ORCHESTRATOR_MAX_IN_FLIGHT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
}

/// What a run does, from [`Args`] and the directory of the binaries.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Profile name (for the summary).
    pub profile: Profile,
    /// Starts per second (with `calibrate`: until the saturation is measured).
    pub rate: f64,
    /// Measure the saturation first and offer this many times it (the overload profile).
    pub calibrate: Option<f64>,
    /// How long load and faults run.
    pub duration: Duration,
    /// Seed of the schedule.
    pub seed: u64,
    /// Whether services and nats-server are killed and stopped (not in the overload profile).
    pub faults: bool,
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
    /// Journal outages: when (from the start of the load) and how long.
    pub journal_outages: Vec<(Duration, Duration)>,
    /// When the payment participant is stopped (SIGSTOP).
    pub payment_stops: Vec<Duration>,
    /// How long it stays stopped.
    pub payment_stop_for: Duration,
    /// Share of the replies published again.
    pub duplicates: f64,
    /// The orchestrators' `engine.max-in-flight`.
    pub max_in_flight: u32,
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
        let s = Duration::from_secs;
        let (rate, duration) = match self.profile {
            Profile::Short => (40.0, s(60)),
            Profile::Long => (25.0, s(420)),
            Profile::Overload => (OVERLOAD_GUESS, s(30)),
        };
        let duration = self.duration.unwrap_or(duration);
        // The profiles' faults beyond kills, stops and nats-server restarts (a cluster run has
        // its own faults; `--journal-outage` and `--duplicates` still apply to it).
        let (outages, payment_stops, payment_stop_for, duplicates) =
            match (self.cluster, self.profile) {
                (false, Profile::Short) => (vec![(s(50), s(8))], vec![s(24)], s(14), 0.1),
                (false, Profile::Long) => (
                    vec![(s(100), s(30)), (s(250), s(60))],
                    vec![s(50), s(170), s(350)],
                    s(35),
                    0.2,
                ),
                (true, _) | (false, Profile::Overload) => {
                    (Vec::new(), Vec::new(), Duration::ZERO, 0.0)
                }
            };
        let journal_outages = match self.journal_outage {
            Some(d) if d.is_zero() => Vec::new(),
            Some(d) => vec![(duration / 3, d)],
            None => outages,
        };
        let payment_stop_for = self.payment_stop.unwrap_or(payment_stop_for);
        let overload = self.profile == Profile::Overload;
        Plan {
            profile: self.profile,
            rate: self.rate.unwrap_or(rate),
            calibrate: (overload && self.rate.is_none()).then_some(OVERLOAD_FACTOR),
            duration,
            seed: self.seed.unwrap_or_else(rand::random),
            faults: !overload,
            orchestrator_kills: (s(1), s(3)),
            participant_kills: (s(1), s(3)),
            stops: (s(10), s(25)),
            stop_for: ORCHESTRATOR_ACK_WAIT + s(3),
            nats_restarts: (s(20), s(25)),
            nats_down_for: s(3),
            journal_outages,
            payment_stops: if payment_stop_for.is_zero() {
                Vec::new()
            } else {
                payment_stops
            },
            payment_stop_for,
            duplicates: self.duplicates.unwrap_or(duplicates),
            max_in_flight: self.max_in_flight,
            settle: if overload { s(600) } else { s(180) },
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
    /// How long each journal outage lasted (subjects moved aside to back), in seconds.
    pub journal_outages_s: Vec<f64>,
    /// How long each SIGSTOP of the payment participant lasted, in seconds.
    pub payment_stops_s: Vec<f64>,
    /// The reply copies.
    pub copies: traffic::Copies,
    /// How fast a killed participant's commands in flight were answered after its restart.
    pub recovery: traffic::Recovery,
    /// The overload profile: the closed-loop run that measured the saturation.
    pub calibration: Option<jetsaga_bench::Report>,
    /// The most starts waiting in the starts stream for an orchestrator at once (sampled
    /// every second).
    pub max_starts_queued: u64,
    /// Each orchestrator's largest peak resident set, in MiB.
    pub peak_rss_mib: Vec<(String, f64)>,
    /// The orchestrators' `engine.max-in-flight`.
    pub max_in_flight: u32,
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
        let seconds = |all: &[f64]| -> String {
            let all: Vec<String> = all.iter().map(|s| format!("{s:.1} s")).collect();
            all.join(", ")
        };
        if !self.nats_outages_s.is_empty() {
            let outages = seconds(&self.nats_outages_s);
            out.push_str(&format!("  nats-server down for {outages}\n"));
        }
        if !self.journal_outages_s.is_empty() {
            let outages = seconds(&self.journal_outages_s);
            out.push_str(&format!("  journal stream unavailable for {outages}\n"));
        }
        if !self.payment_stops_s.is_empty() {
            let stops = seconds(&self.payment_stops_s);
            out.push_str(&format!("  payment stopped (SIGSTOP) for {stops}\n"));
        }
        if self.copies.share > 0.0 {
            out.push_str(&self.copies.render());
            out.push('\n');
        }
        if self.recovery.kills > 0 {
            out.push_str(&self.recovery.render());
            out.push('\n');
        }
        if let Some(c) = &self.calibration {
            out.push_str(&format!(
                "  saturation: {:.1} sagas/s in a closed-loop run of {} sagas; offered {:.1}/s\n",
                c.throughput_per_s, c.sagas, self.bench.offered_per_s
            ));
        }
        let peaks: Vec<String> = self
            .peak_rss_mib
            .iter()
            .map(|(name, mib)| format!("{name} {mib:.0} MiB"))
            .collect();
        out.push_str(&format!(
            "  engine.max-in-flight {}; at most {} starts queued; peak RSS {}\n",
            self.max_in_flight,
            self.max_starts_queued,
            peaks.join(", ")
        ));
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
    let mut sagas_planned = (plan.rate * plan.duration.as_secs_f64()).round() as u64;
    if let Some(factor) = plan.calibrate {
        sagas_planned = (sagas_planned as f64 * factor) as u64 + CALIBRATION.0;
    }
    let catalogue = catalogue(sagas_planned);
    let system = System::start(&Layout {
        bin_dir: plan.bin_dir.clone(),
        log_dir: log_dir.clone(),
        catalogue: catalogue.clone(),
        cluster: plan.cluster,
        max_in_flight: plan.max_in_flight,
    })?;
    let guard = ShutDown(system.clone());
    eprintln!(
        "chaos: nats-server at {}, orchestrators at {}, seed {}",
        system.nats_url(),
        system.orchestrator_http().join(" and "),
        plan.seed
    );
    let client = cluster::connect(system.nats_url()).await?;
    let js = async_nats::jetstream::new(client.clone());
    wait_ready(&system, &js).await?;
    let queued = Arc::new(AtomicU64::new(0));
    let monitor = tokio::spawn(monitor(system.clone(), js.clone(), queued.clone()));
    let _monitor = AbortOnDrop(monitor);

    let bench_options = |load| jetsaga_bench::Options {
        nats_url: system.nats_url().to_owned(),
        load,
        decline_share: DECLINE_SHARE,
        items: ITEMS,
        timeout: Duration::from_secs(120),
        saga_type: SAGA_TYPE.to_owned(),
        ..Default::default()
    };
    let mut plan = plan.clone();
    let calibration = match plan.calibrate {
        Some(factor) => {
            let (sagas, concurrency) = CALIBRATION;
            eprintln!("chaos: measuring the saturation ({sagas} sagas, {concurrency} at once)");
            let report = jetsaga_bench::run(bench_options(jetsaga_bench::Load::Closed {
                sagas,
                concurrency,
            }))
            .await
            .map_err(|e| Error::Io(format!("the saturation run failed: {e}")))?;
            plan.rate = (report.throughput_per_s * factor).max(1.0);
            eprintln!(
                "chaos: saturation {:.1} sagas/s; offering {:.1}/s for {:?}",
                report.throughput_per_s, plan.rate, plan.duration
            );
            Some(report)
        }
        None => None,
    };
    let plan = plan;

    let load_ends = tokio::time::Instant::now() + plan.duration;
    let traffic =
        traffic::Traffic::start(client.clone(), plan.duplicates, plan.seed, load_ends).await?;
    let traffic = Arc::new(traffic);
    let stops = Arc::new(std::sync::Mutex::new(Vec::new()));
    let journal_down = Arc::new(AtomicBool::new(false));
    let faults = {
        let (system, plan) = (system.clone(), plan.clone());
        let (traffic, stops, journal_down) = (traffic.clone(), stops.clone(), journal_down.clone());
        tokio::spawn(async move {
            if plan.cluster {
                cluster::inject(system, plan).await
            } else {
                inject(system, plan, &traffic, &stops, &journal_down).await
            }
        })
    };
    // Not aborted with the fault schedule: an outage under way is always ended.
    let outages = tokio::spawn(journal_outages(js.clone(), plan.clone(), journal_down));
    let bench = jetsaga_bench::run(bench_options(jetsaga_bench::Load::Open {
        rate: plan.rate,
        duration: plan.duration,
    }))
    .await;
    let journal_outages_s = outages
        .await
        .map_err(|e| Error::Io(format!("the journal outages: {e}")))??;
    // The schedule has ended with the load (unless the load generator gave up early).
    faults.abort();
    if let Ok(Err(e)) = faults.await {
        return Err(Error::Io(format!("the fault schedule failed: {e}")));
    }
    let payment_stops_s = stops
        .lock()
        .map(|s| s.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    for name in ["orchestrator-a", "orchestrator-b", "payment"] {
        system.resume(name)?;
    }
    let bench = bench.map_err(|e| Error::Io(format!("the load generator failed: {e}")))?;
    // Faults stop with the load: a process that exits on its own from now on (e.g. one that
    // started while nats-server was down) is started again (and counted) until the checks
    // are done, so the system can finish.
    let _keep_up = AbortOnDrop(tokio::spawn(keep_up(system.clone())));
    eprintln!("chaos: load done:\n{}", bench.table());

    let mut sagas: Vec<Saga> = Vec::new();
    for report in calibration.iter().chain([&bench]) {
        sagas.extend(
            (0..report.sagas)
                .map(|i| Saga::of_bench(SAGA_TYPE, &report.key_prefix, i, ITEMS, DECLINE_SHARE)),
        );
    }
    let store = jetsaga_orchestrator::store::Store::new(js.clone())
        .await
        .map_err(|e| Error::Io(format!("the journal: {e}")))?;
    let phases = checks::settle(&store, &sagas, plan.settle).await?;
    // Copies still due go out before the checks (late ones come within the load).
    traffic.copies_sent(Duration::from_secs(30)).await;
    // Commands and events still in flight (a compensation's release, an email) finish
    // within the participants' redelivery time once every saga is terminal.
    wait_quiet(&js).await?;
    // The listings are read from both orchestrators: one restarted late must be ready.
    wait_ready(&system, &js).await?;
    let mut checks = checks::run(
        &js,
        system.orchestrator_http(),
        &sagas,
        &phases,
        &catalogue,
        SAGA_TYPE,
    )
    .await?;
    checks
        .push(checks::late_successes(&js, &store, &sagas, &phases, &traffic.answered_ok()).await?);
    checks.push(cluster::acknowledged_starts(&store, &sagas, &phases).await?);
    system.sample_memory();
    let peaks = system.peak_rss_kib();
    checks.push(checks::memory(&peaks, MAX_RSS_MIB));
    let (processes, outages) = system.tallies();
    let (recovery, copies) = traffic.report();
    let summary = Summary {
        profile: plan.profile,
        seed: plan.seed,
        rate: plan.rate,
        duration_s: plan.duration.as_secs_f64(),
        bench,
        processes,
        nats_outages_s: outages.iter().map(Duration::as_secs_f64).collect(),
        journal_outages_s,
        payment_stops_s,
        copies,
        recovery,
        calibration,
        max_starts_queued: queued.load(Ordering::Relaxed),
        peak_rss_mib: peaks
            .iter()
            .map(|(name, kib)| (name.clone(), *kib as f64 / 1024.0))
            .collect(),
        max_in_flight: plan.max_in_flight,
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

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Until aborted: starts again every process that exited on its own.
async fn keep_up(system: System) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tick.tick().await;
        let s = system.clone();
        match blocking(move || s.restart_exited()).await {
            Ok(names) => names
                .iter()
                .for_each(|name| eprintln!("chaos: {name} had exited; restarted")),
            Err(e) => eprintln!("chaos: restarting exited processes: {e}"),
        }
    }
}

/// Until aborted: notes the orchestrators' memory every [`WATCH_INTERVAL`] and the starts
/// waiting for an orchestrator (the starts consumer's pending and unacknowledged) every
/// second, keeping the most in `queued`.
async fn monitor(system: System, js: async_nats::jetstream::Context, queued: Arc<AtomicU64>) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    let mut odd = false;
    loop {
        tick.tick().await;
        system.sample_memory();
        odd = !odd;
        if odd {
            continue;
        }
        let info = async {
            let stream = js
                .get_stream(jetsaga_sagas::streams::STARTS.name)
                .await
                .ok()?;
            let mut consumer = stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                    jetsaga_orchestrator::provision::STARTS_CONSUMER,
                )
                .await
                .ok()?;
            consumer.info().await.ok().cloned()
        };
        if let Ok(Some(info)) = tokio::time::timeout(Duration::from_secs(2), info).await {
            let waiting = info.num_pending + info.num_ack_pending as u64;
            queued.fetch_max(waiting, Ordering::Relaxed);
        }
    }
}

/// The plan's journal outages: at each one's time (from now, the start of the load) the
/// journal stream's subjects are moved aside (`moved.<subject>`), so appends find no stream,
/// and moved back after its length; `down` is set meanwhile. Returns how long each lasted, in
/// seconds. An outage whose time is past the load is skipped; one under way is always ended.
async fn journal_outages(
    js: async_nats::jetstream::Context,
    plan: Plan,
    down: Arc<AtomicBool>,
) -> Result<Vec<f64>, Error> {
    let begin = tokio::time::Instant::now();
    let log = |what: String| eprintln!("chaos: {:>6.1} s  {what}", begin.elapsed().as_secs_f64());
    let mut lasted = Vec::new();
    for (at, lasts) in plan.journal_outages.iter().copied() {
        if at >= plan.duration {
            break;
        }
        tokio::time::sleep_until(begin + at).await;
        // nats-server may be down for a restart right now: keep asking.
        if let Err(e) = move_journal(&js, true, Duration::from_secs(30)).await {
            log(format!("journal outage skipped: {e}"));
            continue;
        }
        let moved = tokio::time::Instant::now();
        down.store(true, Ordering::Relaxed);
        log(format!(
            "journal stream unavailable (subjects moved aside) for {lasts:?}"
        ));
        tokio::time::sleep(lasts).await;
        move_journal(&js, false, Duration::from_secs(300)).await?;
        down.store(false, Ordering::Relaxed);
        lasted.push(moved.elapsed().as_secs_f64());
        log(format!("journal stream back after {:.1?}", moved.elapsed()));
    }
    Ok(lasted)
}

/// Points the journal stream at `moved.<subject>` (`aside`) or back at its own subjects,
/// retrying for up to `within`.
async fn move_journal(
    js: &async_nats::jetstream::Context,
    aside: bool,
    within: Duration,
) -> Result<(), Error> {
    let give_up = Instant::now() + within;
    loop {
        let attempt =
            jetsaga_testkit::move_subjects(js, jetsaga_sagas::streams::JOURNAL.name, aside);
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= give_up => {
                return Err(Error::Io(format!(
                    "moving the journal stream's subjects {}: {e}",
                    if aside { "aside" } else { "back" }
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
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
/// process and only restarts processes that exit on their own, until aborted. Each payment
/// stop's length goes to `stops`; each participant restart is told to `traffic` (the recovery
/// probe). While `journal_down`, orchestrators are not killed: a new one would refuse to start
/// on a journal stream whose subjects are not its own, and its restarts would be the outage's
/// only effect.
async fn inject(
    system: System,
    plan: Plan,
    traffic: &traffic::Traffic,
    stops: &std::sync::Mutex<Vec<f64>>,
    journal_down: &AtomicBool,
) -> Result<(), Error> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let begin = tokio::time::Instant::now();
    let end = begin + plan.duration;
    let pick = |rng: &mut rand::rngs::StdRng, (lo, hi): (Duration, Duration)| {
        Duration::from_secs_f64(rng.random_range(lo.as_secs_f64()..=hi.as_secs_f64()))
    };
    let never = end + plan.duration;
    let (mut next_orchestrator, mut next_participant, mut next_stop, mut next_nats) = if plan.faults
    {
        (
            begin + pick(&mut rng, plan.orchestrator_kills),
            begin + pick(&mut rng, plan.participant_kills),
            begin + plan.stops.0,
            begin + plan.nats_restarts.0,
        )
    } else {
        (never, never, never, never)
    };
    let mut payment_stops = plan.payment_stops.iter().map(|at| begin + *at);
    let mut next_payment_stop = payment_stops.next().unwrap_or(never);
    let mut payment_resume: Option<tokio::time::Instant> = None;
    let mut resume_at: Option<(tokio::time::Instant, &str)> = None;
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let (mut orchestrator_turn, mut participant_turn) = (0_usize, 0_usize);
    let orchestrators = ["orchestrator-a", "orchestrator-b"];
    let log = |what: String| eprintln!("chaos: {:>6.1} s  {what}", begin.elapsed().as_secs_f64());
    let resume_payment = |stopped_at: tokio::time::Instant| -> Result<(), Error> {
        system.resume("payment")?;
        let lasted = stopped_at.elapsed().as_secs_f64();
        stops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(lasted);
        log(format!("SIGCONT payment after {lasted:.1} s"));
        Ok(())
    };
    let mut payment_stopped_at = begin;
    loop {
        let resume = resume_at.map_or(never, |(at, _)| at);
        let earliest = next_orchestrator
            .min(next_participant)
            .min(next_stop)
            .min(next_nats)
            .min(next_payment_stop)
            .min(payment_resume.unwrap_or(never))
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
            if payment_resume.is_some() {
                resume_payment(payment_stopped_at)?;
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
        if payment_resume.is_some_and(|at| at <= now) {
            resume_payment(payment_stopped_at)?;
            payment_resume = None;
        }
        if next_payment_stop <= now {
            if payment_resume.is_none() && system.stop("payment")? {
                traffic.disturbed(Some("payment"));
                log(format!("SIGSTOP payment for {:?}", plan.payment_stop_for));
                payment_stopped_at = now;
                payment_resume = Some(now + plan.payment_stop_for);
            }
            next_payment_stop = payment_stops.next().unwrap_or(never);
        }
        if next_orchestrator <= now {
            let name = orchestrators[orchestrator_turn % 2];
            orchestrator_turn += 1;
            if system.is_stopped(name) {
                log(format!("{name} is stopped; not killed this turn"));
            } else if journal_down.load(Ordering::Relaxed) {
                log(format!(
                    "the journal is unavailable; {name} not killed this turn"
                ));
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
            if system.is_stopped(name) {
                log(format!("{name} is stopped; not killed this turn"));
            } else {
                let s = system.clone();
                blocking(move || s.kill_and_restart(name)).await?;
                traffic.restarted(name);
                log(format!("kill -9 {name}, restarted"));
            }
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
            traffic.disturbed(None);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn plan(argv: &[&str]) -> Result<Plan, clap::Error> {
        let argv = std::iter::once("chaos").chain(argv.iter().copied());
        Cli::try_parse_from(argv).map(|cli| cli.args.plan(PathBuf::new()))
    }

    #[test]
    fn profiles_and_flags_make_the_plan() {
        let s = Duration::from_secs;
        let short = plan(&[]).unwrap();
        assert_eq!(short.profile, Profile::Short);
        assert_eq!(short.journal_outages, vec![(s(50), s(8))]);
        assert_eq!(
            (short.payment_stops.clone(), short.payment_stop_for),
            (vec![s(24)], s(14))
        );
        assert_eq!(short.duplicates, 0.1);
        assert!(short.faults && short.calibrate.is_none());
        assert_eq!(short.max_in_flight, system::ORCHESTRATOR_MAX_IN_FLIGHT);

        let long = plan(&["--profile", "long", "--journal-outage", "30s"]).unwrap();
        assert_eq!(
            long.journal_outages,
            vec![(s(140), s(30))],
            "a third into the load"
        );
        assert_eq!(long.payment_stop_for, s(35));
        let none = plan(&[
            "--journal-outage",
            "0",
            "--payment-stop",
            "0",
            "--duplicates",
            "0",
        ]);
        let none = none.unwrap();
        assert!(none.journal_outages.is_empty() && none.payment_stops.is_empty());
        assert_eq!(none.duplicates, 0.0);

        let overload = plan(&["--profile", "overload", "--max-in-flight", "64"]).unwrap();
        assert!(!overload.faults);
        assert_eq!(overload.calibrate, Some(OVERLOAD_FACTOR));
        assert_eq!((overload.max_in_flight, overload.settle), (64, s(600)));
        assert!(overload.journal_outages.is_empty() && overload.duplicates == 0.0);
        let cluster = plan(&["--cluster"]).unwrap();
        assert!(cluster.journal_outages.is_empty() && cluster.payment_stops.is_empty());
        assert_eq!(cluster.duplicates, 0.0);
        let given = plan(&["--profile", "overload", "--rate", "100"]).unwrap();
        assert_eq!((given.calibrate, given.rate), (None, 100.0));

        for bad in [
            &["--duplicates", "1.5"][..],
            &["--max-in-flight", "0"],
            &["--journal-outage", "soon"],
        ] {
            let e = plan(bad).unwrap_err().to_string();
            assert!(e.contains(bad[0]), "{bad:?}: {e}");
        }
    }
}
