//! The project's own binaries as child processes, for crash and end-to-end tests.

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often [`ChildGuard::wait_exit`] polls the process.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A child process that is killed and reaped when the guard is dropped, so a failing test never
/// leaves a stray process behind.
///
/// ```no_run
/// use std::process::Command;
/// let mut orchestrator =
///     jetsaga_testkit::ChildGuard::spawn(Command::new(jetsaga_testkit::cargo_bin("jetsaga")))
///         .unwrap();
/// orchestrator.kill().unwrap(); // crash it mid-saga
/// ```
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Guards an already spawned child.
    pub fn new(child: Child) -> Self {
        Self { child }
    }

    /// Spawns `command` with stdin closed and guards the child.
    ///
    /// # Errors
    ///
    /// The spawn's I/O error.
    pub fn spawn(mut command: Command) -> io::Result<Self> {
        command.stdin(Stdio::null()).spawn().map(Self::new)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the child abruptly (SIGKILL on Unix), as a crash would, and reaps it.
    ///
    /// # Errors
    ///
    /// The I/O error of waiting on it; killing one that already exited is not an error.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        // Fails only if it has already exited; `wait` then returns its status.
        let _ = self.child.kill();
        self.child.wait()
    }

    /// Asks the child to shut down gracefully (SIGTERM, through `sh`'s `kill` on its pid) without
    /// waiting; follow with [`wait_exit`](Self::wait_exit). Does nothing if it has exited.
    ///
    /// # Errors
    ///
    /// The I/O error of checking on it or of running `sh`, or `kill` failing.
    pub fn terminate(&mut self) -> io::Result<()> {
        // Once reaped, the pid could belong to someone else: only signal a live, unreaped child.
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let status = Command::new("sh")
            .args(["-c", "kill -s TERM \"$1\"", "sh"])
            .arg(self.pid().to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "kill -s TERM {} failed: {status}",
                self.pid()
            )))
        }
    }

    /// The exit status if the child has exited, without blocking.
    ///
    /// # Errors
    ///
    /// The I/O error of checking on it.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits, without blocking the async runtime, up to `timeout` for the child to exit; `None` if
    /// it is still running then.
    ///
    /// # Errors
    ///
    /// The I/O error of checking on it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if started.elapsed() >= timeout {
                return Ok(None);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The guarded child, e.g. to take its piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        Self::new(child)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of the workspace binary `name` (e.g. `"jetsaga"`).
///
/// Uses `CARGO_BIN_EXE_<name>` (or nextest's `NEXTEST_BIN_EXE_<name>`) when set at run time;
/// otherwise `<target>/<profile>/<name>`, next to the `deps/` folder holding the running test
/// executable. Cargo builds a package's binaries for its own integration tests only; binaries of
/// other packages must have been built (`deploy/test.sh` builds them all first).
///
/// # Panics
///
/// Panics, saying how to build it, if no such file exists.
pub fn cargo_bin(name: &str) -> PathBuf {
    let from_env = [
        format!("CARGO_BIN_EXE_{name}"),
        format!("NEXTEST_BIN_EXE_{name}"),
        format!("NEXTEST_BIN_EXE_{}", name.replace('-', "_")),
    ]
    .into_iter()
    .find_map(std::env::var_os);
    if let Some(path) = from_env {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot locate {name}: no current executable: {e}"));
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "binary {name} not found at {}: build it first with `cargo build --bin {name}` \
             (deploy/test.sh builds all workspace binaries)",
            path.display()
        );
    }
    path
}
