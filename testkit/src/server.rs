//! One `nats-server` with JetStream, in its own temporary directory.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::Error;

/// Upper bound for a server to accept clients after spawn; generous for a loaded 2-core CI box.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for a graceful [`NatsServer::stop`] before the harness kills the process.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often readiness and exit are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How many times a start is tried when a port turns out to be taken.
const START_ATTEMPTS: u32 = 5;
/// Lines of log shown in errors.
const LOG_TAIL_LINES: usize = 40;

/// Environment variable naming the `nats-server` binary to use.
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";

/// Finds the `nats-server` binary.
///
/// Looks, in order, at the `NATS_SERVER_BIN` environment variable, the project-local install
/// `<workspace>/.tools/nats-server/bin/nats-server` made by `deploy/install-nats-server.sh`, and
/// `nats-server` on `PATH` (which may be an older server lacking features the tests use).
///
/// # Errors
///
/// [`Error::BinMissing`] if `NATS_SERVER_BIN` names no file, [`Error::BinNotFound`] if no binary
/// is found anywhere; both messages say to run `deploy/install-nats-server.sh`.
pub fn nats_server_bin() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os(NATS_SERVER_BIN_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::BinMissing(path))
        };
    }
    // testkit lives at `<workspace>/testkit`, so its parent is the workspace root.
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(root) = manifest_dir.parent() {
        let local = root.join(".tools/nats-server/bin/nats-server");
        if local.is_file() {
            return Ok(local);
        }
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or(Error::BinNotFound)
}

/// How to configure a [`NatsServer`]; `Options::default()` is a plain JetStream server.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Adds `sync_interval: always` to the `jetstream` block: fsync every write, as production
    /// single-node deployments should. Off by default (the server then syncs every 2 minutes).
    pub sync_always: bool,
    /// Raw nats-server configuration appended to the generated file (e.g. `server_name: a` or a
    /// `cluster { … }` block).
    pub extra_config: String,
    /// The `max_file_store` (and `max_memory_store`) of the `jetstream` block, e.g. `"16GB"`
    /// (`None`: 16GB, room for every stream's byte bound whatever the disk has free).
    pub max_store: Option<String>,
}

/// A running `nats-server -js` child process owned by the test.
///
/// It listens on a free `127.0.0.1` port and keeps its config, JetStream store and log in a fresh
/// temporary directory. `Drop` kills the process (by its handle) and removes the directory.
/// [`restart`](Self::restart) brings it back on the same port and the same store.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    config_file: PathBuf,
    log_file: PathBuf,
    store_dir: PathBuf,
    /// A given configuration file (see [`NatsServer::try_start_with_file`]) instead of a generated one.
    given: Option<Given>,
    child: Option<Child>,
    // Dropped last: the process must be gone before its directory is removed.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a JetStream server with default [`Options`] and waits until it accepts clients.
    ///
    /// # Panics
    ///
    /// Panics with the reason (and the server's log tail) if it cannot start; use
    /// [`try_start`](Self::try_start) to handle the error instead.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), async_nats::ConnectError> {
    /// let server = jetsaga_testkit::NatsServer::start();
    /// let client = async_nats::connect(server.url()).await?;
    /// # Ok(()) }
    /// ```
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    /// Starts a server configured by `options` and waits until it accepts clients.
    ///
    /// # Panics
    ///
    /// Panics with the reason if it cannot start; see [`try_start_with`](Self::try_start_with).
    pub fn start_with(options: Options) -> Self {
        Self::try_start_with(options).unwrap_or_else(|e| panic!("cannot start nats-server: {e}"))
    }

    /// Like [`start`](Self::start), returning the error instead of panicking.
    ///
    /// # Errors
    ///
    /// See [`try_start_with`](Self::try_start_with).
    pub fn try_start() -> Result<Self, Error> {
        Self::try_start_with(Options::default())
    }

    /// Like [`start_with`](Self::start_with), returning the error instead of panicking.
    ///
    /// # Errors
    ///
    /// No binary ([`Error::BinNotFound`]), I/O failures, or a server that exits or does not become
    /// ready in time. A port taken in the meantime is retried with a fresh port.
    pub fn try_start_with(options: Options) -> Result<Self, Error> {
        let mut server = Self::configured(&options, free_port()?)?;
        let mut attempt = 1;
        loop {
            match server.spawn_and_wait() {
                Err(Error::PortInUse { .. }) if attempt < START_ATTEMPTS => {
                    attempt += 1;
                    server.port = free_port()?;
                    server.write_config(&options)?;
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(server),
            }
        }
    }

    /// Starts `nats-server -c file` (e.g. a configuration the project ships) with `env` added to
    /// its environment, and waits until it accepts clients.
    ///
    /// Command-line flags override the file so the server stays private to the test: it listens
    /// on a free `127.0.0.1` port (`-a`, `-p`), serves monitoring on another free port (`-m`) and
    /// keeps JetStream in the temporary directory (`-sd`; the file must therefore not set
    /// `store_dir` itself). [`restart`](Self::restart) and `Drop` behave as for
    /// [`start`](Self::start).
    ///
    /// # Errors
    ///
    /// As for [`try_start_with`](Self::try_start_with); a file the server refuses gives
    /// [`Error::Exited`] with its message.
    pub fn try_start_with_file(
        file: impl AsRef<Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let mut server = Self::configured(&Options::default(), free_port()?)?;
        server.config_file = file.as_ref().to_owned();
        server.given = Some(Given {
            env: env.into_iter().collect(),
            monitor_port: free_port()?,
        });
        let mut attempt = 1;
        loop {
            match server.spawn_and_wait() {
                Err(Error::PortInUse { .. }) if attempt < START_ATTEMPTS => {
                    attempt += 1;
                    server.port = free_port()?;
                    if let Some(given) = server.given.as_mut() {
                        given.monitor_port = free_port()?;
                    }
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(server),
            }
        }
    }

    /// The monitoring port (`/varz`, `/jsz`) of a server started from a file, on `127.0.0.1`.
    pub fn monitor_port(&self) -> Option<u16> {
        self.given.as_ref().map(|g| g.monitor_port)
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port on `127.0.0.1`; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream `store_dir`; it stays the same across restarts.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The directory holding config, store and log; removed on `Drop`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The configuration file the server runs with (generated, or the one given).
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// Everything the server (and its earlier runs) wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_file)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Whether the server process is running (started and not stopped, killed or exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Stops the server gracefully (SIGINT, via `nats-server --signal quit=<pid>`) and waits for
    /// it to exit; kills it if it has not exited within 10 s. Does nothing if it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // By pid of our own, unreaped child: the pid cannot have been reused.
            let signalled = Command::new(&self.bin)
                .arg("--signal")
                .arg(format!("quit={}", child.id()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            let deadline = Instant::now() + STOP_TIMEOUT;
            while signalled && Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(POLL_INTERVAL);
            }
        }
        kill_and_reap(&mut child);
    }

    /// Kills the server abruptly (SIGKILL) and reaps it, as a crash would. Does nothing if it is
    /// not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Stops the server (if running) and starts it again on the same port, config and store,
    /// waiting until it accepts clients.
    ///
    /// # Panics
    ///
    /// Panics with the reason if it cannot start again; see [`try_restart`](Self::try_restart).
    pub fn restart(&mut self) {
        self.try_restart()
            .unwrap_or_else(|e| panic!("cannot restart nats-server: {e}"));
    }

    /// Like [`restart`](Self::restart), returning the error instead of panicking.
    ///
    /// # Errors
    ///
    /// I/O failures, or a server that exits or does not become ready in time. A port that is
    /// briefly busy is retried a few times.
    pub fn try_restart(&mut self) -> Result<(), Error> {
        self.stop();
        self.start_again()
    }

    /// Starts the server again after [`stop`](Self::stop) or [`kill`](Self::kill), on the same
    /// port, config and store. Does nothing if it is running.
    ///
    /// # Errors
    ///
    /// As for [`try_restart`](Self::try_restart).
    pub fn start_again(&mut self) -> Result<(), Error> {
        if self.is_running() {
            return Ok(());
        }
        let mut attempt = 1;
        loop {
            match self.spawn_and_wait() {
                Err(Error::PortInUse { .. }) if attempt < START_ATTEMPTS => {
                    // Something else briefly holds our port; back off and try again.
                    std::thread::sleep(Duration::from_millis(200) * attempt);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Creates the directory and config of a server on `port`, without starting it.
    pub(crate) fn configured(options: &Options, port: u16) -> Result<Self, Error> {
        let bin = nats_server_bin()?;
        let dir = tempfile::Builder::new().prefix("jetsaga-nats-").tempdir()?;
        let server = Self {
            bin,
            port,
            config_file: dir.path().join("nats-server.conf"),
            log_file: dir.path().join("nats-server.log"),
            store_dir: dir.path().join("js"),
            given: None,
            child: None,
            dir,
        };
        server.write_config(options)?;
        Ok(server)
    }

    /// Spawns the process (without waiting for it); used to start cluster nodes together.
    pub(crate) fn spawn(&mut self) -> Result<(), Error> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)?;
        writeln!(
            log,
            "--- jetsaga-testkit: starting nats-server on port {} ---",
            self.port
        )?;
        let mut command = Command::new(&self.bin);
        command.arg("-c").arg(&self.config_file);
        if let Some(given) = &self.given {
            let flags: [(&str, OsString); 4] = [
                ("-a", "127.0.0.1".into()),
                ("-p", self.port.to_string().into()),
                ("-m", given.monitor_port.to_string().into()),
                ("-sd", self.store_dir.clone().into()),
            ];
            for (flag, value) in flags {
                command.arg(flag).arg(value);
            }
            command.envs(given.env.iter().map(|(k, v)| (k, v)));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the spawned process sends its `INFO` line to a client.
    ///
    /// The server opens its client port only after JetStream has recovered its store, so `INFO`
    /// means the data is there.
    pub(crate) fn wait_ready(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(Error::Io(std::io::Error::other(
                    "nats-server is not started",
                )));
            };
            if let Some(status) = child.try_wait()? {
                self.child = None;
                let log_tail = self.log_tail();
                return Err(if log_tail.contains("address already in use") {
                    Error::PortInUse { port: self.port }
                } else {
                    Error::Exited { status, log_tail }
                });
            }
            if sends_info(self.port) {
                return Ok(());
            }
            if started.elapsed() >= READY_TIMEOUT {
                self.kill();
                return Err(Error::NotReady {
                    port: self.port,
                    waited: READY_TIMEOUT,
                    log_tail: self.log_tail(),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn spawn_and_wait(&mut self) -> Result<(), Error> {
        self.spawn()?;
        self.wait_ready()
    }

    fn write_config(&self, options: &Options) -> Result<(), Error> {
        let mut jetstream = format!(
            "  store_dir: {store:?}\n  max_memory_store: {max}\n  max_file_store: {max}\n",
            store = self.store_dir.display().to_string(),
            max = options.max_store.as_deref().unwrap_or("16GB"),
        );
        if options.sync_always {
            jetstream.push_str("  sync_interval: always\n");
        }
        let config = format!(
            "# generated by jetsaga-testkit\nlisten: 127.0.0.1:{port}\njetstream {{\n{jetstream}}}\n{extra}\n",
            port = self.port,
            extra = options.extra_config,
        );
        File::create(&self.config_file)?.write_all(config.as_bytes())?;
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

/// What a server started from a given file adds to its command line and environment.
#[derive(Debug)]
struct Given {
    env: Vec<(String, String)>,
    monitor_port: u16,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port the OS considers free on `127.0.0.1` right now.
pub(crate) fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn kill_and_reap(child: &mut Child) {
    // Errors mean it has already exited; `wait` reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether a client connecting to `port` receives the server's `INFO` line.
fn sends_info(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
    {
        return false;
    }
    let mut received = Vec::new();
    let mut buf = [0_u8; 1024];
    while !received.windows(2).any(|w| w == b"\r\n") && received.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    received.starts_with(b"INFO ")
}
