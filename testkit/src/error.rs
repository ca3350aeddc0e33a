//! The crate's error type.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Why a server or cluster could not be found, started or made ready.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No `nats-server` binary in `NATS_SERVER_BIN`, the project-local install, or `PATH`.
    #[error(
        "nats-server not found: run deploy/install-nats-server.sh \
         (or set NATS_SERVER_BIN to a nats-server 2.15.1 binary)"
    )]
    BinNotFound,
    /// `NATS_SERVER_BIN` is set but names no file.
    #[error("NATS_SERVER_BIN is {0:?}, which is not a file: run deploy/install-nats-server.sh")]
    BinMissing(PathBuf),
    /// The server could not bind its port because something else holds it.
    #[error("port {port} is already in use")]
    PortInUse {
        /// The client or cluster port that was busy.
        port: u16,
    },
    /// The server process exited before it accepted clients.
    #[error("nats-server exited before it was ready ({status}); log tail:\n{log_tail}")]
    Exited {
        /// How the process ended.
        status: ExitStatus,
        /// The last lines of the server's log.
        log_tail: String,
    },
    /// The server did not send its `INFO` line within the time allowed.
    #[error("nats-server on port {port} not ready after {waited:?}; log tail:\n{log_tail}")]
    NotReady {
        /// The client port that was polled.
        port: u16,
        /// How long the harness waited.
        waited: Duration,
        /// The last lines of the server's log.
        log_tail: String,
    },
    /// JetStream in a cluster did not accept a replicated stream within the time allowed.
    #[error("jetstream not ready in the cluster after {waited:?}: {last_error}")]
    JetStreamNotReady {
        /// How long the harness waited.
        waited: Duration,
        /// The last error seen while probing.
        last_error: String,
    },
    /// File or process I/O failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
