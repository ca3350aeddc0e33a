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

/// Exit code for bad configuration or usage (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

/// The command line every reference participant shares; `--help` also prints the defaults.
#[derive(Debug, clap::Parser)]
struct Args {
    /// The configuration file (TOML).
    #[arg(short, long, value_name = "FILE", env = config::CONFIG_ENV)]
    config: Option<std::path::PathBuf>,
}

impl Args {
    /// Parses the process arguments for `binary`; `Err` is the exit code after help,
    /// `--version` (0) or a usage error (64) has been printed.
    fn parse<C: config::Load>(binary: &'static str) -> Result<Self, std::process::ExitCode> {
        use clap::{CommandFactory, FromArgMatches};
        let defaults = toml::to_string(&C::default())
            .unwrap_or_else(|e| format!("(cannot print the defaults: {e})"));
        let command = Self::command()
            .name(binary)
            .version(env!("CARGO_PKG_VERSION"))
            .about(format!("{binary}: a reference participant of jetsaga."))
            .after_help(format!(
                "Configuration: the defaults, then FILE, then environment variables \
                 {}<SECTION>__<KEY> (e.g. JETSAGA_NATS__URL).\n\nDefaults:\n\n{defaults}",
                config::ENV_PREFIX
            ));
        command
            .try_get_matches()
            .and_then(|matches| Self::from_arg_matches(&matches))
            .map_err(|e| {
                use clap::error::ErrorKind;
                // Printing to a closed stdout/stderr is not worth failing over.
                let _ = e.print();
                match e.kind() {
                    ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                        std::process::ExitCode::SUCCESS
                    }
                    _ => std::process::ExitCode::from(EX_USAGE),
                }
            })
    }
}

/// What every reference participant's `main` does: parse the command line, load the
/// configuration (exit 64 naming the field when it is invalid), start the runtime
/// ([`jetsaga_runtime::workers`]: one worker thread unless `TOKIO_WORKER_THREADS` says
/// otherwise; exit 64 for a bad count), set up telemetry, and run until SIGINT or SIGTERM.
pub fn main<C, F, Fut>(binary: &'static str, run: F) -> std::process::ExitCode
where
    C: config::Load,
    F: FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    use std::process::ExitCode;
    let args = match Args::parse::<C>(binary) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let config: C = match config::load(args.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match jetsaga_runtime::workers::from_env() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return e.exit_code();
        }
    };
    runtime.block_on(async move {
        let _telemetry = match jetsaga_runtime::telemetry::init(binary, config.telemetry()) {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("{binary}: {e}");
                return ExitCode::from(EX_USAGE);
            }
        };
        match run(config, Box::pin(jetsaga_runtime::shutdown::signal())).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "{binary} stopped");
                ExitCode::FAILURE
            }
        }
    })
}
