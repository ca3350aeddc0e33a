//! The system under test: one nats-server, two orchestrators and the three reference
//! participants, each a child process this run owns, with what was done to each.
//!
//! Every process is held by a guard that kills it by its handle when dropped, so an error, a
//! panic or Ctrl-C anywhere leaves nothing behind. Signals other than SIGKILL (SIGSTOP,
//! SIGCONT) go through `kill` on the pid of a child that is still unreaped, so the pid cannot
//! belong to anyone else.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use jetsaga_testkit::ChildGuard;

use crate::Error;
use crate::cluster::Nats;

/// The participant binaries, by name.
pub(crate) const PARTICIPANTS: [&str; 3] = ["inventory", "payment", "notification"];

/// The orchestrators' `engine.ack-wait`: shorter than the default 30 s, so a SIGSTOP outlasts
/// it within a short run, and the inputs a killed orchestrator held come back soon (with 10 s
/// and a kill every 1-3 s, most inputs were stranded on a dead instance and the run crawled).
pub(crate) const ORCHESTRATOR_ACK_WAIT: Duration = Duration::from_secs(5);

/// The orchestrators' default `engine.max-in-flight` (`--max-in-flight` sets another): inputs wait in the driver no longer than the ack
/// wait even on a slow machine. With the default 4,096 and the short ack wait, queued inputs
/// are redelivered while they wait, each redelivery re-sends commands whose duplicate replies
/// are journaled, and an overloaded system does not recover (see the README, "Reliability").
pub const ORCHESTRATOR_MAX_IN_FLIGHT: u32 = 512;

/// What happened to one process during the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Killed with SIGKILL by the fault schedule.
    pub killed: u64,
    /// Stopped with SIGSTOP (and continued with SIGCONT later).
    pub stopped: u64,
    /// Exited on its own (not killed); each was restarted.
    pub exited: u64,
    /// Started again after a kill or an exit.
    pub restarted: u64,
}

/// One supervised child: how to start it, the running process, and its tally.
#[derive(Debug)]
struct Proc {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<ChildGuard>,
    stopped: bool,
    tally: Tally,
    /// The largest peak resident set (`VmHWM`) seen of any of its runs, in KiB.
    peak_rss_kib: u64,
}

impl Proc {
    fn spawn(&mut self) -> Result<(), Error> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::Io(format!("log file {}: {e}", self.log.display())))?;
        let err = log
            .try_clone()
            .map_err(|e| Error::Io(format!("log file {}: {e}", self.log.display())))?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        let child = ChildGuard::spawn(command)
            .map_err(|e| Error::Io(format!("starting {}: {e}", self.program.display())))?;
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    fn signal(&mut self, signal: &str) -> Result<bool, Error> {
        let Some(child) = self.child.as_mut() else {
            return Ok(false);
        };
        if child
            .try_wait()
            .map_err(|e| Error::Io(e.to_string()))?
            .is_some()
        {
            return Ok(false);
        }
        let status = Command::new("kill")
            .args(["-s", signal, &child.pid().to_string()])
            .status()
            .map_err(|e| Error::Io(format!("kill -s {signal}: {e}")))?;
        Ok(status.success())
    }
}

/// The whole system, shared by the fault schedule and the final checks.
#[derive(Debug, Clone)]
pub struct System {
    inner: Arc<Mutex<Inner>>,
    nats_url: String,
    orchestrator_http: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    procs: BTreeMap<String, Proc>,
    nats: Nats,
    nats_tally: Tally,
    nats_outages: Vec<Duration>,
    /// Set by [`System::shut_down`]: nothing is started again after it.
    shut_down: bool,
}

/// How to lay the system out.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Where `jetsaga`, `jetsaga-inventory`, … live.
    pub bin_dir: PathBuf,
    /// Where each process's log goes (`<name>.log`).
    pub log_dir: PathBuf,
    /// Units of each product the inventory starts with.
    pub catalogue: BTreeMap<String, u64>,
    /// A 3-node NATS cluster with R3 streams and buckets instead of one nats-server.
    pub cluster: bool,
    /// The orchestrators' `engine.max-in-flight`.
    pub max_in_flight: u32,
}

impl System {
    /// Starts nats-server (free loopback port, temporary store; or a 3-node cluster), the two orchestrators and the
    /// participants. Does not wait for them to be ready; see [`System::wait_ready`].
    ///
    /// # Errors
    ///
    /// A binary that is missing or does not start, or a nats-server that does not come up.
    pub fn start(layout: &Layout) -> Result<Self, Error> {
        let nats = Nats::start(layout.cluster)?;
        let nats_url = nats.url();
        let replicas = nats.replicas().to_string();
        let mut procs = BTreeMap::new();
        let mut orchestrator_http = Vec::new();
        let common = |extra: Vec<(String, String)>| {
            let mut env = vec![
                ("JETSAGA_NATS__URL".to_owned(), nats_url.clone()),
                ("JETSAGA_STREAMS__REPLICAS".to_owned(), replicas.clone()),
            ];
            env.extend(extra);
            env
        };
        for name in ["orchestrator-a", "orchestrator-b"] {
            let listen = format!("127.0.0.1:{}", free_port()?);
            orchestrator_http.push(listen.clone());
            let env = common(vec![
                ("JETSAGA_HTTP__LISTEN".to_owned(), listen),
                (
                    "JETSAGA_ENGINE__ACK_WAIT".to_owned(),
                    format!("{}s", ORCHESTRATOR_ACK_WAIT.as_secs()),
                ),
                (
                    "JETSAGA_ENGINE__MAX_IN_FLIGHT".to_owned(),
                    layout.max_in_flight.to_string(),
                ),
                ("JETSAGA_ENGINE__INSTANCE".to_owned(), name.to_owned()),
                ("JETSAGA_LOG".to_owned(), "warn".to_owned()),
            ]);
            procs.insert(
                name.to_owned(),
                proc(layout, name, "jetsaga", vec!["serve".to_owned()], env)?,
            );
        }
        let catalogue = layout
            .catalogue
            .iter()
            .map(|(sku, units)| format!("\"{sku}\" = {units}"))
            .collect::<Vec<_>>()
            .join(", ");
        for name in PARTICIPANTS {
            // The inventory's info lines are the rare decisions an audit failure is traced
            // back with ("no hold to sell", "the record found is this attempt's own").
            let filter = if name == "inventory" {
                "warn,jetsaga_reference::inventory=info"
            } else {
                "warn"
            };
            let mut extra = vec![
                // Several instances of a participant would fight over one metrics port.
                ("JETSAGA_METRICS__LISTEN".to_owned(), String::new()),
                (
                    "JETSAGA_TELEMETRY__LOG_FILTER".to_owned(),
                    filter.to_owned(),
                ),
            ];
            if name == "inventory" {
                extra.push((
                    "JETSAGA_INVENTORY__CATALOGUE".to_owned(),
                    format!("{{ {catalogue} }}"),
                ));
            }
            let binary = format!("jetsaga-{name}");
            procs.insert(
                name.to_owned(),
                proc(layout, name, &binary, Vec::new(), common(extra))?,
            );
        }
        for p in procs.values_mut() {
            p.spawn()?;
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                procs,
                nats,
                nats_tally: Tally::default(),
                nats_outages: Vec::new(),
                shut_down: false,
            })),
            nats_url,
            orchestrator_http,
        })
    }

    /// nats-server's client URL (a cluster's: every node's, comma-separated).
    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// The orchestrators' HTTP addresses (`127.0.0.1:<port>`).
    pub fn orchestrator_http(&self) -> &[String] {
        &self.orchestrator_http
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Kills `name` (SIGKILL) and starts it again at once.
    ///
    /// # Errors
    ///
    /// No such process, or it does not start again.
    pub fn kill_and_restart(&self, name: &str) -> Result<(), Error> {
        let mut inner = self.lock();
        if inner.shut_down {
            return Ok(());
        }
        let p = inner
            .procs
            .get_mut(name)
            .ok_or_else(|| Error::Io(format!("no process {name}")))?;
        if let Some(mut child) = p.child.take() {
            child
                .kill()
                .map_err(|e| Error::Io(format!("killing {name}: {e}")))?;
        }
        p.tally.killed += 1;
        p.tally.restarted += 1;
        p.spawn()
    }

    /// Sends SIGSTOP to `name`; `false` if it was not running.
    ///
    /// # Errors
    ///
    /// No such process, or `kill` cannot be run.
    pub fn stop(&self, name: &str) -> Result<bool, Error> {
        let mut inner = self.lock();
        let p = inner
            .procs
            .get_mut(name)
            .ok_or_else(|| Error::Io(format!("no process {name}")))?;
        let stopped = p.signal("STOP")?;
        if stopped {
            p.stopped = true;
            p.tally.stopped += 1;
        }
        Ok(stopped)
    }

    /// Sends SIGCONT to `name`.
    ///
    /// # Errors
    ///
    /// No such process, or `kill` cannot be run.
    pub fn resume(&self, name: &str) -> Result<(), Error> {
        let mut inner = self.lock();
        let p = inner
            .procs
            .get_mut(name)
            .ok_or_else(|| Error::Io(format!("no process {name}")))?;
        p.signal("CONT")?;
        p.stopped = false;
        Ok(())
    }

    /// Whether `name` is stopped (SIGSTOP) right now.
    pub fn is_stopped(&self, name: &str) -> bool {
        self.lock().procs.get(name).is_some_and(|p| p.stopped)
    }

    /// Restarts every process that exited on its own; returns their names.
    ///
    /// # Errors
    ///
    /// A process that cannot be started again.
    pub fn restart_exited(&self) -> Result<Vec<String>, Error> {
        let mut inner = self.lock();
        let mut restarted = Vec::new();
        if inner.shut_down {
            return Ok(restarted);
        }
        for (name, p) in &mut inner.procs {
            let exited = match p.child.as_mut() {
                Some(child) => child
                    .try_wait()
                    .map_err(|e| Error::Io(e.to_string()))?
                    .is_some(),
                None => true,
            };
            if exited {
                p.tally.exited += 1;
                p.tally.restarted += 1;
                p.spawn()?;
                restarted.push(name.clone());
            }
        }
        Ok(restarted)
    }

    /// Kills nats-server (SIGKILL), keeps it down for `down_for`, and starts it again on the
    /// same port and store, blocking until it accepts clients; returns how long it was down.
    ///
    /// # Errors
    ///
    /// It does not come back.
    pub fn restart_nats(&self, down_for: Duration) -> Result<Duration, Error> {
        let mut inner = self.lock();
        if inner.shut_down {
            return Ok(Duration::ZERO);
        }
        let down = Instant::now();
        inner.nats.kill();
        inner.nats_tally.killed += 1;
        std::thread::sleep(down_for);
        inner
            .nats
            .start_again()
            .map_err(|e| Error::Io(format!("nats-server did not come back: {e}")))?;
        inner.nats_tally.restarted += 1;
        let outage = down.elapsed();
        inner.nats_outages.push(outage);
        Ok(outage)
    }

    /// Notes each orchestrator's peak resident set so far (Linux: `VmHWM` in
    /// `/proc/<pid>/status`; elsewhere nothing is measured).
    pub(crate) fn sample_memory(&self) {
        let mut inner = self.lock();
        for (name, p) in &mut inner.procs {
            if !name.starts_with("orchestrator") {
                continue;
            }
            if let Some(kib) = p.child.as_ref().and_then(|c| peak_rss_kib(c.pid())) {
                p.peak_rss_kib = p.peak_rss_kib.max(kib);
            }
        }
    }

    /// Each orchestrator's largest peak resident set seen, in KiB (0: not measured).
    pub fn peak_rss_kib(&self) -> Vec<(String, u64)> {
        self.lock()
            .procs
            .iter()
            .filter(|(name, _)| name.starts_with("orchestrator"))
            .map(|(name, p)| (name.clone(), p.peak_rss_kib))
            .collect()
    }

    /// What happened to each process, nats-server first, and nats-server's outages.
    pub fn tallies(&self) -> (Vec<(String, Tally)>, Vec<Duration>) {
        let inner = self.lock();
        let mut out = inner.nats.tallies(&inner.nats_tally);
        out.extend(
            inner
                .procs
                .iter()
                .map(|(name, p)| (name.clone(), p.tally.clone())),
        );
        (out, inner.nats_outages.clone())
    }

    /// Runs `f` on nats-server (or the cluster) under the system's lock; `None` once the
    /// system is shut down.
    pub(crate) fn with_nats<T>(&self, f: impl FnOnce(&mut Nats) -> T) -> Option<T> {
        let mut inner = self.lock();
        (!inner.shut_down).then(|| f(&mut inner.nats))
    }

    /// Everything nats-server wrote to its log so far (all its runs).
    pub fn nats_log(&self) -> String {
        self.lock().nats.log()
    }

    /// Kills every process (participants and orchestrators, then nats-server) and reaps it;
    /// from then on nothing is started again (a fault task still running finds nothing to do).
    pub fn shut_down(&self) {
        let mut inner = self.lock();
        inner.shut_down = true;
        for p in inner.procs.values_mut() {
            if let Some(mut child) = p.child.take() {
                let _ = child.kill();
            }
        }
        inner.nats.kill();
    }
}

fn proc(
    layout: &Layout,
    name: &str,
    binary: &str,
    args: Vec<String>,
    env: Vec<(String, String)>,
) -> Result<Proc, Error> {
    let program = layout
        .bin_dir
        .join(format!("{binary}{}", std::env::consts::EXE_SUFFIX));
    if !program.is_file() {
        return Err(Error::Io(format!(
            "{} not found: build the workspace's binaries first (cargo build --bins)",
            program.display()
        )));
    }
    Ok(Proc {
        program,
        args,
        env,
        log: log_path(&layout.log_dir, name),
        child: None,
        stopped: false,
        tally: Tally::default(),
        peak_rss_kib: 0,
    })
}

/// The peak resident set of process `pid` in KiB, from `/proc` (`None` where there is none).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Where the log of process `name` goes.
pub(crate) fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

/// A port the OS considers free on `127.0.0.1` right now.
fn free_port() -> Result<u16, Error> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Io(format!("no free port: {e}")))
}
