//! The reference participants of jetsaga, with their state in JetStream KV only.
//!
//! Each binary (`jetsaga-inventory`, `jetsaga-payment`, `jetsaga-notification`) is a thin
//! `main` over `run(config, shutdown)` here, so tests run the same code in-process.
//!
//! - [`inventory`]: stock per product, reservations per saga; `reserve`, `release`, `commit`.
//! - [`payment`]: one payment record per saga; `charge`, `refund`; the ledger.
//! - [`notification`]: consumes `order.confirmed` / `order.cancelled`, records one email per order.
//! - [`order`]: the order type the participants read from the saga input.
//! - [`config`]: the configuration and the shared sections; [`faults`]: injected
//!   failures and latency; [`service`]: connection, KV buckets and the metrics endpoint.
//!
//! Connection, stream checks, the consume loop, signals and telemetry come from
//! `jetsaga_runtime`, as in the orchestrator.

pub mod config;
pub mod faults;
pub mod inventory;
pub mod notification;
pub mod order;
pub mod payment;
pub mod service;

/// Why a participant could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// NATS could not be reached.
    #[error(transparent)]
    Connect(#[from] jetsaga_runtime::nats::Error),
    /// A stream or bucket could not be created or has other settings.
    #[error(transparent)]
    Streams(#[from] jetsaga_runtime::streams::Error),
    /// NATS connection or JetStream set-up.
    #[error("nats: {0}")]
    Nats(String),
    /// A KV bucket or record could not be used.
    #[error("kv: {0}")]
    Kv(String),
    /// The SDK failed.
    #[error(transparent)]
    Participant(#[from] jetsaga_participant::Error),
    /// Binding a socket failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// What every reference participant's `main` does: load the configuration (exit
/// 64 naming the field when it is invalid), set up telemetry, and run until
/// SIGINT or SIGTERM.
pub async fn main<C, F, Fut>(binary: &'static str, run: F) -> std::process::ExitCode
where
    C: config::Load,
    F: FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    use std::process::ExitCode;
    let config: C = match config::from_args(binary, std::env::args()) {
        Ok(config::Cli::Run(config)) => config,
        Ok(config::Cli::Help(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(64);
        }
    };
    let _telemetry = match jetsaga_runtime::telemetry::init(binary, config.telemetry()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(64);
        }
    };
    match run(config, Box::pin(jetsaga_runtime::shutdown::signal())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{binary} stopped");
            ExitCode::FAILURE
        }
    }
}
