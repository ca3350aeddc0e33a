//! The one shared test harness of jetsaga.
//!
//! Every crate's integration tests take this crate as a dev-dependency to run a real
//! `nats-server` with JetStream, exactly as nats.rs' own tests do: each server gets a free loopback
//! port and a fresh temporary directory (config, store, log), and `Drop` kills the child and removes
//! the directory. Nothing here mocks NATS.
//!
//! Modules:
//! - [`server`]: [`NatsServer`], one JetStream server, with [`Options`]; [`nats_server_bin`] finds
//!   the binary (`NATS_SERVER_BIN`, then the project-local install, then `PATH`).
//! - [`cluster`]: [`Cluster`], n servers with routes between them and JetStream meta leader ready.
//! - [`process`]: [`ChildGuard`] for the project's own binaries spawned by crash tests, and
//!   [`cargo_bin`] to find them.
//! - [`wait`]: [`wait_until`], the way tests wait on a condition instead of sleeping.
//! - [`fault`]: [`move_subjects`], a stream made unavailable to publishers for a while.
//! - [`error`]: the crate's [`Error`].
//!
//! The pinned server (2.15.1) is installed by `deploy/install-nats-server.sh`; `deploy/test.sh`
//! runs it and points `NATS_SERVER_BIN` at the result.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let server = jetsaga_testkit::NatsServer::start();
//! let client = async_nats::connect(server.url()).await?;
//! let js = async_nats::jetstream::new(client);
//! js.create_stream("ORDERS").await?;
//! # Ok(()) }
//! ```

pub mod cluster;
pub mod error;
pub mod fault;
pub mod process;
pub mod server;
pub mod wait;

pub use cluster::Cluster;
pub use error::Error;
pub use fault::move_subjects;
pub use process::{ChildGuard, cargo_bin};
pub use server::{NatsServer, Options, nats_server_bin};
pub use wait::wait_until;
